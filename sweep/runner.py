"""``ntk-sweep run``: a sweep as Ray Tune trials, recorded in MLflow.

One trial is one sampled experiment config with one seed: it trains (or reuses) a phase-1
trajectory per data mode and runs phase 2 from every switch point of every loader code, so
switch runs that share a trajectory never train its epochs twice. Trajectories are stored
under ``<out>/trajectories`` by content hash: trials, and later sweeps over the same output,
that need a stored trajectory continue from its checkpoints (a file lock serialises trials
that share one).

MLflow (``MLFLOW_TRACKING_URI``, default ``sqlite:///<out>/mlflow.db``): one experiment per
sweep name, a parent run for the sweep, a child run per trial (phase-1 and phase-2 losses and
accuracies per epoch, with steps) and, under it, a child run per evaluated model tagged with
code, dynamics, switch epoch, seed, dataset and model. Ray: ``RAY_ADDRESS`` or a local cluster;
trial results under ``<out>/ray`` unless ``NTK_SWEEP_STORAGE`` names another storage path.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from core.config import RESULT_METRICS, ConfigError, config_from_dict, is_network
from core.experiment import Hooks, Stage, run_experiment
from core.kernels import MEASURES
from core.timing import since, snapshot, timed
from core.train import Divergence
from sweep.claims import claim_tags, read_claims
from sweep.space import SweepSpace, substitute, to_param_space
from sweep.tracking import (
    StateFileError,
    Tracker,
    TrackingStoreLost,
    kernel_step,
    read_json,
    read_record,
    write_json,
)

TRIAL_ENV = {
    # Trials sharing a GPU must not grab each other's memory; TF stays quiet.
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    # A failed MLflow request returns at once: the trial's tracker queues and retries it.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
CONTEXT_KEY = "_ntk_sweep"


def tracking_uri(out: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').absolute()}"


def _summary_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Means over the trial's phase-2 runs so far (what Tune compares)."""
    phase2 = [r for r in rows if not is_network(r["code"])]
    out: dict[str, float] = {}
    for key in RESULT_METRICS:
        vals = [r[key] for r in phase2 if not math.isnan(r[key])]
        if vals:
            out[key] = statistics.fmean(vals)
    return out


TRIAL_STATE = "trial.json"  # in the trial's Tune checkpoint: its MLflow run id
FINAL_STATE = "final.json"  # in <out>/trials/<trial id>/ once the trial has finished
VARIANT_FILE = "variant.json"  # in <out>/trials/<trial id>/: its sampled values but the seed
FAILED_STATE = "failed.json"  # in <out>/trials/<trial id>/ when it diverged
PENDING_WRITES = "pending_mlflow_writes.json"  # MLflow writes an attempt could not deliver
HEARTBEAT = "heartbeat.json"


def format_variant(values: dict[str, Any]) -> str:
    """``phase1.attack.eps=0.1, phase2.lr=0.01``: a trial's sampled values but the seed."""
    return ", ".join(f"{p}={v:.4g}" if isinstance(v, float) else f"{p}={v}"
                     for p, v in sorted(values.items()) if p != "seeds")


def variant_label(trial_dir: Path) -> str:
    """The ``format_variant`` of the trial whose directory is ``trial_dir`` (StateFileError if
    its file is damaged)."""
    path = trial_dir / VARIANT_FILE
    return format_variant(read_json(path) if path.is_file() else {})


RESULT_ROW = {"seed": int, "code": str, "switch_epoch": (int, float), "switch_rule": str,
              "accuracy": (int, float), "robust_linf": (int, float)}  # in every version's rows


def read_results(path: Path) -> dict[str, Any]:
    """A trial's ``results.json`` (its config and result rows), checked: StateFileError naming
    the file and what is wrong. A result metric an older version did not report (e.g.
    ``worst_linf``) reads as NaN (shown as "-"), so a sweep resumed across an upgrade keeps
    its finished trials."""
    data = read_record(path, {"config": dict, "rows": list})
    for i, row in enumerate(data["rows"]):
        if not isinstance(row, dict):
            raise StateFileError(f"{path}: rows[{i}]: not a mapping")
        for key in (*RESULT_ROW, *RESULT_METRICS):
            value = row.get(key) if key in RESULT_ROW else row.setdefault(key, float("nan"))
            if not isinstance(value, RESULT_ROW.get(key, (int, float))) or isinstance(value, bool):
                raise StateFileError(f"{path}: rows[{i}].{key}: missing or not what ntk-sweep "
                                     "wrote")
    return data


