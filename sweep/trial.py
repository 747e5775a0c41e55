"""One Ray Tune trial: a thin adapter around ``run_experiment``.

A trial is one sampled experiment config with one seed. It trains (or continues) its phase-1
trajectories in the sweep's shared trajectory store and runs phase 2 from every switch point;
``TrialReporter`` turns the experiment's hooks into MLflow writes (through the trial's
buffered ``Tracker``), Tune reports and the heartbeat in the trial's record
(``sweep.layout.TrialState``). The trial's MLflow run id lives in its Tune checkpoint, so a
retried or restored trial continues the same run; a trial whose record says it finished
reports again without running, one whose record holds its divergence fails again at once.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from core.compat import use_compilation_cache
from core.config import RESULT_METRICS, ExperimentConfig, config_from_dict, is_network
from core.experiment import Hooks, Stage, run_experiment
from core.timing import since, snapshot, timed
from core.train import Divergence
from core.trajectory_store import Trajectory, TrajectoryStore, epoch_to_step
from sweep.kernel_logging import log_kernels
from sweep.layout import (
    CONTEXT_KEY,
    PENDING_WRITES,
    TRIAL_STATE,
    TrialState,
    foreign_trial,
    format_variant,
    jax_cache_dir,
    read_trial_state,
    trial_dir,
)
from sweep.mlflow_runs import (
    KIND,
    PARENT_TAG,
    TRAJECTORY,
    TRIAL,
    VARIANT_TAG,
    flat_params,
    model_kind,
    model_name,
    model_params,
    provenance,
    train_metrics,
    trajectory_name,
    trajectory_params,
    trial_name,
)
from sweep.plots import figure_files
from sweep.space import substitute
from sweep.tracking import MAX_TAG_CHARS, ResumedRun, Tracker, failpoint


class TrialFailed(RuntimeError):
    """A trial that cannot succeed by retrying as is (diverged; tracking unreachable)."""


def summary_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Means over the trial's phase-2 runs so far (what Tune compares)."""
    phase2 = [r for r in rows if not is_network(r["code"])]
    out: dict[str, float] = {}
    for key in RESULT_METRICS:
        vals = [r[key] for r in phase2 if not math.isnan(r[key])]
        if vals:
            out[key] = statistics.fmean(vals)
    return out


def _report(metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
    """Reports to Tune; with ``state`` (the trial's MLflow run id) also a checkpoint, which
    Tune persists before ``report`` returns."""
    from ray import tune

    with timed("report"):
        if state is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="ntk-sweep-trial-") as directory:
            (Path(directory) / TRIAL_STATE).write_text(json.dumps(state))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


# A trial's progress reports to Tune (epochs, evaluated models): at most one every
# REPORT_EVERY_S, the latest standing each time; every one under a scheduler (ASHA decides on
# them). A report costs the driver tens of milliseconds: a small trial's dozens of epochs and
# models were most of its overhead (issue 15).
REPORT_EVERY_S = 1.0


