"""Which runs of the digits experiment compute the same rows on this machine (diagnostic).

    python benchmarks/gpu_determinism.py OUTDIR

Runs digits-demo (quick variant) in fresh processes: two cold ones with their own caches, a
warm one on the first's cache, one with no persistent cache (plain jit, nothing exported), and
a cold + warm pair under XLA_FLAGS=--xla_gpu_deterministic_ops=true. Writes each run's rows to
OUTDIR/<name>.json and prints which hashes agree.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_probe import PROBE, QUICK_OVERRIDES, ROOT  # noqa: E402

PROBE_ROWS = PROBE.replace("use_compilation_cache(sys.argv[1])",
                           "use_compilation_cache(sys.argv[1] or None)")
out = Path(sys.argv[1])
work = out / "work"
env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                  os.environ.get("PYTHONPATH")]))}
det = {**env, "XLA_FLAGS": (env.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()}
plan = [("cold1", "c1", env), ("cold2", "c2", env), ("warm1", "c1", env), ("nocache", "", env),
        ("nocache2", "", env), ("det_cold", "c3", det), ("det_warm", "c3", det)]
result = {}
for name, cache, e in plan:
    d = work / name
    done = subprocess.run([sys.executable, "-c", PROBE_ROWS, str(work / cache) if cache else "",
                           str(d), *QUICK_OVERRIDES], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=200)
    if done.returncode:
        result[name] = {"error": done.stderr[-2000:]}
    else:
        result[name] = json.loads(done.stdout.strip().splitlines()[-1])
        rows = json.loads((d / "results.json").read_text())["rows"]
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    print(name, result[name], flush=True)
(out / "determinism.json").write_text(json.dumps(result, indent=1))