def _report_with_state(metrics: dict[str, Any], state: dict[str, Any]) -> None:
    """Reports to Tune with a checkpoint holding ``state`` (the trial's MLflow run id): a
    retried or restored trial continues the same run (its training state lives in the
    content-hashed trajectory store). Tune persists the
    checkpoint before ``report`` returns, so the temporary directory goes away after."""
    import tempfile

    from ray import tune

    with timed("report"), tempfile.TemporaryDirectory(prefix="ntk-sweep-trial-") as directory:
        (Path(directory) / TRIAL_STATE).write_text(json.dumps(state))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def _report(metrics: dict[str, Any]) -> None:
    from ray import tune

    with timed("report"):
        tune.report(metrics)


def _restored_state() -> dict[str, Any] | None:
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return json.loads((Path(directory) / TRIAL_STATE).read_text())


class TrialFailed(RuntimeError):
    """A trial that cannot succeed by retrying as is (diverged; tracking unreachable)."""


def _heartbeat(trial_dir: Path, stage: str, epoch: int, pending: int) -> None:
    """``heartbeat.json``: the worker's PID and node, the stage and epoch just finished, and
    how many MLflow writes wait for the server (``ntk-sweep status`` shows it)."""
    import ray

    write_json(trial_dir / HEARTBEAT, {
        "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "stage": stage,
        "epoch": epoch, "pending_writes": pending, "time": time.time()})


def _run_name(r: dict[str, Any]) -> str:
    rule = f" ({r['switch_rule']})" if r["switch_rule"] else ""
    return f"{r['code']} t={r['switch_epoch']:g}{rule} seed {r['seed']}"


