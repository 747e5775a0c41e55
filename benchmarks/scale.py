"""What a sweep costs per trial, and how each cost grows with the number of trials.

    python benchmarks/scale.py [--quick]

Runs ``ntk-sweep run`` (a subprocess, fresh output directory, local Ray and MLflow on SQLite)
on sweeps of n tiny trials, n = 8, 32, 128 (``--quick``: 4, 8, 16), every trial its own seed
so that no trajectory is shared, and fits each cost against n by least squares
(cost = a + b n: b is the cost of one more trial). Costs: wall seconds; CPU seconds of the
command and every process under it (the driver, Ray's daemons and trial workers, sampled);
files and bytes under the output directory by part (trajectory store, trial files, Tune's
experiment, MLflow's database and artifacts); the driver's peak resident memory.

A trial's own work is measured apart, in this process: its JAX compute (``trial_compute_s``:
each of its programs timed after compiling, times how often the trial runs it, as
``validate --estimate`` does), and the CPU seconds of its experiment and kernels run a second
time in one process (``trial_work_cpu_s``: compute plus checkpoints, files and Python).
Goals:

* ``overhead_cpu_s_per_trial``: per-trial CPU seconds less the JAX compute: <= 1.5;
* ``files_per_trial``: <= 12 (trials of their own seeds: nothing shared, the most files);
  ``files_per_trial_sharing_trajectories``, the same for trials that differ in phase 2 only
  and share two trajectories (a sweep over phase-2 settings, switch points or codes);
* ``compile_share_digits_experiment``: compilation (tracing, lowering, compiling or loading
  from the persistent cache; ``jax.monitoring`` events, the cache's retrieval counted once:
  it happens inside the backend compile event) over the wall time of
  ``digits-demo`` (``--quick``: 2 phase-1 epochs), in a fresh process whose compilation cache
  a first run filled: <= 0.03;
* ``report_reads_all_runs``: a report over 60,000 evaluated-model runs (inserted straight into
  MLflow's tables) returns every one;
* ``digits_grid_sweep_vs_one_process``: the digits CNN grid (``digits-switch-point``, seed 0)
  as a sweep of one trial per code against the same grid and its kernels in one process, wall
  time: <= 0.55 (``--grid-only`` runs just this: about 25 minutes; ``--quick`` a shorter grid,
  still about 8, the evaluation's APGD-100 and transfer attacks being most of it). The one
  process's XLA threads keep both cores busy (1.8 cores on average), so the floor, its
  CPU-seconds over the cores, is near 0.9 here, not 0.5: ``digits_grid_sweep_vs_two_core_floor``
  (the ratio over the floor measured in the same run) <= 1.1 says the sweep wastes little.

Also how a reused trial worker's resident memory grows from trial to trial
(``worker_rss_mb_per_trial``, the largest sweep, from each trial's ``memory/worker_rss_mb``),
and MLflow's write throughput against a real ``mlflow server`` on PostgreSQL (both started
here on loopback) with 1, 2 and 8 concurrent writers (the trials a node runs at once) and 1 or
4 server workers: runs, requests and trials' worth of writes per second.

Prints one JSON object; progress on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compile_probe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "MLFLOW_TRACKING_URI": "", "NTK_SWEEP_STORAGE": "", "RAY_ADDRESS": "",
       "TF_CPP_MIN_LOG_LEVEL": "3"}

# A tiny trial: synthetic data, an MLP of width 8, phase 1 of 2 epochs (C and A), phase 2 of
# one epoch from switch points 0, 1, 2 for CC and AC, kernels of 12 probe images.
TINY = {
    "dataset": {"name": "synthetic", "synthetic": {"n_train": 64, "n_test": 16, "num_classes": 3}},
    "model": {"name": "mlp", "widths": [8]},
    "codes": ["CC", "AC"], "switch_points": [0, 1, 2], "fractional_checkpoints": [],
    "phase1": {"epochs": 2, "lr": 0.05, "batch_size": 16, "lr_decay_epochs": [],
               "attack": {"eps": 0.1, "iters": 2}},
    "phase2": {"epochs": 1, "batch_size": 16},
    "eval": {"linf": {"eps": 0.1, "iters": 2}, "l2": None, "transfer": False},
    "kernel": {"probe_size": 12},
}
PARTS = ("trajectories", "trials", "ray", "mlartifacts", "mlflow.db", "jax-cache")


def log(message: str) -> None:
    print(f"[scale] {message}", file=sys.stderr, flush=True)


def tree(path: Path) -> tuple[int, int]:
    """(files, bytes) under ``path`` (a file counts as one)."""
    if path.is_file():
        return 1, path.stat().st_size
    files = [p for p in path.rglob("*") if p.is_file()] if path.exists() else []
    return len(files), sum(p.stat().st_size for p in files)


def process_kind(proc: psutil.Process) -> str:
    """``driver``, ``trial`` (a Ray worker running trials), ``ray`` (Ray's daemons and idle
    workers) or ``other``, from the process's name and command line."""
    try:
        line = " ".join(proc.cmdline())
    except psutil.Error:
        return "other"
    if "ntk-sweep" in line and " run " in f"{line} ":
        return "driver"
    if "ImplicitFunc" in line or "ray::trial" in line:
        return "trial"
    return "ray" if "ray" in line else "other"


