"""Plots written beside a run: accuracy against switch point, kernel distance, alignment and
spectrum curves, polar dynamics, heatmaps. A figure of a run, a report or ``ntk-sweep kernel``
is written as PNG and as PDF (vector, for papers) beside it; ``figure_files`` lists both for
MLflow. A sweep's trial draws its kernel figures as one overview PNG (``kernel_overview``):
one file and one render a trial instead of ten."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from core.config import is_network  # noqa: E402
from core.kernel_store import KernelTrajectory  # noqa: E402
from core.kernels import pairwise_distances, per_kernel, polar  # noqa: E402
from core.results import row_order  # noqa: E402

CODE_STYLE = {"CC": "tab:blue", "AC": "tab:red", "CA": "tab:green", "AA": "tab:purple",
              "C-": "tab:gray", "A-": "black"}


SEED_STYLES = ("-", "--", ":", "-.")  # seeds of one data mode: same colour, other lines
MAX_ANNOTATED = 12  # heatmaps up to this size show their values in the cells


def save_figure(fig, path: Path, pdf: bool = True, tight: bool = True) -> Path:
    """Writes ``path`` (PNG) and, with ``pdf``, the same figure as PDF beside it; returns
    ``path``. ``tight``: fit the layout to the labels first (measures every text: a third of
    the time of a small figure; a figure with a fixed grid passes False)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    if pdf:
        fig.savefig(path.with_suffix(".pdf"))
    plt.close(fig)
    return path


def figure_files(path: Path) -> list[Path]:
    """``path`` and, for a figure, its PDF twin (what goes to MLflow)."""
    twin = path.with_suffix(".pdf")
    return [path, twin] if path.suffix == ".png" and twin.is_file() else [path]


def describe(params: dict[str, Any], swept: Any = ()) -> str:
    """``digits, cnn width 32, phase-1 L-inf eps 0.3``: dataset, model and attack strength of
    a config's flattened params (``sweep.mlflow_runs.flat_params``), leaving out what a sweep
    varies (``swept`` paths: those differ between the lines)."""
    parts = []
    if "dataset.name" not in swept and "dataset.name" in params:
        parts.append(str(params["dataset.name"]))
    if "model.name" in params and not {"model.name", "model.width"} & set(swept):
        width = params.get("model.width")
        parts.append(str(params["model.name"]) + (
            f" width {width}" if width not in (None, "null", "None") else ""))
    eps = params.get("phase1.attack.eps")
    if eps is not None and "phase1.attack.eps" not in swept:
        parts.append(f"phase-1 L-inf eps {float(eps):.3g}")
    return ", ".join(parts)


def _seed_style(trajectories: dict[str, dict[str, Any]]) -> dict[str, str]:
    seeds = sorted({str(t["seed"]) for t in trajectories.values()})
    return {s: SEED_STYLES[i % len(SEED_STYLES)] for i, s in enumerate(seeds)}


def _mode_color(mode: str) -> str | None:
    return {"A": "tab:red", "C": "tab:blue", "F": "tab:green"}.get(mode)


