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

import csv
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from core.config import config_from_dict
from core.experiment import Hooks, run_experiment
from sweep.space import SweepSpace, substitute, to_param_space
from sweep.tracking import Tracker

TRIAL_ENV = {
    # Trials sharing a GPU must not grab each other's memory; TF stays quiet.
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    "TF_CPP_MIN_LOG_LEVEL": "3",
}
CONTEXT_KEY = "_ntk_sweep"


def tracking_uri(out: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').absolute()}"


def _summary_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Means over the trial's phase-2 runs (what Tune compares), and per-code means."""
    phase2 = [r for r in rows if not r["code"].endswith("-")]
    out: dict[str, float] = {}
    for key in ("accuracy", "robust_linf", "robust_l2", "transfer_linf"):
        vals = [r[key] for r in phase2 if not math.isnan(r[key])]
        if vals:
            out[key] = statistics.fmean(vals)
    return out


def trial(config: dict[str, Any]) -> None:
    """One Ray Tune trial (runs in a Ray worker)."""
    from ray import tune

    ctx = config[CONTEXT_KEY]
    values = {path: config[path] for path in ctx["paths"]}
    cfg = config_from_dict(substitute(ctx["base"], values), "trial")
    trial_id = tune.get_context().get_trial_id() or "trial"
    out = Path(ctx["out"])
    tracker = Tracker(ctx["tracking_uri"])
    tags = {"kind": "trial", "dataset": cfg.dataset.name, "model": cfg.model.name,
            "seed": cfg.seeds[0], "trial_id": trial_id}
    run = tracker.start(ctx["experiment_id"], trial_id, tags, parent=ctx["parent_run"])
    tracker.params(run, {path: value for path, value in values.items()})
    trained = {"phase1_epochs": 0}

    def on_epoch(label: str, epoch: int, metrics: dict[str, float]) -> None:
        # label: phase1/<mode>/seed<s> or phase2/<mode>/seed<s>/step<switch step>
        if label.startswith("phase1"):
            trained["phase1_epochs"] += 1
        name = label.replace("/seed", "/s").replace("/step", "/t")
        tracker.log(run, {f"{name}/{k}": v for k, v in metrics.items()}, step=epoch)

    trial_dir = out / "trials" / trial_id
    try:
        rows = run_experiment(cfg, trial_dir, Hooks(on_epoch=on_epoch), store_root=out)
    except Exception:
        tracker.end(run, "FAILED")
        raise
    for r in rows:
        rule = f" ({r['switch_rule']})" if r["switch_rule"] else ""
        child = tracker.start(
            ctx["experiment_id"], f"{r['code']} t={r['switch_epoch']:g}{rule} seed {r['seed']}",
            {"kind": "switch_run" if not r["code"].endswith("-") else "network",
             "code": r["code"], "dynamics": r["dynamics"], "switch_epoch": r["switch_epoch"],
             "switch_rule": r["switch_rule"], "seed": r["seed"], "dataset": cfg.dataset.name,
             "model": cfg.model.name},
            parent=run)
        if r["switch_rule"] and r["code"].endswith("-"):  # once per trajectory
            tracker.log(run, {f"switch_rule/{r['code'][0]}/epoch": r["switch_epoch"]})
        tracker.log(child, {k: r[k] for k in ("accuracy", "robust_linf", "robust_l2",
                                              "transfer_linf") if not math.isnan(r[k])})
        tracker.end(child)
    for name in ("results.csv", "summary.md"):
        tracker.artifact(run, trial_dir / name)
    if cfg.kernel.enabled:
        for path in log_kernels(tracker, run, cfg, out, trial_dir):
            tracker.artifact(run, path)
    metrics = {**_summary_metrics(rows), "phase1_epochs_trained": trained["phase1_epochs"]}
    tracker.log(run, metrics)
    tracker.end(run)
    tune.report(metrics)


KERNEL_MEASURES = ("to_init", "to_previous", "to_final", "velocity", "alignment",
                   "centered_alignment", "top10_mass", "effective_rank")


def log_kernels(tracker: Tracker, run: str, cfg, store_root: Path, trial_dir: Path) -> list[Path]:
    """Kernels of the trial's phase-1 trajectories at every checkpoint (computed once per
    trajectory and stored with it), their measures as metrics ``kernel/<mode>/<measure>`` and
    the distances between the trial's trajectories (``kernel/cross/<modes>/distance``), with
    step = epoch x 1000; returns the plots written under ``trial_dir`` (distance curves and
    one epoch-by-epoch heatmap per trajectory)."""
    import numpy as np

    from core.experiment import trajectory_id
    from core.trajectory_kernels import (
        compute_trajectory_kernels,
        cross_trajectory_distances,
        find_trajectories,
        trajectory_measures,
    )
    from sweep.plots import kernel_distance_plot, trajectory_heatmap

    seed = cfg.seeds[0]
    ids = {trajectory_id(cfg, code[0], seed) for code in cfg.codes}
    infos = [i for i in find_trajectories(store_root) if i.id in ids]
    trajectories, stores = {}, {}
    for info in infos:
        stores[info.mode] = compute_trajectory_kernels(info, cfg.kernel)
        first = stores[info.mode].load(stores[info.mode].epochs()[0])
        rows = trajectory_measures(stores[info.mode], len(np.unique(first.labels)))
        trajectories[info.id] = {"mode": info.mode, "seed": seed, "rows": rows}
        for r in rows:
            tracker.log(run, {f"kernel/{info.mode}/{k}": r[k] for k in KERNEL_MEASURES},
                        step=round(1000 * r["epoch"]))
    modes = sorted(stores)
    for i, a in enumerate(modes):
        for b in modes[i + 1:]:
            for r in cross_trajectory_distances(stores[a], stores[b]):
                tracker.log(run, {f"kernel/cross/{a}{b}/distance": r["distance"]},
                            step=round(1000 * r["epoch"]))
    if not trajectories:
        return []
    plots = [kernel_distance_plot(trajectories, trial_dir / "kernel_distances.png")]
    for mode, store in stores.items():
        plots.append(trajectory_heatmap(store, f"kernel distances, {mode} seed {seed}",
                                        trial_dir / f"kernel_heatmap_{mode}.png"))
    return plots


def run_sweep(space: SweepSpace, out: Path, name: str | None = None) -> list[dict[str, Any]]:
    """Runs every trial of ``space``; returns one record per trial (config values, metrics)."""
    import ray
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
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                 runtime_env={"env_vars": TRIAL_ENV}, log_to_driver=False)
    resources = {"cpu": settings.resources.cpus, "gpu": settings.resources.gpus}
    scheduler = None
    if settings.scheduler == "asha":
        scheduler = ASHAScheduler(metric=settings.metric, mode=settings.mode)
    tuner = tune.Tuner(
        tune.with_resources(trial, resources),
        param_space={**to_param_space(space), CONTEXT_KEY: context},
        tune_config=tune.TuneConfig(
            num_samples=settings.num_samples, scheduler=scheduler,
            max_concurrent_trials=settings.max_concurrent_trials or None,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=os.environ.get("NTK_SWEEP_STORAGE") or str(out / "ray"),
            verbose=1, failure_config=tune.FailureConfig(max_failures=2),
        ),
    )
    try:
        grid = tuner.fit()
    except BaseException:
        tracker.end(parent, "FAILED")
        raise
    records = []
    for result in grid:
        values = {p: result.config[p] for p in space.distributions}
        metrics = {k: v for k, v in (result.metrics or {}).items()
                   if k in ("accuracy", "robust_linf", "robust_l2", "transfer_linf",
                            "phase1_epochs_trained")}
        records.append({**values, **metrics, "error": str(result.error or "")})
    tracker.log(parent, {"trials": len(records),
                         "trials_failed": sum(bool(r["error"]) for r in records)})
    for path in write_sweep_summary(out):
        tracker.artifact(parent, path)
    tracker.end(parent)
    return records


def sweep_rows(out: Path) -> list[dict[str, Any]]:
    """Every result row of every finished trial under ``out/trials``."""
    rows = []
    for path in sorted(out.glob("trials/*/results.json")):
        rows += json.loads(path.read_text())["rows"]
    return rows


def write_sweep_summary(out: Path) -> list[Path]:
    """The sweep's summary over all trials (mean ± std over seeds): CSV, Markdown and the
    accuracy-against-switch-point plot, under ``out``."""
    from core.experiment import summarize, summary_markdown
    from sweep.plots import switch_point_plot

    rows = sweep_rows(out)
    if not rows:
        return []
    summary = summarize(rows)
    (out / "summary.md").write_text(summary_markdown(summary))
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    plot = switch_point_plot(summary, out / "switch_point.png")
    return [out / "summary.csv", out / "summary.md", plot]