def watched(command: list[str]) -> tuple[int, str, dict[tuple[int, float, str], float], int]:
    """Runs ``command`` (cwd ROOT, env ENV, stdout dropped) and samples, every 0.1 s, the CPU
    seconds of it and every process under it (Ray's daemons and trial workers are not waited
    for by the driver: RUSAGE_CHILDREN misses them; a process's last sample stands for its
    total) and its peak resident memory. Returns (exit code, stderr, {(pid, start, kind):
    CPU-s}, peak RSS bytes)."""
    driver = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    peak, cpu, kinds = [0], {}, {}

    def watch() -> None:
        proc = psutil.Process(driver.pid)
        while driver.poll() is None:
            try:
                peak[0] = max(peak[0], proc.memory_info().rss)
                for p in [proc, *proc.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        key = (p.pid, p.create_time())
                        # An idle Ray worker becomes a trial worker: classify until it is one.
                        if kinds.get(key) not in ("trial", "driver"):
                            kinds[key] = process_kind(p)
                        kind = kinds[key]
                        t = p.cpu_times()
                        for other in ("ray", "other"):  # counted under its latest kind
                            cpu.pop((*key, other), None)
                        cpu[(*key, kind)] = t.user + t.system
            except psutil.Error:
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, err = driver.communicate()
    watcher.join()
    return driver.returncode, err, cpu, peak[0]


def cpu_by_kind(cpu: dict[tuple[int, float, str], float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for (_, _, kind), seconds in cpu.items():
        out[kind] = round(out.get(kind, 0.0) + seconds, 1)
    return out


def run_sweep(n: int, tmp: Path, shared: bool = False) -> dict:
    """One sweep of ``n`` tiny trials: its costs. ``shared``: all of seed 0, a phase-2
    learning rate each, so that every trial uses the same two trajectories (a sweep over
    phase-2 settings) instead of its own."""
    name = f"scale-{'shared-' if shared else ''}{n}"
    space = {**TINY, "name": name, "seeds": {"grid": [[s] for s in range(n)]},
             "sweep": {"resources": {"cpus": 1}}}
    if shared:
        lrs = [round(0.01 * (1 + i), 4) for i in range(n)]
        space |= {"seeds": [0], "phase2": {**TINY["phase2"], "lr": {"grid": lrs}}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    out = tmp / f"out-{name}"
    start = time.perf_counter()
    code, err, cpu, peak = watched([str(BIN / "ntk-sweep"), "run", str(path), "--out", str(out)])
    if code != 0:
        sys.exit(f"ntk-sweep run failed ({code}):\n{err[-3000:]}")
    row = {"trials": n, "wall_s": time.perf_counter() - start, "cpu_s": sum(cpu.values()),
           **{f"cpu_s/{kind}": v for kind, v in cpu_by_kind(cpu).items()},
           "driver_peak_rss_bytes": peak}
    total_files = 0
    for part in PARTS:
        files, size = tree(out / part)
        row[f"files/{part}"], row[f"bytes/{part}"] = files, size
        total_files += files
    row["files"] = sum(1 for p in out.rglob("*") if p.is_file())
    row["files/other"] = row["files"] - total_files
    row["worker_rss_mb_per_trial"] = worker_memory_growth(out)
    log(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))
    return row


def worker_memory_growth(out: Path) -> float | None:
    """How a reused worker's resident memory grows from trial to trial (MiB a trial): the
    median over workers of the least-squares slope of ``memory/worker_rss_mb`` (a trial's final
    metric) against the worker's trial count, its first trial (imports, compilation) left
    out. None with fewer than 3 later trials on every worker."""
    from sweep.layout import read_trial_state

    by_worker: dict[int, list[tuple[int, float]]] = {}
    for directory in (out / "trials").iterdir():
        state = read_trial_state(directory)
        if state.final and state.heartbeat and "memory/worker_rss_mb" in state.final:
            finished = (directory / "state.json").stat().st_mtime_ns
            by_worker.setdefault(state.heartbeat["pid"], []).append(
                (finished, state.final["memory/worker_rss_mb"]))
    slopes = []
    for trials in by_worker.values():
        rss = [r for _, r in sorted(trials)][1:]
        if len(rss) >= 3:
            slopes.append(float(np.polyfit(np.arange(len(rss)), rss, 1)[0]))
    return round(float(np.median(slopes)), 2) if slopes else None


def trial_compute_s() -> float:
    """Seconds of JAX compute in one tiny trial: its programs' run times (timed after
    compiling, ``core/estimate.py``) times how often the trial runs them, kernels included."""
    from core.config import config_from_dict
    from core.estimate import for_sweep

    estimate = for_sweep([config_from_dict({**TINY, "seeds": [0]})], trials=1)
    return sum(estimate.seconds.values())


def trial_work_cpu_s(tmp: Path) -> float:
    """CPU seconds of one tiny trial's experiment and kernels in a warm process (the second of
    two runs: its programs compiled, its data loaded)."""
    from core.config import config_from_dict
    from core.experiment import run_experiment
    from core.trajectory_kernels import compute_trajectory_kernels
    from core.trajectory_store import TrajectoryStore

    cfg = config_from_dict({**TINY, "seeds": [0]})
    spent = []
    for attempt in range(2):
        out = tmp / f"warm-{attempt}"
        start = time.process_time()
        run_experiment(cfg, out)
        for trajectory in TrajectoryStore(out).of(cfg):
            compute_trajectory_kernels(trajectory, cfg.kernel)
        spent.append(time.process_time() - start)
    return spent[-1]


def compile_share(tmp: Path, quick: bool) -> dict:
    """Compilation over wall time of the digits experiment in a fresh process whose persistent
    compilation cache a first run filled (``benchmarks/compile_probe.py``)."""
    try:
        return compile_probe.compile_share(tmp, quick, env=ENV)
    except RuntimeError as e:
        sys.exit(str(e))


def report_reads_all_runs(tmp: Path, models: int = 60_000) -> dict:
    """A report over ``models`` evaluated-model runs (1,200 trials of 50) inserted straight
    into MLflow's SQLite tables: does it return every one, each once?"""
    sys.path.insert(0, str(ROOT))
    from sweep.review import mlflow_rows
    from tests.helpers import bulk_sweep

    uri = f"sqlite:///{tmp / 'big.db'}"
    trials = models // 50
    _, parent = bulk_sweep(uri, trials=trials, children=50)
    start = time.perf_counter()
    rows, found, _ = mlflow_rows(uri, "big", parent)
    distinct = len({(r["seed"], r["switch_epoch"]) for r in rows})
    return {"models": models, "rows": len(rows), "distinct": distinct, "trials": len(found),
            "seconds": time.perf_counter() - start,
            "all": len(rows) == distinct == models and len(found) == trials}


# One writer: what a trial of the digits grid writes, ``trials`` times over: 10 runs (a trial,
# two trajectories, seven evaluated models), each with 80 params, 12 final metrics and a
# 20-point curve, then closed; through the MLflow client, one request per call.
WRITER = """
import sys, time
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
exp, trials = sys.argv[2], int(sys.argv[3])
start = time.perf_counter()
for t in range(trials):
    for r in range(10):
        run = client.create_run(exp, tags={"kind": "bench"}).info.run_id
        now = int(time.time() * 1000)
        client.log_batch(run, params=[Param(f"p{i}", str(i)) for i in range(80)],
                         metrics=[Metric(f"m{i}", 0.5, now, 0) for i in range(12)])
        client.log_batch(run, metrics=[Metric("loss", 1.0 / (s + 1), now, s) for s in range(20)])
        client.set_terminated(run)
print(time.perf_counter() - start)
"""


def mlflow_writes(tmp: Path, writers: tuple[int, ...] = (1, 2, 8),
                  server_workers: tuple[int, ...] = (1, 4), trials: int = 5) -> list[dict]:
    """Write throughput of ``mlflow server`` on PostgreSQL (both on loopback, started here)
    with as many concurrent writer processes as trials a node runs at once (2 on this 2-core
    machine, 8 on an 8-GPU node), for 1 and 4 server worker processes."""
    sys.path.insert(0, str(ROOT))
    from mlflow.tracking import MlflowClient

    from tests.servers import mlflow_server, postgres_server

    found = []
    for workers in server_workers:
        with postgres_server() as database, mlflow_server(
                tmp / f"mlflow-{workers}", database.replace("postgresql://",
                                                            "postgresql+psycopg2://"),
                workers=workers) as uri:
            for n in writers:
                exp = MlflowClient(uri).create_experiment(f"bench-{n}")
                start = time.perf_counter()
                procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, exp, str(trials)],
                                          stdout=subprocess.PIPE, text=True, env=ENV)
                         for _ in range(n)]
                outs = [p.communicate()[0] for p in procs]
                wall = time.perf_counter() - start
                if any(p.returncode for p in procs):
                    sys.exit(f"an MLflow writer failed: {outs}")
                row = {"server_workers": workers, "writers": n, "wall_s": round(wall, 2),
                       "runs_per_s": round(n * trials * 10 / wall, 1),
                       "requests_per_s": round(n * trials * 10 * 4 / wall, 1),
                       "trial_writes_per_s": round(n * trials / wall, 2)}
                log(json.dumps(row))
                found.append(row)
    return found


