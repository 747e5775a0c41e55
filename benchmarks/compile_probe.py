"""The digits experiment in fresh processes that share one persistent compilation cache.

Used by ``scale.py --compile-only`` (``compile_share_digits_experiment``, CPU) and by the GPU
check (``gpu.py``'s ``warm_process`` section). Imports nothing beyond the standard library, so
it runs where Ray, MLflow and psutil are not installed.

Each run is ``run_experiment`` on ``digits-demo`` (``quick``: 2 phase-1 epochs, switch points 0
and 2, one phase-2 epoch) in a new Python process, and reports:

* ``wall_s``: the experiment's wall time;
* ``compile_s``: tracing + lowering + backend compile (or load from the persistent cache), from
  ``jax.monitoring``; the cache's retrieval event lies inside the backend-compile event, so it
  is not added again;
* ``rows_sha256``: SHA-256 of the result rows without their ``seconds``: equal across the runs
  when the second process (which calls the programs the first exported, ``core/exported.py``)
  computes the same bits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUICK_OVERRIDES = ["phase1.epochs=2", "switch_points=[0,2]", "phase2.epochs=1"]

PROBE = """
import hashlib, json, sys, time
import jax
from core.compat import use_compilation_cache
from core.config import read_config_file, config_from_dict
from core.experiment import run_experiment
from search_spaces import resolve
spent = []
COMPILATION = ("/jax/core/compile/jaxpr_trace_duration",
               "/jax/core/compile/jaxpr_to_mlir_module_duration",
               "/jax/core/compile/backend_compile_duration")
def listen(event, seconds, **kw):
    if event in COMPILATION:
        spent.append(seconds)
jax.monitoring.register_event_duration_secs_listener(listen)
use_compilation_cache(sys.argv[1])
cfg = config_from_dict(read_config_file(resolve("digits-demo"), sys.argv[3:]))
start = time.perf_counter()
rows = run_experiment(cfg, sys.argv[2])
wall = time.perf_counter() - start
bits = json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in rows], sort_keys=True)
print(json.dumps({"wall_s": wall, "compile_s": sum(spent), "backend": jax.default_backend(),
                  "rows": len(rows), "rows_sha256": hashlib.sha256(bits.encode()).hexdigest()}))
"""


def compile_share(tmp: Path, quick: bool, env: dict[str, str] | None = None,
                  timeout_s: float | None = None) -> dict[str, Any]:
    """Two runs, the first filling ``tmp/jax-cache``; the share is the second's compile over
    wall time. Raises ``RuntimeError`` with the run's stderr if a run fails."""
    overrides = QUICK_OVERRIDES if quick else []
    env = {**(env if env is not None else os.environ)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    runs = []
    for attempt in range(2):
        done = subprocess.run(
            [sys.executable, "-c", PROBE, str(tmp / "jax-cache"), str(tmp / f"d{attempt}"),
             *overrides], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
            timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"digits experiment failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"digits experiment run {attempt + 1}: {runs[-1]}", file=sys.stderr, flush=True)
    return {"cold": runs[0], "warm": runs[1], "share": runs[1]["compile_s"] / runs[1]["wall_s"],
            "same_rows": runs[0]["rows_sha256"] == runs[1]["rows_sha256"]}
