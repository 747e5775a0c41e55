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
import logging
import os
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import RESULT_METRICS, ConfigError
from core.trajectory_store import LocksNotEnforced, TrajectoryStore, check_locking
from sweep.claims import claim_tags
from sweep.kernel_logging import log_cross_trajectories
from sweep.layout import (
    CONTEXT_KEY,
    SWEEP_STATE,
    TRIAL_STATE,
    own_trials,
    portable,
    quiet_tune_analysis,
    ray_storage,
    tracking_uri,
    trial_dir,
    trial_files,
    trial_finished,
    trial_outcomes,
)
from sweep.mlflow_runs import KIND, SWEEP, provenance
from sweep.plots import figure_files
from sweep.space import SweepSettings, SweepSpace, to_param_space
from sweep.tracking import MAX_TAG_CHARS, Tracker, TrackingStoreLost
from sweep.trial import trial

if TYPE_CHECKING:
    from core.claims import Claim

TRIAL_ENV = {
    # Trials sharing a GPU must not grab each other's memory; TF stays quiet.
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    # A failed MLflow request returns at once: the trial's tracker queues and retries it.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def _init_ray(settings: SweepSettings | None = None) -> None:
    """``RAY_ADDRESS`` when set, else a new local instance: never Ray's own fallback of
    attaching to whatever cluster ``ray start`` last left running on this machine. A local
    instance's workers run at ``settings.worker_niceness`` (Ray's own default is +15)."""
    import warnings

    import ray

    # Ray starts its processes through subprocess (fork, then exec at once: no Python runs in
    # the child), which JAX's at-fork hook warns about whenever the driver has imported JAX.
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                            category=RuntimeWarning)
    # Tune's own console output (a configuration table, a TensorBoard hint for an empty
    # directory): the sweep prints its own progress (``sweep.progress``).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's CSV, JSON and TensorBoard loggers: three files per trial, rewritten on every
    # report, read by nothing (the trial files and MLflow hold the results; issue 15).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    quiet_tune_analysis()  # without them the result grid warns of missing result files
    if settings is not None and not os.environ.get("RAY_ADDRESS"):  # a cluster we start
        os.environ["RAY_worker_niceness"] = str(settings.worker_niceness)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 runtime_env={"env_vars": TRIAL_ENV}, log_to_driver=False)


def _allow_reports_without_metric(space: SweepSpace) -> None:
    """With ASHA: epoch reports carry training loss only, evaluation reports the metric, and
    ASHA skips results without it; Tune's strict check would refuse the former."""
    if space.settings.scheduler == "asha":
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"


def run_sweep(space: SweepSpace, out: Path, name: str | None = None,
              trial_rows: bool = False) -> list[dict[str, Any]]:
    """Runs every trial of ``space``; returns one record per trial (config values, metrics);
    ``trial_rows``: the progress shows a table of the trials every 30 s (``SweepProgress``).

    Writes ``<out>/sweep.json`` first (the space, the MLflow parent run, the Tune experiment),
    so that ``resume_sweep`` can finish an interrupted sweep.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    _check_locks(out)
    settings = space.settings
    name = name or space.base.get("name") or "sweep"
    tracker = Tracker(tracking_uri(out))
    experiment_id = tracker.experiment(name, out / "mlartifacts")
    parent = tracker.start(experiment_id, f"{name} sweep", {KIND: SWEEP, **provenance()})
    _log_sweep_definition(tracker, parent, space, out)
    context = {"base": space.base, "paths": list(space.distributions), "out": str(out),
               "tracking_uri": tracker.uri, "experiment_id": experiment_id,
               "parent_run": parent, "every_report": settings.scheduler is not None}
    state = {"name": name, "space": space.raw, "storage": ray_storage(out),
             "tracking_uri": tracker.uri, "experiment_id": experiment_id, "parent_run": parent}
    stored = {**state, "out": str(out), "storage": portable(out, state["storage"]),
              "tracking_uri": portable(out, tracker.uri)}
    try:  # a sweep that cannot start must not leave its parent run RUNNING forever
        (out / SWEEP_STATE).write_text(json.dumps(stored, indent=1))
        _init_ray(settings)
        scheduler = None
        _allow_reports_without_metric(space)
        if settings.scheduler == "asha":
            # max_t one above the models of a trial: reaching max_t means STOP, which would
            # cut a trial off after its last evaluation, before its kernels and final report.
            scheduler = ASHAScheduler(time_attr="models_evaluated", metric=settings.metric,
                                      mode=settings.mode, max_t=space.models_per_trial() + 1,
                                      grace_period=1)
        tuner = tune.Tuner(
            _trainable(space),
            param_space={**to_param_space(space), CONTEXT_KEY: context},
            tune_config=tune.TuneConfig(
                num_samples=settings.num_samples, scheduler=scheduler,
                max_concurrent_trials=settings.max_concurrent_trials or None,
                # A worker that finished a trial runs the next one of the same resources:
                # imports, JAX's start and loaded programs are paid once per worker, not per
                # trial (issue 15); a trial keeps no state in the process between runs.
                reuse_actors=True,
            ),
            run_config=_run_config(space, name, state["storage"], trial_rows),
        )
    except BaseException:
        tracker.end(parent, "FAILED")
        raise
    return _finish(tuner, space, out, tracker, parent)


def _check_locks(out: Path) -> None:
    """Refuses (SweepInterrupted, printed by the CLI) to start trials whose trajectory locks
    would not keep each other out: the store's flock is probed first (issue 16)."""
    try:
        check_locking(TrajectoryStore(out).directory)
    except LocksNotEnforced as e:
        raise SweepInterrupted(str(e)) from None