def trial(config: dict[str, Any]) -> None:
    """One Ray Tune trial (runs in a Ray worker).

    Reports to Tune after every epoch (training loss and accuracy) and after every evaluated
    model (running means of the evaluation metrics, ``models_evaluated``: ASHA's time axis).
    A retried trial continues its MLflow run and logs no (metric, step) twice.
    """
    from ray import tune

    from core.experiment import trajectory_id

    started, before = time.perf_counter(), snapshot()
    ctx = config[CONTEXT_KEY]
    values = {path: config[path] for path in ctx["paths"]}
    cfg = config_from_dict(substitute(ctx["base"], values), "trial")
    trial_id = tune.get_context().get_trial_id() or "trial"
    out = Path(ctx["out"])
    tracker = Tracker(ctx["tracking_uri"], buffered=True, existing=True)
    trial_dir = out / "trials" / trial_id
    done = trial_dir / FINAL_STATE
    if done.is_file():  # finished before its driver went away: report, do not run again
        _report(read_record(done, {"final": dict})["final"])
        return
    failed = trial_dir / FAILED_STATE
    pending = trial_dir / PENDING_WRITES
    if failed.is_file():  # diverged before: deterministic, so fail again at once
        if tracker.load_pending(pending):  # its FAILED status and error tag, if undelivered
            tracker.flush(60.0)
            tracker.save_pending(pending)
        raise TrialFailed(read_record(failed, {"error": str})["error"])
    restored = _restored_state()
    if restored is not None:
        run = restored["run_id"]
        tracker.reopen(run)
        seen = tracker.logged(run)
        children, unfinished = tracker.children(run)
        # Writes an earlier attempt could not deliver go first, and are not made again.
        tracker.load_pending(pending)
        # A child run the server already has (an attempt that died after creating it) is
        # not created again.
        tracker.pending = [op for op in tracker.pending
                           if not (op["kind"] == "child" and "run" not in op
                                   and op["name"] in children)]
        for op in tracker.pending:
            # One it created but did not finish: completed, not made again.
            if op["kind"] == "child" and "run" not in op and op["name"] in unfinished:
                op["run"], has = unfinished[op["name"]]
                op["metrics"] = [m for m in op["metrics"] if m[0] not in has]
            seen |= {(m[0], m[3]) for m in op.get("metrics", ()) if op.get("run") == run}
            if op["kind"] == "child":
                children[op["name"]] = op.get("run", "pending")
        tracker.flush(0.0)
        tracker.save_pending(pending)  # what is left, so no later attempt sends it twice
    else:
        import ray

        seed = cfg.seeds[0]
        tags = {"kind": "trial", "dataset": cfg.dataset.name, "model": cfg.model.name,
                "seed": seed, "trial_id": trial_id,
                "ray_node": ray.get_runtime_context().get_node_id(),
                **{f"trajectory/{m}": trajectory_id(cfg, m, seed)
                   for m in cfg.phase1_modes}}
        run = tracker.start(ctx["experiment_id"], trial_id, tags, parent=ctx["parent_run"])
        tracker.params(run, {path: value for path, value in values.items()})
        seen, children, unfinished = set(), {}, {}
        _report_with_state({"models_evaluated": 0}, {"run_id": run})
    trained = {"phase1_epochs": 0}
    steps = {"done": 0, "planned": 0}
    rows: list[dict[str, Any]] = []

    def progress() -> float:
        return min(steps["done"] / steps["planned"], 0.999) if steps["planned"] else 0.0

    def on_step() -> None:
        steps["done"] += 1

    def on_epoch(stage: Stage, epoch: int, metrics: dict[str, float]) -> None:
        if stage.phase == 1:
            trained["phase1_epochs"] += 1
        name = f"phase{stage.phase}/{stage.code}/s{stage.seed}" + (
            f"/t{stage.switch_step}" if stage.phase == 2 else "")
        tracker.log(run, {f"{name}/{k}": v for k, v in metrics.items()}, step=epoch, skip=seen)
        _heartbeat(trial_dir, name, epoch, len(tracker.pending))
        tracker.save_pending(pending)  # undelivered writes survive a killed worker
        _report({"stage": name, "epoch": epoch, "progress": progress(),
                 "train_loss": metrics["loss"], "train_accuracy": metrics["accuracy"],
                 "models_evaluated": len(rows), **_summary_metrics(rows)})

    def on_result(r: dict[str, Any]) -> None:
        rows.append(r)
        # A retried trial does not log a model twice; it completes one an attempt left empty.
        if _run_name(r) not in children:
            tracker.child(
                ctx["experiment_id"], _run_name(r),
                {"kind": "switch_run" if not is_network(r["code"]) else "network",
                 "code": r["code"], "dynamics": r["dynamics"], "switch_epoch": r["switch_epoch"],
                 "switch_rule": r["switch_rule"], "seed": r["seed"],
                 "dataset": cfg.dataset.name, "model": cfg.model.name,
                 "masked": str(bool(r.get("masked"))).lower()},
                run, {k: r[k] for k in RESULT_METRICS if not math.isnan(r[k])},
                existing=unfinished.get(_run_name(r)))
            children[_run_name(r)] = "pending"
        if r["switch_rule"] and is_network(r["code"]):  # once per trajectory
            tracker.log(run, {f"switch_rule/{r['code'][0]}/epoch": r["switch_epoch"]},
                        skip=seen)
        tracker.save_pending(pending)
        _report({"models_evaluated": len(rows), "progress": progress(),
                 **_summary_metrics(rows)})

    trial_dir.mkdir(parents=True, exist_ok=True)
    write_json(trial_dir / VARIANT_FILE, {p: v for p, v in values.items() if p != "seeds"})
    try:
        hooks = Hooks(on_epoch=on_epoch, on_result=on_result, on_step=on_step,
                      planned_steps=lambda n: steps.__setitem__("planned", n))
        run_experiment(cfg, trial_dir, hooks, store_root=out)
        for name in ("results.csv", "summary.md"):
            tracker.artifact(run, trial_dir / name)
        if cfg.kernel.enabled:
            for path in log_kernels(tracker, run, cfg, out, trial_dir, seen):
                tracker.artifact(run, path)
        spent = since(before)
        metrics = {**_summary_metrics(rows), "phase1_epochs_trained": trained["phase1_epochs"],
                   "time/trial_s": time.perf_counter() - started,
                   **{f"time/{k}_s": spent.get(k, 0.0)
                      for k in ("mlflow", "checkpoint", "report")}}
        tracker.log(run, metrics, skip=seen)
        tracker.end(run)
        if not tracker.flush():
            raise TrialFailed(f"MLflow at {tracker.uri} stayed unreachable; "
                              f"{len(tracker.pending)} writes kept in {pending} for the retry")
    except Divergence as e:  # the trial ends as an error naming phase, epoch, step, cause
        write_json(failed, {"error": str(e)})
        tracker.tags(run, {"error": str(e)[:5000]})
        tracker.end(run, "FAILED")
        try:
            tracker.flush(60.0)
        finally:
            tracker.save_pending(pending)
        raise TrialFailed(str(e)) from None
    except BaseException:
        try:
            tracker.flush(0.0)
        finally:
            tracker.save_pending(pending)  # a retry delivers them
        raise
    pending.unlink(missing_ok=True)
    final = {**metrics, "models_evaluated": len(rows), "finished": 1, "progress": 1.0}
    write_json(done, {"run_id": run, "final": final})  # the trial is finished from here
    _report(final)




