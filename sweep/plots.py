"""Plots written beside a run: accuracy against switch point, kernel distance curves, heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from core.config import is_network  # noqa: E402
from core.kernel_store import KernelTrajectory  # noqa: E402
from core.kernels import pairwise_distances, per_kernel  # noqa: E402

CODE_STYLE = {"CC": "tab:blue", "AC": "tab:red", "CA": "tab:green", "AA": "tab:purple",
              "C-": "tab:gray", "A-": "black"}


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def epoch_axis(ax, label: str, title: str) -> None:
    """An epoch x axis on a symlog scale (epoch 0 stays visible), a title and a light grid."""
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel(label)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def switch_point_plot(summary: list[dict[str, Any]], path: Path) -> Path:
    """Clean and PGD L-inf accuracy (%) against switch epoch per code, ± std over seeds.

    The phase-1 networks (C-, A-) are dashed; a switch rule's result is a star at the mean
    epoch it chose (horizontal bar: std over seeds); the x axis is symlog so epoch 0 is shown.
    A sweep that varies other values than the seed gets one line per code and variant, the
    variants told apart by marker and shade.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    codes = sorted({r["code"] for r in summary}, key=lambda c: (is_network(c), c))
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
                label = f"{code[0]} network" if is_network(code) else code
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
    axes[0].legend(fontsize=6 if len(variants) > 2 else 8)
    return save_figure(fig, path)


def kernel_distance_plot(trajectories: dict[str, dict[str, Any]], path: Path) -> Path:
    """Distance to the initial and to the final kernel, and velocity, against epoch."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for traj in trajectories.values():
        rows = traj["rows"]
        epochs = [r["epoch"] for r in rows]
        color = "tab:red" if traj["mode"] == "A" else "tab:blue" if traj["mode"] == "C" else None
        label = f"{traj['mode']} seed {traj['seed']}"
        for ax, key in zip(axes, ("to_init", "to_final", "velocity"), strict=True):
            ax.plot(epochs, [r[key] for r in rows], "o-", ms=3, color=color, label=label)
    for ax, title in zip(axes, ("S(k_t, k_0)", "S(k_t, k_T)", "kernel velocity"), strict=True):
        epoch_axis(ax, "epoch", title)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def trajectory_heatmap(trajectory: KernelTrajectory, title: str, path: Path) -> Path:
    """The heatmap of a stored kernel trajectory (class-wise distances averaged)."""
    epochs, kernels = trajectory.stack()
    output = trajectory.load(epochs[0]).meta["output"]
    distances = pairwise_distances(per_kernel(kernels, output)).mean(axis=-1)
    return heatmap_plot(epochs, distances, title, path)


def heatmap_plot(epochs, distances: np.ndarray, title: str, path: Path,
                 axis: str = "epoch") -> Path:
    """A kernel distance matrix [T, T]: epoch by epoch S(k_s, k_t), or between trajectories
    (``epochs`` then holds their names and ``axis`` says what they are)."""
    fig, ax = plt.subplots(figsize=(5, 4.3))
    im = ax.imshow(distances, cmap="viridis", origin="lower")
    labels = [f"{e:g}" if isinstance(e, int | float | np.number) else str(e) for e in epochs]
    ax.set_xticks(range(len(epochs)), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(len(epochs)), labels, fontsize=6)
    ax.set_xlabel(axis)
    ax.set_ylabel(axis)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="kernel distance")
    return save_figure(fig, path)
