"""Kernel measures to MLflow: each trajectory's (on its trajectory run), the distances between
a trial's trajectories (on the trial run) and between a sweep's (on the parent run). The
measures are ``core.kernels.MEASURES`` under their own names (``alignment``, ``to_init``, ...);
steps are training steps (``sweep.mlflow_runs``), with ``epoch`` logged beside them."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np

from core.config import ConfigError, stored_config
from core.kernel_store import KernelTrajectory, save_arrays
from core.kernels import MEASURES, TrajectoryKey, pairwise_head, trajectory_pairs
from core.recent import recent
from core.trajectory_store import Trajectory, TrajectoryStore
from sweep.layout import StateFileError, read_results, trial_files, variant_label
from sweep.tracking import Tracker

KERNELS_ARTIFACT = "kernels.npz"


def log_kernels(tracker: Tracker, run: str, trajectory_runs: dict[str, str], cfg: Any,
                trajectories: list[Trajectory], trial_dir: Path,
                seen: dict[str, set[tuple[str, int]]],
                on_wait: Callable[[Trajectory], None] | None = None) -> list[Path]:
    """Kernels of ``trajectories`` (the trial's) at every checkpoint (computed once per
    trajectory, under its lock, and stored with it), their measures as metrics of each
    trajectory's run (``trajectory_runs`` by data mode) and the distances between them on the
    trial run ``run`` (``kernel/cross/<modes>/distance``). The kernels at the switch points
    and the last checkpoint (the kernels phase 2 trains with) become one artifact of the trial
    run, ``kernels.npz``: ``<mode>/epochs``, ``<mode>/kernels``, ... per data mode
    (``KernelTrajectory.export``; written beside the trial until MLflow has it). ``seen``:
    (metric, step) already logged, by run; ``on_wait(trajectory)`` when another process holds
    a trajectory's lock. Returns the plot written under ``trial_dir``: ``kernels.png``, the
    overview of distance, alignment and spectrum curves, the polar view and one epoch-by-epoch
    heatmap per trajectory."""
    from core.trajectory_kernels import (
        compute_trajectory_kernels,
        cross_trajectory_distances,
        trajectory_measures,
    )
    from sweep.plots import kernel_overview

    rows_of, stores, exported = {}, {}, {}
    for t in trajectories:
        stores[t.mode] = store = compute_trajectory_kernels(
            t, cfg.kernel, on_wait=on_wait and (lambda t=t: on_wait(t)))
        epochs = store.epochs()
        rows = trajectory_measures(store, len(np.unique(store.load(epochs[0]).labels)))
        rows_of[t.id] = {"mode": t.mode, "seed": t.seed, "rows": rows}
        own = trajectory_runs[t.mode]
        tracker.log_steps(own, [(r["step"], {**{k: r[k] for k in MEASURES}, "epoch": r["epoch"]})
                                for r in rows], skip=seen.setdefault(own, set()))
        chosen = sorted({*cfg.switch_points, epochs[-1]} & set(epochs))
        exported |= {f"{t.mode}/{k}": v for k, v in store.export(chosen).items()}
    if exported:
        save_arrays(trial_dir / KERNELS_ARTIFACT, exported)
        tracker.artifact(run, trial_dir / KERNELS_ARTIFACT, move=True)
    seed = cfg.seeds[0]
    points = []
    for (a, _), (b, _) in trajectory_pairs({(m, seed): s for m, s in stores.items()}):
        a, b = sorted((a, b))
        points += [(r["step"], {f"kernel/cross/{a}{b}/distance": r["distance"]})
                   for r in cross_trajectory_distances(stores[a], stores[b])]
    tracker.log_steps(run, points, skip=seen.setdefault(run, set()))
    if not rows_of:
        return []
    title = f"seed {seed}, trajectories " + ", ".join(
        f"{t.mode} {t.id[:12]}" for t in sorted(trajectories, key=lambda t: t.mode))
    key = (title, *(stores[m].fingerprint() for m in sorted(stores)))
    path = trial_dir / "kernels.png"
    kept = key in _FIGURES  # drawn by an earlier trial of the process
    png = recent(_FIGURES, key, lambda: kernel_overview(
        rows_of, {f"{m} seed {seed}": k for m, k in stores.items()}, path, title).read_bytes(),
        FIGURES_KEPT)
    if kept:
        path.write_bytes(png)
    return [path]


# A process's kernel figures by what they show (the trajectories' ids and stored kernels):
# trials sharing their trajectories (a sweep over phase-2 settings, codes, switch points) run
# in one reused worker after another, and drew the same figure each (0.6 CPU-s a tiny trial).
_FIGURES: dict[tuple[str, ...], bytes] = {}
FIGURES_KEPT = 8


def _families(out: Path, trials: Collection[str]
              ) -> tuple[dict[str, dict[TrajectoryKey, KernelTrajectory]], dict[str, str]]:
    """The trials' kernel trajectories grouped by phase-1 configuration and kernel setting
    (what a trial varies apart from the seed: one family's trajectories differ only in data
    mode and seed), keyed (mode, seed); and each family's variant label."""
    families: dict[str, dict[TrajectoryKey, KernelTrajectory]] = {}
    labels: dict[str, str] = {}
    store = TrajectoryStore(out)
    for path in trial_files(out, trials, "results.json"):
        try:
            cfg = stored_config(read_results(path)["config"], str(path))
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
        for t in store.of(cfg):
            kernels = t.kernels(cfg.kernel)
            if kernels.epochs():
                families.setdefault(family, {})[t.mode, t.seed] = kernels
    return families, labels