def log_kernels(tracker: Tracker, run: str, cfg, store_root: Path, trial_dir: Path,
                seen: set[tuple[str, int]] | None = None) -> list[Path]:
    """Kernels of the trial's phase-1 trajectories at every checkpoint (computed once per
    trajectory and stored with it), their measures as metrics ``kernel/<mode>/<measure>`` and
    the distances between the trial's trajectories (``kernel/cross/<modes>/distance``), with
    step = epoch x 1000. The kernel files at the switch points and the last checkpoint (the
    kernels phase 2 trains with) become artifacts ``kernels/<mode>/``. Returns the plots
    written under ``trial_dir`` (distance curves, one epoch-by-epoch heatmap per trajectory)."""
    import numpy as np

    from core.experiment import trajectory_id
    from core.trajectory_kernels import (
        TrajectoryInfo,
        compute_trajectory_kernels,
        cross_trajectory_distances,
        trajectory_measures,
    )
    from sweep.plots import kernel_distance_plot, trajectory_heatmap

    seed = cfg.seeds[0]
    infos = []
    for mode in sorted({code[0] for code in cfg.codes}):
        tid = trajectory_id(cfg, mode, seed)
        directory = store_root / "trajectories" / tid
        if (directory / "trajectory.json").is_file():  # the trial's config determines it
            infos.append(TrajectoryInfo(tid, mode, seed, directory, cfg))
    trajectories, stores = {}, {}
    for info in infos:
        stores[info.mode] = compute_trajectory_kernels(info, cfg.kernel)
        epochs = stores[info.mode].epochs()
        first = stores[info.mode].load(epochs[0])
        rows = trajectory_measures(stores[info.mode], len(np.unique(first.labels)))
        trajectories[info.id] = {"mode": info.mode, "seed": seed, "rows": rows}
        for r in rows:
            tracker.log(run, {f"kernel/{info.mode}/{k}": r[k] for k in MEASURES},
                        step=kernel_step(r["epoch"]), skip=seen)
        for epoch in sorted({*cfg.switch_points, epochs[-1]} & set(epochs)):
            tracker.artifact(run, stores[info.mode].path(epoch), f"kernels/{info.mode}")
    modes = sorted(stores)
    for i, a in enumerate(modes):
        for b in modes[i + 1:]:
            for r in cross_trajectory_distances(stores[a], stores[b]):
                tracker.log(run, {f"kernel/cross/{a}{b}/distance": r["distance"]},
                            step=kernel_step(r["epoch"]), skip=seen)
    if not trajectories:
        return []
    plots = [kernel_distance_plot(trajectories, trial_dir / "kernel_distances.png")]
    for mode, store in stores.items():
        plots.append(trajectory_heatmap(store, f"kernel distances, {mode} seed {seed}",
                                        trial_dir / f"kernel_heatmap_{mode}.png"))
    return plots