def epoch_axis(ax, label: str, title: str) -> None:
    """An epoch x axis on a symlog scale (epoch 0 stays visible), a title and a light grid."""
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel(label)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def switch_point_plot(summary: list[dict[str, Any]], path: Path, subtitle: str = "") -> Path:
    """Clean and PGD L-inf accuracy (%) against switch epoch per code, ± std over seeds.

    The phase-1 networks (C-, A-) are dashed; a switch rule's result is a star at the mean
    epoch it chose (horizontal bar: std over seeds); the x axis is symlog so epoch 0 is shown.
    A sweep that varies other values than the seed gets one line per code and variant, the
    variants told apart by marker and shade. A tick at every switch point; ``subtitle``
    (``describe``) names dataset, model and eps.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    codes = list(dict.fromkeys(r["code"] for r in sorted(summary, key=row_order)))
    variants = sorted({r.get("variant", "") for r in summary})
    markers = "osD^vP<>X"
    for ax, key, title in ((axes[0], "worst_linf", "worst-case L-inf accuracy (%)"),
                           (axes[1], "accuracy", "clean accuracy (%)")):
        for code in codes:
            for v, variant in enumerate(variants):
                mine = [r for r in summary if r["code"] == code and r.get("variant", "") ==
                        variant]
                rows = sorted((r for r in mine if not r.get("switch_rule")),
                              key=lambda r: r["switch_epoch"])
                x = [r["switch_epoch"] for r in rows]
                y = np.array([100 * r[f"{key}_mean"] for r in rows])
                err = np.array([100 * r[f"{key}_std"] for r in rows])
                style = "--" if is_network(code) else "-"
                label = code
                label += f" {variant}" if variant else ""
                shade = 1.0 - 0.6 * v / max(len(variants) - 1, 1)
                ax.errorbar(x, y, yerr=err, fmt=style + markers[v % len(markers)], ms=4,
                            capsize=3, color=CODE_STYLE.get(code), alpha=shade, label=label)
                for r in (r for r in mine if r.get("switch_rule")):
                    ax.errorbar([r["switch_epoch"]], [100 * r[f"{key}_mean"]],
                                yerr=[100 * r[f"{key}_std"]],
                                xerr=[r.get("switch_epoch_std", 0)], fmt="*", ms=11, capsize=3,
                                color=CODE_STYLE.get(code), alpha=shade,
                                label=f"{label} {r['switch_rule']}")
        epoch_axis(ax, "switch epoch", title)
        ticks = sorted({r["switch_epoch"] for r in summary if not r.get("switch_rule")})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7)
        ax.set_ylabel("accuracy (%)")
    if subtitle:
        fig.suptitle(subtitle, fontsize=9)
    axes[0].legend(fontsize=6 if len(variants) > 2 else 8,
                   title="X-: the phase-1 network of data mode X", title_fontsize=6)
    return save_figure(fig, path)


def kernel_distance_plot(trajectories: dict[str, dict[str, Any]], path: Path) -> Path:
    """Distance to the initial and to the final kernel, and velocity, against epoch."""
    return _measure_curves(trajectories, path, *DISTANCES)


def kernel_measures_plot(trajectories: dict[str, dict[str, Any]], path: Path) -> Path:
    """Target alignment, centered alignment and effective rank of each trajectory's kernel
    against epoch (does the A kernel align with the labels faster than the C kernel?)."""
    return _measure_curves(trajectories, path, *ALIGNMENTS)


DISTANCES = (("to_init", "to_final", "velocity"),
             ("S(k_t, k_0)", "S(k_t, k_T)", "kernel velocity"))
ALIGNMENTS = (("alignment", "centered_alignment", "effective_rank"),
              ("kernel-target alignment", "centered alignment", "effective rank"))


def _measure_curves(trajectories: dict[str, dict[str, Any]], path: Path,
                    keys: tuple[str, ...], titles: tuple[str, ...]) -> Path:
    """One panel per measure, one line per trajectory (colour: data mode, line: seed)."""
    fig, axes = plt.subplots(1, len(keys), figsize=(13, 3.8))
    _draw_measure_curves(axes, trajectories, keys, titles)
    return save_figure(fig, path)


def _draw_measure_curves(axes, trajectories: dict[str, dict[str, Any]],
                         keys: tuple[str, ...], titles: tuple[str, ...]) -> None:
    style = _seed_style(trajectories)
    for traj in trajectories.values():
        rows = traj["rows"]
        epochs = [r["epoch"] for r in rows]
        label = f"{traj['mode']} seed {traj['seed']}"
        for ax, key in zip(axes, keys, strict=True):
            ax.plot(epochs, [r[key] for r in rows], "o" + style[str(traj["seed"])], ms=3,
                    color=_mode_color(traj["mode"]), label=label)
    for ax, title in zip(axes, titles, strict=True):
        epoch_axis(ax, "epoch", title)
    axes[0].legend(fontsize=8)


def polar_plot(trajectories: dict[str, KernelTrajectory], path: Path) -> Path:
    """The paper's polar view of kernel dynamics (``core.kernels.polar``): for each
    trajectory, radius ||K_t - K_0|| / ||K_T - K_0|| against angle arccos(1 - S(K_t, K_0)),
    class-wise means, one point per stored epoch (the first at the origin)."""
    fig = plt.figure(figsize=(5, 4.6))
    _draw_polar(fig.add_subplot(projection="polar"), trajectories)
    return save_figure(fig, path)


def _draw_polar(ax, trajectories: dict[str, KernelTrajectory]) -> None:
    for label, store in sorted(trajectories.items()):
        epochs, kernels = store.stack()
        output = store.load(epochs[0]).meta["output"]
        moves = polar(per_kernel(kernels, output))
        angle = moves["angle"].reshape(len(epochs), -1).mean(axis=1)
        radius = moves["radius"].reshape(len(epochs), -1).mean(axis=1)
        seed = label.rsplit(" ", 1)[-1]
        ax.plot(angle, radius, "o" + SEED_STYLES[int(seed) % len(SEED_STYLES)]
                if seed.isdigit() else "o-", ms=3, color=_mode_color(label[:1]), label=label)
    ax.set_thetamax(90)
    ax.set_title("kernel dynamics: radius (to the final kernel) vs angle (from init)",
                 fontsize=8)
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0.75, 0.8))


def trajectory_heatmap(trajectory: KernelTrajectory, title: str, path: Path) -> Path:
    """The heatmap of a stored kernel trajectory (class-wise distances averaged)."""
    return heatmap_plot(*_trajectory_distances(trajectory), title, path)


def _trajectory_distances(trajectory: KernelTrajectory) -> tuple[list[float], np.ndarray]:
    """A stored trajectory's epochs [T] and S(k_s, k_t) [T, T], class-wise means."""
    epochs, kernels = trajectory.stack()
    output = trajectory.load(epochs[0]).meta["output"]
    return epochs, pairwise_distances(per_kernel(kernels, output)).mean(axis=-1)