def _log_sweep_definition(tracker: Tracker, parent: str, space: SweepSpace, out: Path) -> None:
    """The parent run's params (the swept variables, the trial count) and artifacts: the sweep
    file as given and the resolved base config (every default filled in)."""
    import yaml

    tracker.params(parent, {"swept": ", ".join(sorted(space.distributions)) or "-",
                            "trials": space.trial_count()})
    definition = out / "sweep-definition"
    definition.mkdir(exist_ok=True)
    (definition / "sweep.yaml").write_text(yaml.safe_dump(space.raw, sort_keys=False))
    first = space.config({p: d.args[0] for p, d in space.distributions.items()})
    (definition / "resolved-config.yaml").write_text(
        yaml.safe_dump(first.model_dump(mode="json"), sort_keys=False))
    for path in sorted(definition.iterdir()):
        tracker.artifact(parent, path, "sweep")


def _trainable(space: SweepSpace):
    from ray import tune

    resources = space.settings.resources
    return tune.with_resources(trial, {"cpu": resources.cpus, "gpu": resources.gpus})


def _run_config(space: SweepSpace, name: str, storage: str, trial_rows: bool = False):
    from ray import tune

    from sweep.progress import SweepProgress

    return tune.RunConfig(
        name=name, storage_path=storage, verbose=0,
        failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
        callbacks=[SweepProgress(space.trial_count(), space.models_per_trial(),
                                 space.settings.metric, space.settings.mode, trial_rows)],
    )


MAX_FAILURES = 3  # retries of a trial whose worker died (preemption, OOM kill, lost node)


def resume_sweep(out: Path) -> tuple[SweepSpace, list[dict[str, Any]]]:
    """Finishes the sweep recorded in ``<out>/sweep.json``: Tune restores its experiment,
    finished trials are kept, unfinished and failed ones run again (continuing their MLflow
    runs and stored trajectories), and the parent run gets the summary."""
    from ray import tune

    from sweep.review import resumable_sweep

    out = out.absolute()
    state, space = resumable_sweep(out)  # checked: ConfigError naming the file and the problem
    _check_locks(out)
    tracker = Tracker(state["tracking_uri"], existing=True)
    tracker.reopen(state["parent_run"])
    _allow_reports_without_metric(space)
    _init_ray(space.settings)
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
    """Ends the MLflow runs of a trial that did not end them itself (stopped by the scheduler:
    KILLED; failed for good: FAILED) if still running; their ids are in the trial's Tune
    checkpoint."""
    if result.checkpoint is None:
        return
    with result.checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / TRIAL_STATE).read_text())
    for run in (*state.get("trajectories", {}).values(), state["run_id"]):
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
        # Stopped by the scheduler: no error, and a record that says it did not finish (a
        # damaged one is listed as damaged, not taken for a stop).
        stopped = not result.error and trial_finished(trial_dir(out, trial_id)) is False
        results.append(result)
        records.append({**values, **metrics, "trial_id": trial_id,
                        "error": str(result.error or ""), "stopped_early": stopped})
    # Only this sweep's trials: an output directory may hold earlier sweeps' trials too
    # (trajectories are shared across sweeps; tables and distances are not). The summary
    # comes from the trial files first, so that a lost MLflow store cannot keep it back.
    summary, claims = write_sweep_summary(out, [r["trial_id"] for r in records],
                                          {r["trial_id"]: r["error"] for r in records}, parent)
    own = own_trials(out, [r["trial_id"] for r in records], parent)
    try:
        for r, result in zip(records, results, strict=True):
            if r["stopped_early"]:  # ended by the scheduler (ASHA): its MLflow run says so
                _close_run(tracker, result, "KILLED", {"stopped_by": space.settings.scheduler})
            elif r["error"]:
                _close_run(tracker, result, "FAILED", {"error": r["error"][-MAX_TAG_CHARS:]})
        tracker.log(parent, {"trials": len(records),
                             "trials_failed": sum(bool(r["error"]) for r in records),
                             "trials_stopped_early": sum(r["stopped_early"] for r in records)})
        for path in (f for p in summary for f in figure_files(p)):
            tracker.artifact(parent, path)
        if claims:
            tracker.tags(parent, claim_tags(claims))
        for path in log_cross_trajectories(tracker, parent, out, own):
            for file in figure_files(path):
                tracker.artifact(parent, file)
        tracker.end(parent)
    except TrackingStoreLost as e:
        raise SweepTrackingLost(str(e), records) from e
    return records


