"""XLA's CPU backend at LLVM level 2 (what importing ``core`` asks for, ``core/xla_flags.py``)
against its default level 3: the quick digits experiment, cold and warm.

    python benchmarks/xla_opt_level.py [--quick] [--out FILE]

Each pair is ``compile_probe.compile_share`` (a fresh process filling its own compilation cache,
then a second process loading from it) at level 3 and at level 2, alternating 3, 2, 2, 3 so
that a drift of the host over the run falls on both (``--quick``: one of each). Reports the
median wall seconds of each, the ratios level 2 over level 3, and whether every run's result
rows are the same bits. Goals:

* ``same_rows_at_both_levels``: true (the level is a speed choice only);
* ``cold_wall_ratio`` (a fresh process with an empty cache) <= 0.9;
* ``warm_wall_ratio`` (a fresh process loading every program from the cache) <= 1.0.

CPU only: GPUs keep XLA's default level (``core.xla_flags.cpu_only``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.compile_probe import compile_share  # noqa: E402
from core.xla_flags import OPT_LEVEL  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one pair: 3 then 2")
    parser.add_argument("--out", type=Path, help="also write the JSON object to this file")
    args = parser.parse_args()
    order = (3, 2) if args.quick else (3, 2, 2, 3)
    runs = []
    for level in order:
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        env |= {"XLA_FLAGS": f"--{OPT_LEVEL}={level}", "JAX_PLATFORMS": "cpu"}
        with tempfile.TemporaryDirectory(prefix="xla-level-") as tmp:
            share = compile_share(Path(tmp), quick=True, env=env)
        runs.append({"level": level, "cold": share["cold"], "warm": share["warm"]})
        print(f"level {level}: cold {share['cold']['wall_s']:.1f} s, "
              f"warm {share['warm']['wall_s']:.1f} s", file=sys.stderr, flush=True)

    def median(level: int, kind: str) -> float:
        return statistics.median(r[kind]["wall_s"] for r in runs if r["level"] == level)

    digests = {r[kind]["rows_sha256"] for r in runs for kind in ("cold", "warm")}
    cold, warm = median(2, "cold") / median(3, "cold"), median(2, "warm") / median(3, "warm")
    result = {
        "benchmark": "xla_opt_level", "quick": args.quick, "cpus": os.cpu_count(),
        "runs": runs,
        "median_wall_s": {f"level{lv}_{kind}": median(lv, kind) for lv in (3, 2)
                          for kind in ("cold", "warm")},
        "goals": [
            {"name": "same_rows_at_both_levels", "value": len(digests) == 1, "target": True,
             "met": len(digests) == 1},
            {"name": "cold_wall_ratio", "value": round(cold, 3), "target": 0.9,
             "met": cold <= 0.9},
            {"name": "warm_wall_ratio", "value": round(warm, 3), "target": 1.0,
             "met": warm <= 1.0},
        ],
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