def _restored_runs() -> dict[str, Any] | None:
    """The MLflow runs in the trial's Tune checkpoint (a retried or restored trial):
    ``{"run_id": trial run, "trajectories": {mode: run id}}``."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / TRIAL_STATE).read_text())
    return {"run_id": state["run_id"], "trajectories": state.get("trajectories", {})}


class TrialReporter:
    """The experiment's hooks for one trial: its MLflow runs (``sweep.mlflow_runs``: the
    trial run, a run per trajectory, a child run per evaluated model; none written twice:
    ``resumed`` says what the runs already have), Tune (training loss per epoch; running
    means of the evaluation metrics and ``models_evaluated``, ASHA's time axis, per model)
    and the heartbeat in the trial's record."""

    def __init__(self, tracker: Tracker, runs: dict[str, Any], ctx: dict[str, Any],
                 directory: Path, cfg: ExperimentConfig, resumed: ResumedRun,
                 state: TrialState):
        self.tracker, self.ctx, self.directory, self.cfg = tracker, ctx, directory, cfg
        self.state = state  # the trial's record (state.json), written at each change
        self.run: str = runs["run_id"]
        self.trajectory_runs: dict[str, str] = runs["trajectories"]
        self.seen, self.children, self.unfinished = resumed
        self.store = TrajectoryStore(ctx["out"])
        self.rows: list[dict[str, Any]] = []
        self.trajectories: list[Trajectory] = []
        # Phase-2 curves by (code, switch step): a model's row may come after later models of
        # its code are trained (rows waiting for the reference network's examples).
        self.curves: dict[tuple[str, int], list[list[Any]]] = {}
        self.phase1_epochs = self.phase1_spe = 0
        self.steps_done = self.steps_planned = 0
        self.reported = -math.inf  # time.monotonic() of the last progress report

    def hooks(self) -> Hooks:
        return Hooks(on_epoch=self.on_epoch, on_result=self.on_result, on_step=self.on_step,
                     planned_steps=self.on_plan, on_stage=self.on_stage,
                     on_trajectory=self.on_trajectory, on_wait=self.on_wait)

    @property
    def pending_file(self) -> Path:
        return self.directory / PENDING_WRITES

    def skip(self, run: str) -> set[tuple[str, int]]:
        return self.seen.setdefault(run, set())

    def progress(self) -> float:
        return min(self.steps_done / self.steps_planned, 0.999) if self.steps_planned else 0.0

    def standing(self) -> dict[str, Any]:
        """What every report to Tune carries: progress, models evaluated so far (ASHA's time
        axis) and the running means of their metrics."""
        return {"progress": self.progress(), "models_evaluated": len(self.rows),
                **summary_metrics(self.rows)}

    def report_progress(self, metrics: dict[str, Any]) -> None:
        """``metrics`` to Tune unless a progress report went less than ``REPORT_EVERY_S``
        ago (always under a scheduler: ``ctx["every_report"]``)."""
        now = time.monotonic()
        if self.ctx.get("every_report") or now - self.reported >= REPORT_EVERY_S:
            self.reported = now
            _report(metrics)

    def on_plan(self, steps: int) -> None:
        self.steps_planned = steps

    def on_step(self) -> None:
        self.steps_done += 1

    def on_stage(self, stage: Stage) -> None:
        if stage.phase == 1:
            self.phase1_spe = stage.steps_per_epoch
        else:
            self.curves[stage.code, stage.switch_step] = []

    def on_epoch(self, stage: Stage, epoch: int, metrics: dict[str, float]) -> None:
        step = epoch * stage.steps_per_epoch
        values = {**train_metrics(metrics), "epoch": epoch}
        if stage.phase == 1:
            self.phase1_epochs += 1
            run = self.trajectory_runs[stage.code]
            self.tracker.log(run, values, step=step, skip=self.skip(run))
        else:
            now = int(time.time() * 1000)
            self.curves[stage.code, stage.switch_step] += [
                [k, float(v), now, step] for k, v in values.items()]
        # Tune's and the heartbeat's label of the stage (``ntk-sweep status`` shows it).
        # ``t`` is the switch epoch, as in run names (``AC t=10 seed 0``) and tables.
        name = f"phase{stage.phase}/{stage.code}/s{stage.seed}" + (
            f"/t={stage.switch_step / max(self.phase1_spe, 1):g}" if stage.phase == 2 else "")
        self.heartbeat(name, epoch)
        self.tracker.save_pending(self.pending_file)  # undelivered writes survive a kill
        self.report_progress({"stage": name, "epoch": epoch, "train_loss": metrics["loss"],
                              "train_accuracy": metrics["accuracy"], **self.standing()})

    def on_result(self, r: dict[str, Any]) -> None:
        self.rows.append(r)
        name = model_name(r)
        tid = self.store.get(self.cfg, r["code"][0], r["seed"]).id
        if name not in self.children:  # a retry completes a child an attempt left empty
            metrics = {k: r[k] for k in RESULT_METRICS if not math.isnan(r[k])}
            self.tracker.child(
                self.ctx["experiment_id"], name,
                {KIND: model_kind(r["code"]), "masked": str(bool(r.get("masked"))).lower(),
                 **provenance()},
                self.run, {**metrics, "switch_epoch": r["switch_epoch"]},
                existing=self.unfinished.get(name), params=model_params(self.cfg, r, tid),
                curves=() if is_network(r["code"]) else self.curves.get(
                    (r["code"], epoch_to_step(r["switch_epoch"], self.phase1_spe)), ()))
            self.children[name] = "pending"
        if r["switch_rule"] and is_network(r["code"]):  # once per trajectory
            run = self.trajectory_runs[r["code"][0]]
            self.tracker.log(run, {"switch_rule_epoch": r["switch_epoch"]}, skip=self.skip(run))
        self.tracker.save_pending(self.pending_file)
        self.report_progress(self.standing())

    def on_wait(self, trajectory: Trajectory) -> None:
        """Another trial holds ``trajectory`` (training it, or computing its kernels): say so
        (heartbeat, Tune: the driver prints it) before waiting."""
        what = f"trajectory {trajectory.mode} seed {trajectory.seed} ({trajectory.id})"
        self.heartbeat(f"waiting for {what}", 0)
        _report({"waiting_for": what, **self.standing()})

    def on_trajectory(self, trajectory: Trajectory, history: list[dict[str, float]]) -> None:
        """Phase 1 of ``trajectory`` is complete: its stored epoch history completes the
        trajectory run's curves (a trajectory an earlier trial trained has no epoch events
        here); the trial logs its kernels at the end."""
        self.trajectories.append(trajectory)
        run = self.trajectory_runs[trajectory.mode]
        for h in history:
            self.tracker.log(run, {**train_metrics(h), "epoch": h["epoch"]},
                             step=h["epoch"] * self.phase1_spe, skip=self.skip(run))

    def heartbeat(self, stage: str, epoch: int) -> None:
        """The trial record's heartbeat: the worker's PID and node, the stage and epoch just
        finished, and how many MLflow writes wait for the server (``ntk-sweep status``)."""
        import ray

        self.state.heartbeat = {
            "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
            "nice": os.nice(0), "stage": stage, "epoch": epoch,
            "pending_writes": len(self.tracker.pending), "time": time.time()}
        self.state.write(self.directory)

    def finish(self, started: float, before: dict[str, float]) -> dict[str, Any]:
        """After the experiment: tables, kernels and plots as artifacts, the trial's summary
        metrics and timings; ends the runs. TrialFailed if MLflow stays unreachable."""
        tracker, run = self.tracker, self.run
        # The trial's tables go to MLflow, and stay beside the trial only while queued for it:
        # results.json holds the rows for status, resume and report (issue 15: fewer files).
        for name in ("results.csv", "summary.md"):
            tracker.artifact(run, self.directory / name, move=True)
        (self.directory / "summary.csv").unlink(missing_ok=True)
        if self.cfg.kernel.enabled:
            self.heartbeat("kernels", 0)
            _report({"stage": "kernels", "computing_kernels": 1, **self.standing()})
            for path in log_kernels(tracker, run, self.trajectory_runs, self.cfg,
                                    self.trajectories, self.directory, self.seen,
                                    on_wait=self.on_wait):
                for file in figure_files(path):
                    tracker.artifact(run, file)
        spent = since(before)
        release_free_heap()
        metrics = {**summary_metrics(self.rows), "phase1_epochs_trained": self.phase1_epochs,
                   "memory/worker_rss_mb": resident_mb(),
                   "time/trial_s": time.perf_counter() - started,
                   **{f"time/{k}_s": spent.get(k, 0.0) for k in ("mlflow", "checkpoint",
                                                                  "report")}}
        tracker.log(run, metrics, skip=self.skip(run))
        for trajectory_run in self.trajectory_runs.values():
            tracker.end(trajectory_run)
        tracker.end(run)
        if not tracker.flush():
            raise TrialFailed(f"MLflow at {tracker.uri} stayed unreachable; "
                              f"{len(tracker.pending)} writes kept in {self.pending_file} for "
                              "the retry")
        return {**metrics, "models_evaluated": len(self.rows), "finished": 1, "progress": 1.0}

    def fail(self, error: Divergence) -> TrialFailed:
        """The trial diverged: its record says why, its runs FAILED with the error as a tag."""
        self.state.error = str(error)
        self.state.write(self.directory)
        self.tracker.tags(self.run, {"error": str(error)[:MAX_TAG_CHARS]})
        for run in (*self.trajectory_runs.values(), self.run):
            self.tracker.end(run, "FAILED")
        try:
            self.tracker.flush(60.0)
        finally:
            self.tracker.save_pending(self.pending_file)
        return TrialFailed(str(error))


def _start_runs(tracker: Tracker, ctx: dict[str, Any], cfg: ExperimentConfig, trial_id: str,
                values: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The trial's MLflow run (a child of the sweep's) and one child run per trajectory it
    trains (its phase-1 data modes and the reference network's), then the first Tune
    checkpoint holding their ids; and whether the trial run existed already.

    A trial without a Tune checkpoint may still have runs: its driver can die after the trial
    created them and before Tune recorded the checkpoint naming them (a reused worker starts
    a trial within milliseconds). They are found by the trial's id under the sweep's run and
    continued, so a restored trial never makes a second trial run."""
    import ray

    seed = cfg.seeds[0]
    store = TrajectoryStore(ctx["out"])
    modes = sorted({*cfg.phase1_modes, *([cfg.eval.reference] if cfg.eval.reference else [])})
    trajectories = [store.get(cfg, mode, seed) for mode in modes]
    found = tracker.find(ctx["experiment_id"], {KIND: TRIAL, "trial_id": trial_id,
                                                PARENT_TAG: ctx["parent_run"]})
    if found:
        run = min(found, key=lambda r: r.info.start_time).info.run_id
        children = tracker.find(ctx["experiment_id"], {KIND: TRAJECTORY, PARENT_TAG: run})
        by_mode = {r.data.params.get("data_mode"): r.info.run_id
                   for r in sorted(children, key=lambda r: -r.info.start_time)}
    else:
        variant = format_variant(values)
        tags = {KIND: TRIAL, VARIANT_TAG: variant, "trial_id": trial_id,
                "ray_node": ray.get_runtime_context().get_node_id(), **provenance()}
        run = tracker.start(ctx["experiment_id"], trial_name(variant, seed)[:250], tags,
                            parent=ctx["parent_run"])
        by_mode = {}
    # Params again where the runs existed (an attempt may have died before delivering them):
    # the same value twice is accepted.
    tracker.params(run, {**flat_params(cfg), "seed": seed, "trial_id": trial_id})
    runs = {"run_id": run, "trajectories": {}}
    for t in trajectories:
        child = by_mode.get(t.mode) or tracker.start(
            ctx["experiment_id"], trajectory_name(t.mode, seed),
            {KIND: TRAJECTORY, **provenance()}, parent=run)
        runs["trajectories"][t.mode] = child
        tracker.params(child, trajectory_params(cfg, t.mode, seed, t.id))
    failpoint("trial-runs-created")
    _report({"models_evaluated": 0}, runs)
    return runs, bool(found)


def trial(config: dict[str, Any]) -> None:
    """One Ray Tune trial (runs in a Ray worker); see the module docstring."""
    from ray import tune

    started, before = time.perf_counter(), snapshot()
    ctx = config[CONTEXT_KEY]
    use_compilation_cache(jax_cache_dir(Path(ctx["out"])))  # programs compiled once per sweep
    values = {path: config[path] for path in ctx["paths"]}
    cfg = config_from_dict(substitute(ctx["base"], values), "trial")
    trial_id = tune.get_context().get_trial_id() or "trial"
    out = Path(ctx["out"])
    directory = trial_dir(out, trial_id)
    tracker = Tracker(ctx["tracking_uri"], buffered=True, existing=True)
    pending = directory / PENDING_WRITES
    earlier = read_trial_state(directory)
    if earlier.foreign(ctx["parent_run"]):  # never read, changed or reported as this trial
        raise TrialFailed(foreign_trial(directory, earlier))
    if earlier.final is not None:  # finished before its driver went away
        _report(earlier.final)
        return
    if earlier.error is not None:  # diverged before: deterministic, fail again
        if tracker.load_pending(pending):  # its FAILED status and error tag, if undelivered
            tracker.flush(60.0)
            tracker.save_pending(pending)
        raise TrialFailed(earlier.error)
    runs, existed = _restored_runs(), True
    if runs is None:
        runs, existed = _start_runs(tracker, ctx, cfg, trial_id, values)
    if existed:
        resumed = tracker.resume(runs["run_id"], pending, runs["trajectories"].values())
    else:
        resumed = ResumedRun({}, {}, {})
    # A retried trial shows its last attempt's stage (``status``) until its first heartbeat.
    state = TrialState(variant={p: v for p, v in values.items() if p != "seeds"},
                       heartbeat=earlier.heartbeat, sweep=ctx["parent_run"])
    reporter = TrialReporter(tracker, runs, ctx, directory, cfg, resumed, state)
    directory.mkdir(parents=True, exist_ok=True)
    state.write(directory)
    try:
        run_experiment(cfg, directory, reporter.hooks(), store_root=out)
        final = reporter.finish(started, before)
    except Divergence as e:  # the trial ends as an error naming phase, epoch, step, cause
        raise reporter.fail(e) from None
    except BaseException:
        try:
            tracker.flush(0.0)
        finally:
            tracker.save_pending(pending)  # a retry delivers them
        raise
    pending.unlink(missing_ok=True)
    state.final, state.run_id = final, runs["run_id"]
    state.write(directory)  # finished
    _settle_heap()
    _report(final)


def release_free_heap() -> None:
    """Returns the C heap's free memory to the system (``malloc_trim``, glibc only, a few ms).

    Why: a reused worker's resident memory grew about 12-15 MiB a tiny trial without bound
    (737 -> 933 MiB over 15 trials, 2026-11-27), the kernel figure's 8 MiB image buffer and its
    like freed into glibc arenas that keep them; trimmed after every trial, 1-2 MiB a trial.
    Lowering glibc's mmap threshold instead (``MALLOC_MMAP_THRESHOLD_=1048576``) held it flat
    but cost the digits experiment 8 % more CPU in page faults."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def resident_mb() -> float:
    """This process's resident memory in MiB (``/proc``; NaN where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return math.nan


def _settle_heap() -> None:
    """After a process's first trial, once: its modules, compiled programs and caches (about
    550,000 objects) leave the garbage collector's view (``gc.freeze``), so that the full
    collections of later trials (one every three tiny trials) scan only what those trials
    make: 0.34 CPU-s each before (reused workers, 2026-11-27). The first trial's garbage is
    collected first. A frozen object is still freed when its last reference goes; only one
    that later becomes garbage inside a reference cycle stays (the process's caches drop
    arrays and compiled programs, which reference counting frees)."""
    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()