SWEEP_STATE = "sweep.json"


def _local_path(location: str) -> tuple[str, Path | None]:
    """(``sqlite:///`` or "", the file path) of a local location; (location, None) for a
    URI of anything else (``s3://``, ``http://``)."""
    prefix = "sqlite:///" if location.startswith("sqlite:///") else ""
    path = location[len(prefix):]
    return (location, None) if "://" in path else (prefix, Path(path))


def portable(out: Path, location: str) -> str:
    """``location`` (a path, or a ``sqlite:///`` URI) as ``sweep.json`` keeps it: relative to
    ``out`` when inside it, so that a copied or moved output directory reads its own Ray
    storage and MLflow database, never the original's. Other locations stay as they are."""
    prefix, path = _local_path(location)
    if path is None or not path.is_absolute() or not path.is_relative_to(out):
        return location
    return prefix + str(path.relative_to(out))


def resolved(out: Path, location: str) -> str:
    """The inverse of ``portable`` for the output directory ``out`` the state was read from."""
    prefix, path = _local_path(location)
    if path is None or path.is_absolute():
        return location
    return prefix + str(out.absolute() / path)


def _storage(out: Path) -> str:
    return os.environ.get("NTK_SWEEP_STORAGE") or str(out / "ray")


def _init_ray() -> None:
    """``RAY_ADDRESS`` when set, else a new local instance: never Ray's own fallback of
    attaching to whatever cluster ``ray start`` last left running on this machine."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 runtime_env={"env_vars": TRIAL_ENV}, log_to_driver=False)


def _allow_reports_without_metric(space: SweepSpace) -> None:
    """With ASHA: epoch reports carry training loss only, evaluation reports the metric, and
    ASHA skips results without it; Tune's strict check would refuse the former."""
    if space.settings.scheduler == "asha":
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"


def models_per_trial(space: SweepSpace) -> int:
    """Evaluated models of the largest trial (phase-1 networks and phase-2 runs), for
    progress and ASHA's time axis."""
    def models(cfg) -> int:
        switches = len(cfg.switch_points) + (cfg.switch_rule is not None)
        return switches * (len(cfg.codes) + len(cfg.phase1_modes))

    return max(models(cfg) for cfg in space.configs())