def heatmap_plot(epochs, distances: np.ndarray, title: str, path: Path,
                 axis: str = "epoch") -> Path:
    """A kernel distance matrix [T, T]: epoch by epoch S(k_s, k_t), cells spaced by their
    epochs, or between trajectories (``epochs`` then holds their names and ``axis`` says what
    they are). Up to ``MAX_ANNOTATED`` rows, every cell shows its value."""
    fig, ax = plt.subplots(figsize=(5, 4.3))
    _draw_heatmap(fig, ax, epochs, distances, title, axis)
    return save_figure(fig, path)


def _draw_heatmap(fig, ax, epochs, distances: np.ndarray, title: str, axis: str) -> None:
    numeric = all(isinstance(e, int | float | np.number) for e in epochs) and len(epochs) > 1
    labels = [f"{e:g}" if isinstance(e, int | float | np.number) else str(e) for e in epochs]
    if numeric:  # cell edges half-way between epochs: 0, 1, 2, 10, 30 are not evenly spaced
        x = np.asarray(epochs, dtype=float)
        mid = (x[1:] + x[:-1]) / 2
        edges = np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])
        im = ax.pcolormesh(edges, edges, distances, cmap="viridis")
        centres = x
    else:
        im = ax.imshow(distances, cmap="viridis", origin="lower")
        centres = np.arange(len(epochs))
    ax.set_xticks(centres, labels, rotation=90, fontsize=6)
    ax.set_yticks(centres, labels, fontsize=6)
    if len(epochs) <= MAX_ANNOTATED:
        top = np.nanmax(distances) if np.isfinite(distances).any() else 1.0
        for i, yi in enumerate(centres):
            for j, xj in enumerate(centres):
                value = distances[i, j]
                ax.text(xj, yi, f"{value + 0.0:.2f}".replace("-0.00", "0.00"), ha="center",
                        va="center", fontsize=5,
                        color="white" if value < 0.5 * top else "black")
    ax.set_xlabel(axis)
    ax.set_ylabel(axis)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="kernel distance")


def kernel_overview(trajectories: dict[str, dict[str, Any]],
                    stores: dict[str, KernelTrajectory], path: Path, title: str = "") -> Path:
    """A trial's kernel figures in one PNG (no PDF): the distance curves (``DISTANCES``), the
    alignment curves (``ALIGNMENTS``), and a row with the polar view and one epoch-by-epoch
    heatmap per trajectory. ``trajectories`` as for ``kernel_distance_plot``; ``stores``: the
    kernel trajectories by label (``<mode> seed <seed>``)."""
    cols = max(3, 1 + len(stores))
    fig = plt.figure(figsize=(4.4 * cols, 12.5))
    grid = fig.add_gridspec(3, cols, left=0.05, right=0.97, bottom=0.05, top=0.93,
                            wspace=0.3, hspace=0.38)
    for row, (keys, titles) in enumerate((DISTANCES, ALIGNMENTS)):
        _draw_measure_curves([fig.add_subplot(grid[row, c]) for c in range(3)], trajectories,
                             keys, titles)
    _draw_polar(fig.add_subplot(grid[2, 0], projection="polar"), stores)
    for c, (label, store) in enumerate(sorted(stores.items()), start=1):
        _draw_heatmap(fig, fig.add_subplot(grid[2, c]), *_trajectory_distances(store),
                      f"kernel distances, {label}", "epoch")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, pdf=False, tight=False)