def _subtitle(out: Path, trials: Collection[str]) -> str:
    """Dataset, model and eps of the sweep's plots (``sweep.plots.describe``), from its first
    finished trial's config, leaving out what the sweep varies."""
    from core.config import stored_config
    from sweep.layout import StateFileError, read_results, read_trial_state
    from sweep.mlflow_runs import flat_params
    from sweep.plots import describe

    for path in trial_files(out, trials, "results.json"):
        try:
            cfg = stored_config(read_results(path)["config"], str(path))
            swept = read_trial_state(path.parent).variant
        except (StateFileError, ConfigError):
            continue
        return describe(flat_params(cfg), set(swept))
    return ""


class SweepInterrupted(RuntimeError):
    """Ray Tune itself failed (not a trial): the message says how to go on (``resume``)."""


class SweepTrackingLost(RuntimeError):
    """The sweep ran, its summary is written from the trial files, but its local MLflow
    database went away: ``records`` are the trials, as ``run_sweep`` returns them."""

    def __init__(self, message: str, records: list[dict[str, Any]]):
        super().__init__(message)
        self.records = records


def write_sweep_summary(out: Path, trials: Collection[str],
                        errors: dict[str, str] | None = None, sweep: str | None = None
                        ) -> tuple[list[Path], list[tuple[str, list[Claim]]]]:
    """The sweep's summary over its trials (mean ± std over seeds): CSV, Markdown (with the
    failed trials listed under it) and the accuracy-against-switch-point plot, under ``out``.
    ``errors``: trials that failed without a file of their own saying why (Ray's error, e.g.
    a lost tracking store), by id; their last line is listed. ``sweep``: the sweep's MLflow
    run, so that a trial directory of another sweep is listed as such, never summarised.
    Returns the files written and the claims' verdicts (``claims.md``/``claims.json``, the
    last section of ``summary.md``)."""
    from core.results import summarize, write_summary
    from sweep.claims import record_claims, sweep_studies
    from sweep.plots import switch_point_plot

    rows, failed = trial_outcomes(out, trials, sweep)
    foreign = {f["trial"] for f in failed if "foreign" in f}
    trials = [t for t in trials if t not in foreign]  # for the claims: this sweep's own
    subtitle = _subtitle(out, trials)
    listed = {f["trial"] for f in failed}
    failed += [{"trial": t, "variant": "", "error": e.strip().splitlines()[-1][:500]}
               for t, e in sorted((errors or {}).items()) if t not in listed and e.strip()]
    notes = "".join(f"\n- trial {f['trial']}" + (f" ({f['variant']})" if f["variant"] else "")
                    + f": {f['error']}" for f in failed)
    notes = f"\nFailed trials:\n{notes}\n" if failed else ""
    if not rows:
        if failed:
            (out / "summary.md").write_text(notes)
            return [out / "summary.md"], []
        return [], []
    summary = summarize(rows)
    paths = [*write_summary(out, summary, notes),
             switch_point_plot(summary, out / "switch_point.png", subtitle)]
    claims = record_claims(out, sweep_studies(out, list(trials)))  # summary.md's last section
    return [*paths, out / "claims.md", out / "claims.json"], claims
