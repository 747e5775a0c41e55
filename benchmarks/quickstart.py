"""The quickstart sweep as a user runs it: wall time, phase-1 work saved, overhead.

    python benchmarks/quickstart.py [--quick]

Runs ``ntk-sweep run quickstart`` (``--quick``: one seed, phase 1 of 4 epochs with switch
points 0, 2 and 4) in a fresh output directory, as a subprocess, so the wall time includes
starting Python, Ray and MLflow. Prints one JSON object with the raw figures and three goals:

* ``quickstart_wall_s``: the whole command, under 300 s on a 2-core machine (full run only);
* ``phase1_epochs_ratio``: phase-1 epochs trained over what one trial per switch point would
  train (each to its own switch point); at most max(switch points) / sum(switch points);
* ``overhead_share``: the share of trial wall time spent in MLflow calls, checkpoint
  writes and reads, and Tune reports (each trial times them and logs ``time/*_s``); under 0.15.
  The time between the command's start and the first trial (imports, Ray start) is reported
  separately as ``startup_s``;
* ``estimate_ratio``: the sweep's wall time after startup over what ``ntk-sweep validate
  --estimate`` predicted (``core/estimate.py``, timed in this process before the run);
  between 0.5 and 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from core import estimate
from core.config import read_config_file
from search_spaces import resolve
from sweep.space import parse_space

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["seeds=[0]", "phase1.epochs=4", "switch_points=[0,2,4]"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a reduced sweep")
    args = parser.parse_args()
    overrides = QUICK if args.quick else []
    space = parse_space(read_config_file(resolve("quickstart"), overrides), "quickstart")
    predicted = estimate.for_sweep(space.configs(), space.trial_count())
    with tempfile.TemporaryDirectory(prefix="ntk-bench-") as tmp:
        out = Path(tmp) / "quickstart"
        command = [str(Path(sys.executable).parent / "ntk-sweep"), "run", "quickstart", "--out",
                   str(out), *(f"--set={o}" for o in overrides)]
        env = {**os.environ, "MLFLOW_TRACKING_URI": "", "NTK_SWEEP_STORAGE": "",
               "RAY_ADDRESS": ""}
        start, start_epoch = time.perf_counter(), time.time()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"ntk-sweep failed ({done.returncode}):\n{done.stderr[-3000:]}")
        client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
        exp = client.get_experiment_by_name("quickstart")
        trials = [r for r in client.search_runs([exp.experiment_id], max_results=1000)
                  if r.data.tags.get("kind") == "trial"]
        config = json.loads(next(out.glob("trials/*/results.json")).read_text())["config"]
    switch_points = config["switch_points"]
    modes = {c[0] for c in config["codes"]}
    trained = sum(t.data.metrics["phase1_epochs_trained"] for t in trials)
    naive = len(trials) * len(modes) * sum(switch_points)
    times = {k: sum(t.data.metrics[f"time/{k}_s"] for t in trials)
             for k in ("trial", "mlflow", "checkpoint", "report")}
    overhead = (times["mlflow"] + times["checkpoint"] + times["report"]) / times["trial"]
    first_start = min(t.info.start_time for t in trials) / 1000
    startup = first_start - start_epoch
    ratio = (wall - startup) / predicted.total_s
    goals = [
        {"name": "phase1_epochs_ratio", "value": round(trained / naive, 4),
         "target": round(max(switch_points) / sum(switch_points), 4),
         "met": trained / naive <= max(switch_points) / sum(switch_points) + 1e-9},
        {"name": "overhead_share", "value": round(overhead, 4), "target": 0.15,
         "met": overhead < 0.15},
        {"name": "estimate_ratio", "value": round(ratio, 3), "target": [0.5, 2],
         "met": 0.5 <= ratio <= 2},
    ]
    if not args.quick:
        goals.insert(0, {"name": "quickstart_wall_s", "value": round(wall, 1), "target": 300,
                         "met": wall < 300})
    print(json.dumps({
        "benchmark": "sweep", "quick": args.quick, "machine": platform.machine(),
        "cpus": os.cpu_count(), "overrides": overrides, "wall_s": round(wall, 1),
        "startup_s": round(startup, 1), "estimate_s": round(predicted.total_s, 1),
        "estimate_by_work_s": {k: round(v, 2) for k, v in predicted.seconds.items() if v},
        "estimate_compile_s": round(predicted.compile_s, 2),
        "trials": len(trials), "phase1_epochs_trained": trained,
        "phase1_epochs_one_trial_per_switch_point": naive,
        "trial_seconds": {k: round(v, 2) for k, v in times.items()},
        "goals": goals,
    }, indent=1))


if __name__ == "__main__":
    main()