def log_cross_trajectories(tracker: Tracker, parent: str, out: Path,
                           trials: Collection[str]) -> list[Path]:
    """Kernel distances between the sweep's trajectories, on the parent run, per phase-1
    configuration (``log_family``; a configuration prefix ``config<i>/`` in the metric names,
    and a tag naming its variant, when the sweep varies it). Seed vs seed shows how much of a
    kernel's evolution is the data mode rather than the initialisation."""
    families, labels = _families(out, trials)
    plots = []
    for index, (family, stores) in enumerate(sorted(families.items())):
        prefix = f"config{index}/" if len(families) > 1 else ""
        if len(stores) < 2:
            continue
        if prefix:  # metric names cannot hold the variant ('='): a tag says which it is
            tracker.tags(parent, {f"kernel/cross/config{index}": labels[family]})
        plots.append(log_family(
            tracker, parent, stores, prefix, labels[family],
            out / f"cross_trajectory{index if len(families) > 1 else ''}.png"))
    return plots


def log_family(tracker: Tracker, parent: str, stores: dict[TrajectoryKey, KernelTrajectory],
               prefix: str, label: str, plot: Path) -> Path:
    """S(K^a_t, K^b_t) at the common checkpoints of the pairs of trajectories (data mode,
    seed) ``trajectory_pairs`` chooses (every pair up to 16 trajectories, O(n) pairs beyond)
    as ``kernel/cross/<prefix><mode><seed>-<mode><seed>/distance`` (step: the checkpoint's
    training step), logged as one write; and the matrix of those distances at the last
    common epoch, drawn for the trajectories compared pair by pair (all of them up to 16)."""
    from core.trajectory_kernels import cross_trajectory_distances
    from sweep.plots import heatmap_plot

    def name(key: TrajectoryKey) -> str:
        return f"{key[0]}{key[1]}"

    points, last = [], {}
    for a, b in trajectory_pairs(stores):
        a, b = sorted((a, b), key=name)  # the names' order, as metric names always had
        rows = cross_trajectory_distances(stores[a], stores[b])
        metric = f"kernel/cross/{prefix}{name(a)}-{name(b)}/distance"
        points += [(r["step"], {metric: r["distance"]}) for r in rows]
        last[a, b] = last[b, a] = rows[-1]["distance"] if rows else np.nan
    tracker.log_steps(parent, points)
    head = sorted(pairwise_head(stores), key=name)
    matrix = np.array([[0.0 if a == b else last[a, b] for b in head] for a in head])
    shown = "" if len(head) == len(stores) else \
        f" (the first {len(head)} of {len(stores)} trajectories)"
    return heatmap_plot([name(k) for k in head], matrix,
                        "kernel distance between trajectories (last common epoch)" + shown
                        + (f"\n{label}" if label else ""), plot,
                        axis="trajectory (data mode, seed)")
