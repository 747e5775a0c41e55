"""``ntk-sweep kernel``: compute kernel trajectories of an experiment and print their measures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from core.config import ConfigError, KernelSpec, format_errors, parse_overrides
from core.data import DataError, dataset_of
from core.kernels import MEASURES, trajectory_pairs
from core.preflight import preflight
from core.results import write_csv
from core.trajectory_kernels import (
    compute_trajectory_kernels,
    cross_trajectory_distances,
    open_trajectory,
    probe_set,
    trajectory_measures,
)
from core.trajectory_store import (
    Trajectory,
    TrajectoryStore,
    kernel_key,
    kernel_storage_bytes,
)
from sweep.console import stdout_console
from sweep.plots import kernel_distance_plot, kernel_measures_plot, polar_plot, trajectory_heatmap

COLUMNS = ("epoch", *MEASURES)


def kernel_spec(run_dir: Path, overrides: list[str]) -> tuple[KernelSpec, list[Trajectory]]:
    """The kernel settings (the experiment's, with ``kernel.*`` overrides), validated against
    the data, and the run's trajectories."""
    infos = TrajectoryStore(run_dir).stored()
    base = infos[0].config.kernel.model_dump() if infos else {}
    extra = parse_overrides(overrides)
    unknown = set(extra) - {"kernel"}
    if unknown:
        raise ConfigError(f"--set: only kernel.* settings apply here, got {sorted(unknown)}")
    try:
        spec = KernelSpec.model_validate({**base, **extra.get("kernel", {})})
    except ValidationError as e:
        lines = "\n".join(f"kernel.{line}" for line in format_errors(e, KernelSpec).splitlines())
        raise ConfigError(f"invalid kernel settings\n{lines}") from None
    if infos:
        # The checks every command shares (probe set against the data, storage budget).
        cfg = infos[0].config.model_copy(update={"kernel": spec})
        data = dataset_of(cfg.dataset)
        per_trajectory = kernel_storage_bytes(cfg, data.num_classes) / len(cfg.phase1_modes)
        preflight(cfg, kernels=True, data=data, kernel_bytes=per_trajectory * len(infos))
        if spec.epochs is not None:
            stored = set(open_trajectory(infos[0]).epochs())
            if not stored & set(spec.epochs):
                raise DataError(f"kernel.epochs: none of {list(spec.epochs)} is a checkpoint; "
                                f"checkpoints are at {sorted(stored)}")
    return spec, infos


def _table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    for c in COLUMNS:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*(f"{r[c]:.4g}" for c in COLUMNS))
    return table


def run_kernels(run_dir: Path, spec: KernelSpec, infos: list[Trajectory],
                quiet: bool = False) -> dict[str, Any]:
    """Computes every trajectory's kernels, prints and writes ``kernel_measures.{json,csv}``."""
    err, out = Console(stderr=True), stdout_console()
    trajectories = {}
    with Progress(console=err, disable=quiet) as progress:
        for info in infos:
            task = progress.add_task(f"kernels {info.mode} seed {info.seed}", total=None)
            trajectories[info.id] = compute_trajectory_kernels(
                info, spec, on_kernel=lambda e, t=task: progress.advance(t))
    num_classes = len(set(trajectories[infos[0].id].load(
        trajectories[infos[0].id].epochs()[0]).labels.tolist()))
    result: dict[str, Any] = {"kernel": spec.model_dump(), "trajectories": {}, "cross": []}
    flat = []
    for info in infos:
        rows = trajectory_measures(trajectories[info.id], num_classes)
        result["trajectories"][info.id] = {"mode": info.mode, "seed": info.seed, "rows": rows}
        flat += [{"trajectory": info.id, "mode": info.mode, "seed": info.seed, **r} for r in rows]
        out.print(_table(f"trajectory {info.id}: mode {info.mode}, seed {info.seed}", rows))
    by_key = {(i.mode, i.seed): i for i in infos}
    for a, b in ((by_key[x], by_key[y]) for x, y in trajectory_pairs(by_key)):
        cross = cross_trajectory_distances(trajectories[a.id], trajectories[b.id])
        result["cross"].append({"a": a.id, "b": b.id, "modes": a.mode + b.mode,
                                "seeds": [a.seed, b.seed], "rows": cross})
        if cross:
            last = cross[-1]
            out.print(f"distance {a.mode}/seed {a.seed} vs {b.mode}/seed {b.seed} at epoch "
                      f"{last['epoch']:g}: {last['distance']:.4f}")
    (run_dir / "kernel_measures.json").write_text(json.dumps(result, indent=1))
    plots = [kernel_distance_plot(result["trajectories"], run_dir / "kernel_distances.png"),
             kernel_measures_plot(result["trajectories"], run_dir / "kernel_measures.png"),
             polar_plot({f"{i.mode} seed {i.seed}": trajectories[i.id] for i in infos},
                        run_dir / "kernel_polar.png")]
    for info in infos:
        plots.append(trajectory_heatmap(
            trajectories[info.id], f"kernel distances, {info.mode} seed {info.seed}",
            run_dir / f"kernel_heatmap_{info.mode}_seed{info.seed}.png"))
    out.print("plots: " + ", ".join(str(p) for p in plots))
    write_csv(run_dir / "kernel_measures.csv", flat, list(flat[0]))
    out.print(f"kernels: {run_dir}/trajectories/*/trajectory.pack (setting "
              f"{kernel_key(spec)}); measures: {run_dir / 'kernel_measures.csv'}")
    return result


def run_features(run_dir: Path, spec: KernelSpec, infos: list[Trajectory], epoch: float,
                 classes: list[int] | None, steps: int) -> list[Path]:
    """Eigen-feature grids (``core.features``) of every trajectory at ``epoch``."""
    from core.dynamics import make_apply_fn
    from core.features import eigen_features, write_grid
    from core.ntk import NtkEngine

    out, paths = stdout_console(), []
    for info in infos:
        traj = open_trajectory(info)
        data, model, steps_at = traj.data, traj.model, traj.epochs()
        if epoch not in steps_at:
            raise DataError(f"--epoch {epoch:g}: trajectory {info.id} has checkpoints at "
                            f"{sorted(steps_at)}")
        state = traj.restore(steps_at[epoch])
        traj.store.close()
        idx = probe_set(data, spec)
        apply = make_apply_fn(model, "standard", "frozen")
        budget = spec.memory_budget_bytes
        kernels = NtkEngine(apply, "classwise", memory_budget=budget, model=model)(
            None, state.params, state.batch_stats, data.x_train[idx])
        wanted = classes if classes is not None else list(range(min(data.num_classes, 10)))
        present = set(data.y_train[idx].tolist())
        if bad := [c for c in wanted if c not in present]:
            raise DataError(f"--classes: {bad} not in the probe set's classes "
                            f"(0 to {data.num_classes - 1})")
        images = eigen_features(apply, state.params, state.batch_stats, data.x_train[idx],
                                data.y_train[idx], kernels, wanted, steps=steps)
        path = write_grid(images, run_dir / "features" / f"{info.mode}-seed{info.seed}-"
                          f"epoch{epoch:g}.png",
                          title=f"NTK eigen-features, mode {info.mode}, seed {info.seed}, "
                                f"epoch {epoch:g}")
        out.print(f"features: {path}")
        paths.append(path)
    return paths