def fit(rows: list[dict], key: str) -> tuple[float, float]:
    """(a, b) of key = a + b n over the sweeps."""
    b, a = np.polyfit([r["trials"] for r in rows], [r[key] for r in rows], 1)
    return float(a), float(b)


GRID_PROBE = """
import json, sys, time
from core.config import config_from_dict
from core.experiment import run_experiment
from core.trajectory_kernels import compute_trajectory_kernels
from core.trajectory_store import TrajectoryStore
cfg = config_from_dict(json.loads(sys.argv[1]))
start, cpu = time.perf_counter(), time.process_time()
run_experiment(cfg, sys.argv[2])
for trajectory in TrajectoryStore(sys.argv[2]).of(cfg):
    compute_trajectory_kernels(trajectory, cfg.kernel)
print(json.dumps({"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}))
"""


def grid_ratio(tmp: Path, quick: bool) -> dict:
    """The digits CNN grid (``digits-switch-point`` with seed 0: codes CC, AC, CA, AA, switch
    points 0, 1, 2, 5, 10, 30, kernels at every checkpoint) as a sweep of one trial per code
    (``ntk-sweep run``, a trial a core, trajectories shared through the store) against the
    same grid by ``run_experiment`` and the kernels in one process: wall seconds of each and
    their ratio (goal <= 0.55; 0.5 is the two-core limit). ``quick``: 5 phase-1 epochs, switch
    points 0, 1, 2, 5, 2 phase-2 epochs."""
    from core.config import read_config_file
    from search_spaces import resolve

    base = {**read_config_file(resolve("digits-switch-point")), "seeds": [0]}
    if quick:
        base["phase1"] = {**base["phase1"], "epochs": 5, "lr_decay_epochs": []}
        base["phase2"] = {**base["phase2"], "epochs": 2}
        base["switch_points"] = [0, 1, 2, 5]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", GRID_PROBE, json.dumps(base), str(tmp / "grid")],
                          cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"digits grid experiment failed:\n{done.stderr[-3000:]}")
    one_process = time.perf_counter() - start
    cpu = json.loads(done.stdout.strip().splitlines()[-1])["cpu_s"]
    log(f"digits grid in one process: {one_process:.1f} s, {cpu:.0f} CPU-s")
    space = {**base, "name": "grid", "codes": {"grid": [[c] for c in base["codes"]]},
             "sweep": {"resources": {"cpus": 1}}}
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(space))
    start = time.perf_counter()
    code, err, cpu_sweep, _ = watched([str(BIN / "ntk-sweep"), "run", str(path), "--out",
                                       str(tmp / "gs")])
    if code != 0:
        sys.exit(f"digits grid sweep failed:\n{err[-3000:]}")
    sweep = time.perf_counter() - start
    by_kind = cpu_by_kind(cpu_sweep)
    log(f"digits grid as a sweep: {sweep:.1f} s, CPU-s by process: {by_kind}")
    # The sweep cannot end before the one process's CPU-seconds spread over every core: where
    # XLA's intra-op threads already keep both cores busy, that floor is near 1, not 0.5.
    floor = cpu / (os.cpu_count() or 1) / one_process
    # The models of switch step 0 the trials computed (the rest they copied): 3 (the
    # network, loaders C and A) when no trial computes one another has.
    from core.pack import Pack

    initial = sum(k[0] == "initial" for p in (tmp / "gs" / "trajectories").glob(
        "*/trajectory.pack") for k in Pack(p).entries())
    return {"one_process_s": one_process, "one_process_cpu_s": cpu, "sweep_s": sweep,
            "sweep_cpu_s": sum(by_kind.values()), "sweep_cpu_s_by_process": by_kind,
            "ratio": sweep / one_process, "floor": floor,
            "sweep_models_of_step0_computed": initial}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sweeps of 4, 8 and 16 trials")
    parser.add_argument("--sweeps-only", action="store_true",
                        help="only the per-trial costs (for a before/after comparison)")
    parser.add_argument("--grid-only", action="store_true",
                        help="only the digits grid, sweep against one process")
    parser.add_argument("--compile-only", action="store_true",
                        help="only the compilation share of the digits experiment")
    args = parser.parse_args()
    sizes = [4, 8, 16] if args.quick else [8, 32, 128]
    if args.compile_only:
        with tempfile.TemporaryDirectory(prefix="ntk-scale-") as name:
            compiled = compile_share(Path(name), args.quick)
        print(json.dumps({"benchmark": "scale", "quick": args.quick, "cpus": os.cpu_count(),
                          "compile": compiled, "goals": [_compile_goal(compiled)]}, indent=1))
        return
    if args.grid_only:
        with tempfile.TemporaryDirectory(prefix="ntk-scale-") as name:
            grid = grid_ratio(Path(name), args.quick)
        print(json.dumps({"benchmark": "scale", "quick": args.quick, "cpus": os.cpu_count(),
                          "grid": grid, "goals": _grid_goals(grid)}, indent=1))
        return
    with tempfile.TemporaryDirectory(prefix="ntk-scale-") as name:
        tmp = Path(name)
        log("a tiny trial's own work, warm")
        work, compute = trial_work_cpu_s(tmp), trial_compute_s()
        rows, shared = [], []
        for n in sizes:
            log(f"sweep of {n} trials")
            rows.append(run_sweep(n, tmp))
        for n in sizes:
            log(f"sweep of {n} trials sharing their trajectories")
            shared.append(run_sweep(n, tmp, shared=True))
        compiled, report, writes = {"share": float("nan")}, {"all": None}, []
        grid = {"ratio": float("nan")}
        if not args.sweeps_only:
            log("the digits grid: a sweep against one process")
            grid = grid_ratio(tmp, args.quick)
            log("compilation share of the digits experiment")
            compiled = compile_share(tmp, args.quick)
            log("a report over 60,000 runs")
            report = report_reads_all_runs(tmp)
            log("MLflow write throughput on PostgreSQL")
            writes = mlflow_writes(tmp)
    keys = ["wall_s", "cpu_s", "files", "driver_peak_rss_bytes",
            *(f"files/{p}" for p in (*PARTS, "other")), *(f"bytes/{p}" for p in PARTS)]
    per_trial = {k: round(fit(rows, k)[1], 4) for k in keys}
    per_shared_trial = {k: round(fit(shared, k)[1], 4) for k in keys}
    overhead = per_trial["cpu_s"] - compute
    print(json.dumps({
        "benchmark": "scale", "quick": args.quick, "machine": platform.machine(),
        "cpus": os.cpu_count(), "sweeps": rows, "per_trial": per_trial,
        "sweeps_sharing_trajectories": shared, "per_trial_sharing_trajectories": per_shared_trial,
        "trial_work_cpu_s": round(work, 3),
        "worker_rss_mb_per_trial": rows[-1]["worker_rss_mb_per_trial"],
        "trial_compute_s": round(compute, 3), "compile": compiled, "report": report,
        "mlflow_writes_postgres": writes, "grid": grid,
        "goals": [
            {"name": "overhead_cpu_s_per_trial", "value": round(overhead, 3), "target": 1.5,
             "met": overhead <= 1.5},
            {"name": "files_per_trial", "value": per_trial["files"], "target": 12,
             "met": per_trial["files"] <= 12},
            {"name": "files_per_trial_sharing_trajectories",
             "value": per_shared_trial["files"], "target": 12,
             "met": per_shared_trial["files"] <= 12},
            _compile_goal(compiled),
            {"name": "report_reads_all_runs", "value": report["all"], "target": True,
             "met": report["all"]},
            *_grid_goals(grid),
        ],
    }, indent=1))


def _compile_goal(compiled: dict) -> dict:
    return {"name": "compile_share_digits_experiment", "value": round(compiled["share"], 4),
            "target": 0.03, "met": compiled["share"] <= 0.03}


def _grid_goals(grid: dict) -> list[dict]:
    """The issue's goal (0.55, set when 0.5 was taken to be two cores' limit) and the sweep
    against the floor measured in the same run (``grid_ratio``): within 10 %."""
    ratio, floor = grid["ratio"], grid.get("floor", float("nan"))
    return [{"name": "digits_grid_sweep_vs_one_process", "value": round(ratio, 3),
             "target": 0.55, "met": ratio <= 0.55},
            {"name": "digits_grid_sweep_vs_two_core_floor", "value": round(ratio / floor, 3),
             "target": 1.1, "met": ratio / floor <= 1.1}]


if __name__ == "__main__":
    main()