def run_sweep(space: SweepSpace, out: Path, name: str | None = None) -> list[dict[str, Any]]:
    """Runs every trial of ``space``; returns one record per trial (config values, metrics).

    Writes ``<out>/sweep.json`` first (the space, the MLflow parent run, the Tune experiment),
    so that ``resume_sweep`` can finish an interrupted sweep.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    settings = space.settings
    name = name or space.base.get("name") or "sweep"
    tracker = Tracker(tracking_uri(out))
    experiment_id = tracker.experiment(name, out / "mlartifacts")
    parent = tracker.start(experiment_id, f"{name} sweep", {"kind": "sweep"})
    context = {"base": space.base, "paths": list(space.distributions), "out": str(out),
               "tracking_uri": tracker.uri, "experiment_id": experiment_id,
               "parent_run": parent}
    state = {"name": name, "space": space.raw, "storage": _storage(out),
             "tracking_uri": tracker.uri, "experiment_id": experiment_id, "parent_run": parent}
    stored = {**state, "out": str(out), "storage": portable(out, state["storage"]),
              "tracking_uri": portable(out, tracker.uri)}
    try:  # a sweep that cannot start must not leave its parent run RUNNING forever
        (out / SWEEP_STATE).write_text(json.dumps(stored, indent=1))
        _init_ray()
        scheduler = None
        _allow_reports_without_metric(space)
        if settings.scheduler == "asha":
            # max_t one above the models of a trial: reaching max_t means STOP, which would
            # cut a trial off after its last evaluation, before its kernels and final report.
            scheduler = ASHAScheduler(time_attr="models_evaluated", metric=settings.metric,
                                      mode=settings.mode, max_t=models_per_trial(space) + 1,
                                      grace_period=1)
        tuner = tune.Tuner(
            _trainable(space),
            param_space={**to_param_space(space), CONTEXT_KEY: context},
            tune_config=tune.TuneConfig(
                num_samples=settings.num_samples, scheduler=scheduler,
                max_concurrent_trials=settings.max_concurrent_trials or None,
            ),
            run_config=_run_config(space, name, state["storage"]),
        )
    except BaseException:
        tracker.end(parent, "FAILED")
        raise
    return _finish(tuner, space, out, tracker, parent)


def _trainable(space: SweepSpace):
    from ray import tune

    resources = space.settings.resources
    return tune.with_resources(trial, {"cpu": resources.cpus, "gpu": resources.gpus})


def _run_config(space: SweepSpace, name: str, storage: str):
    from ray import tune

    from sweep.progress import SweepProgress

    return tune.RunConfig(
        name=name, storage_path=storage, verbose=0,
        failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
        callbacks=[SweepProgress(space.trial_count(), models_per_trial(space),
                                 space.settings.metric, space.settings.mode)],
    )


MAX_FAILURES = 3  # retries of a trial whose worker died (preemption, OOM kill, lost node)


def resume_sweep(out: Path) -> tuple[SweepSpace, list[dict[str, Any]]]:
    """Finishes the sweep recorded in ``<out>/sweep.json``: Tune restores its experiment,
    finished trials are kept, unfinished and failed ones run again (continuing their MLflow
    runs and stored trajectories), and the parent run gets the summary."""
    from ray import tune

    from sweep.inspect import resumable_sweep

    out = out.absolute()
    state, space = resumable_sweep(out)  # checked: ConfigError naming the file and the problem
    tracker = Tracker(state["tracking_uri"], existing=True)
    tracker.reopen(state["parent_run"])
    _allow_reports_without_metric(space)
    _init_ray()
    path = f"{state['storage'].rstrip('/')}/{state['name']}"
    tuner = tune.Tuner.restore(path, _trainable(space), resume_unfinished=True,
                               resume_errored=True)
    return space, _finish(tuner, space, out, tracker, state["parent_run"])


def _trial_id_of(path: str | None) -> str:
    """The trial id in a Tune trial directory name (``trial_<id>_<n>_<params>_<date>``)."""
    name = Path(path or "").name
    parts = name.split("_")
    return f"{parts[1]}_{parts[2]}" if len(parts) > 2 and parts[0] == "trial" else ""


def _close_run(tracker: Tracker, result, status: str, tags: dict[str, str]) -> None:
    """Ends the MLflow run of a trial that did not end it itself (stopped by the scheduler:
    KILLED; failed for good: FAILED) if it is still running; its run id is in the trial's
    Tune checkpoint."""
    if result.checkpoint is None:
        return
    with result.checkpoint.as_directory() as directory:
        run = json.loads((Path(directory) / TRIAL_STATE).read_text())["run_id"]
    if tracker.status(run) == "RUNNING":
        tracker.tags(run, tags)
        tracker.end(run, status)


def _finish(tuner, space: SweepSpace, out: Path, tracker: Tracker,
            parent: str) -> list[dict[str, Any]]:
    try:
        grid = tuner.fit()
    except Exception as e:  # Ray's own failure (e.g. a worker OOM-killed while it restarts)
        import traceback

        tracker.end(parent, "FAILED")
        log = out / "driver-error.log"
        log.write_text("".join(traceback.format_exception(e)))
        lines = str(e).strip().splitlines() or [""]
        raise SweepInterrupted(
            f"Ray Tune stopped the sweep ({type(e).__name__}: {lines[0][:300]}; traceback in "
            f"{log}). Finished trials are kept: continue with 'ntk-sweep resume {out}'") from e
    except BaseException:
        tracker.end(parent, "FAILED")
        raise
    records, results = [], []  # one per trial, in the same order
    for result in grid:
        values = {p: result.config[p] for p in space.distributions}
        metrics = {k: v for k, v in (result.metrics or {}).items()
                   if k in (*RESULT_METRICS, "phase1_epochs_trained", "models_evaluated",
                            "finished")
                   or k.startswith("time/")}
        trial_id = (result.metrics or {}).get("trial_id") or _trial_id_of(result.path)
        stopped = not result.error and not (out / "trials" / trial_id / FINAL_STATE).is_file()
        results.append(result)
        records.append({**values, **metrics, "trial_id": trial_id,
                        "error": str(result.error or ""), "stopped_early": stopped})
    # Only this sweep's trials: an output directory may hold earlier sweeps' trials too
    # (trajectories are shared across sweeps; tables and distances are not). The summary
    # comes from the trial files first, so that a lost MLflow store cannot keep it back.
    own = [r["trial_id"] for r in records]
    summary = write_sweep_summary(out, own, {r["trial_id"]: r["error"] for r in records})
    try:
        for r, result in zip(records, results, strict=True):
            if r["stopped_early"]:  # ended by the scheduler (ASHA): its MLflow run says so
                _close_run(tracker, result, "KILLED", {"stopped_by": space.settings.scheduler})
            elif r["error"]:
                _close_run(tracker, result, "FAILED", {"error": r["error"][-5000:]})
        tracker.log(parent, {"trials": len(records),
                             "trials_failed": sum(bool(r["error"]) for r in records),
                             "trials_stopped_early": sum(r["stopped_early"] for r in records)})
        for path in summary:
            tracker.artifact(parent, path)
        if (out / "claims.json").is_file():
            tracker.tags(parent, claim_tags(read_claims(out)))
        for path in log_cross_trajectories(tracker, parent, out, own):
            tracker.artifact(parent, path)
        tracker.end(parent)
    except TrackingStoreLost as e:
        raise SweepTrackingLost(str(e), records) from e
    return records


class SweepInterrupted(RuntimeError):
    """Ray Tune itself failed (not a trial): the message says how to go on (``resume``)."""


class SweepTrackingLost(RuntimeError):
    """The sweep ran, its summary is written from the trial files, but its local MLflow
    database went away: ``records`` are the trials, as ``run_sweep`` returns them."""

    def __init__(self, message: str, records: list[dict[str, Any]]):
        super().__init__(message)
        self.records = records


def trial_files(out: Path, trials: Collection[str], name: str) -> list[Path]:
    """``out/trials/<id>/<name>`` of the given trials that have that file, by id."""
    paths = (out / "trials" / t / name for t in sorted(set(trials)))
    return [p for p in paths if p.is_file()]


def log_cross_trajectories(tracker: Tracker, parent: str, out: Path,
                           trials: Collection[str]) -> list[Path]:
    """Kernel distances between the sweep's trajectories, on the parent run: for every pair
    of trajectories (data mode x seed) of one phase-1 configuration, S(K^a_t, K^b_t) at their
    common checkpoints as ``kernel/cross/<mode><seed>-<mode><seed>/distance`` (step = epoch x
    1000, a configuration prefix when the sweep varies it), and one matrix plot per
    configuration at the last common epoch. Seed vs seed shows how much of a kernel's
    evolution is the data mode rather than the initialisation."""
    import numpy as np

    from core.experiment import trajectory_id
    from core.kernel_store import KernelTrajectory
    from core.trajectory_kernels import (
        cross_trajectory_distances,
        kernel_directory,
    )
    from sweep.plots import heatmap_plot

    # One family per phase-1 configuration and kernel setting (what a trial varies apart from
    # the seed): its trajectories differ only in data mode and seed.
    families: dict[str, dict[str, KernelTrajectory]] = {}
    labels: dict[str, str] = {}
    for path in trial_files(out, trials, "results.json"):
        try:
            cfg = config_from_dict(read_results(path)["config"], str(path))
            label = variant_label(path.parent)
        except (StateFileError, ConfigError):
            continue  # listed among the failed trials by trial_outcomes
        if not cfg.kernel.enabled:
            continue
        family = json.dumps([cfg.dataset.model_dump(mode="json"),
                             cfg.model.model_dump(mode="json"),
                             cfg.phase1.model_dump(mode="json", exclude={"epochs"}),
                             cfg.kernel.model_dump(mode="json")], sort_keys=True)
        labels.setdefault(family, label)
        seed = cfg.seeds[0]
        for mode in cfg.phase1_modes:
            directory = out / "trajectories" / trajectory_id(cfg, mode, seed)
            store = KernelTrajectory(kernel_directory(directory, cfg.kernel))
            if store.epochs():
                families.setdefault(family, {})[f"{mode}{seed}"] = store
    plots = []
    for index, (family, stores) in enumerate(sorted(families.items())):
        names = sorted(stores)
        if len(names) < 2:
            continue
        prefix = f"config{index}/" if len(families) > 1 else ""
        if prefix:  # metric names cannot hold the variant ('='): a tag says which it is
            tracker.tags(parent, {f"kernel/cross/config{index}": labels[family]})
        matrix = np.zeros((len(names), len(names)))
        for i, a in enumerate(names):
            for j in range(i + 1, len(names)):
                b = names[j]
                rows = cross_trajectory_distances(stores[a], stores[b])
                for r in rows:
                    tracker.log(parent, {f"kernel/cross/{prefix}{a}-{b}/distance": r["distance"]},
                                step=kernel_step(r["epoch"]))
                matrix[i, j] = matrix[j, i] = rows[-1]["distance"] if rows else np.nan
        plots.append(heatmap_plot(
            names, matrix, "kernel distance between trajectories (last common epoch)"
            + (f"\n{labels[family]}" if labels[family] else ""),
            out / f"cross_trajectory{index if len(families) > 1 else ''}.png",
            axis="trajectory (data mode, seed)"))
    return plots


def trial_outcomes(out: Path, trials: Collection[str]
                   ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """What the given trials left: every result row of those that finished (with its
    ``variant``), and the failures: trials that ended as errors of their own (divergence:
    the error names phase, epoch, step and cause) and trials whose files are damaged (named
    with what is wrong; never left out of a summary silently). Unfinished trials give none."""
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    for trial_id in sorted(set(trials)):
        directory = out / "trials" / trial_id
        results, error = directory / "results.json", directory / FAILED_STATE
        try:
            variant = variant_label(directory)
            if results.is_file():
                rows += [{**r, "variant": variant} for r in read_results(results)["rows"]]
            elif error.is_file():
                failed.append({"trial": trial_id, "variant": variant,
                               "error": read_record(error, {"error": str})["error"]})
        except StateFileError as e:
            failed.append({"trial": trial_id, "variant": "", "error": f"damaged file: {e}"})
    return rows, failed


def write_sweep_summary(out: Path, trials: Collection[str],
                        errors: dict[str, str] | None = None) -> list[Path]:
    """The sweep's summary over its trials (mean ± std over seeds): CSV, Markdown (with the
    failed trials listed under it) and the accuracy-against-switch-point plot, under ``out``.
    ``errors``: trials that failed without a file of their own saying why (Ray's error, e.g.
    a lost tracking store), by id; their last line is listed."""
    from core.results import summarize, write_summary
    from sweep.claims import record_claims, sweep_studies
    from sweep.plots import switch_point_plot

    rows, failed = trial_outcomes(out, trials)
    listed = {f["trial"] for f in failed}
    failed += [{"trial": t, "variant": "", "error": e.strip().splitlines()[-1][:500]}
               for t, e in sorted((errors or {}).items()) if t not in listed and e.strip()]
    notes = "".join(f"\n- trial {f['trial']}" + (f" ({f['variant']})" if f["variant"] else "")
                    + f": {f['error']}" for f in failed)
    notes = f"\nFailed trials:\n{notes}\n" if failed else ""
    if not rows:
        if failed:
            (out / "summary.md").write_text(notes)
            return [out / "summary.md"]
        return []
    summary = summarize(rows)
    paths = [*write_summary(out, summary, notes),
             switch_point_plot(summary, out / "switch_point.png")]
    record_claims(out, sweep_studies(out, list(trials)))  # after summary.md: its last section
    return [*paths, out / "claims.md", out / "claims.json"]
