"""Kernel trajectories of an experiment: the empirical NTK at every phase-1 checkpoint, and the
measures along and across trajectories.

Layout under an experiment's output directory::

    trajectories/<id>/trajectory.json            mode, seed, config (written by phase 1)
    trajectories/<id>/checkpoints/<step>/        orbax checkpoints
    trajectories/<id>/kernels/<output>-<hash>/epoch_*.npz    (hash of probe set, logit, dtype)

The probe set is drawn from ``kernel.probe_seed`` only (not the run's seed), so kernels of
different seeds and data modes are computed on the same images and can be compared.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from core.checkpoints import CheckpointStore
from core.config import ExperimentConfig, KernelSpec, config_from_dict
from core.data import Dataset, balanced_subset
from core.dynamics import BatchNormMode, Dynamics, make_apply_fn
from core.kernel_store import KernelRecord, KernelTrajectory
from core.kernels import cross_distance, summary, trajectory_distances
from core.models import init_model, make_model
from core.ntk import NtkEngine
from core.train import TrainState, init_state


@dataclass(frozen=True)
class TrajectoryInfo:
    id: str
    mode: str
    seed: int
    directory: Path
    config: ExperimentConfig


def find_trajectories(run_dir: str | Path) -> list[TrajectoryInfo]:
    """The phase-1 trajectories stored under an experiment's output directory."""
    infos = []
    for meta_path in sorted(Path(run_dir).glob("trajectories/*/trajectory.json")):
        meta = json.loads(meta_path.read_text())
        cfg = config_from_dict(meta["config"], str(meta_path))
        infos.append(TrajectoryInfo(meta["id"], meta["mode"], meta["seed"], meta_path.parent, cfg))
    return infos


def probe_set(data: Dataset, spec: KernelSpec) -> np.ndarray:
    """Indices of the class-balanced probe set of ``spec.probe_size`` training images."""
    key = jax.random.PRNGKey(spec.probe_seed)
    return balanced_subset(data.y_train, spec.probe_size, key, data.num_classes)


@dataclass(frozen=True)
class OpenTrajectory:
    """What restoring a trajectory's checkpoints needs: data, model, store, a template state."""

    data: Dataset
    model: Any
    store: CheckpointStore
    template: TrainState

    def epochs(self) -> dict[float, int]:
        """{epoch: step} of the stored checkpoints."""
        return {self.store.meta(s)["epoch"]: s for s in self.store.steps()}

    def restore(self, step: int) -> TrainState:
        return self.store.restore(step, self.template)[0]


def open_trajectory(info: TrajectoryInfo) -> OpenTrajectory:
    """Loads the trajectory's dataset and model and opens its checkpoint store."""
    cfg = info.config
    ds = cfg.dataset
    data = ds.load()
    model = make_model(cfg.model.name, data.num_classes, **cfg.model.kwargs())
    params, batch_stats = init_model(model, jax.random.PRNGKey(0), data.x_train.shape[1:])
    template = init_state(params, batch_stats, cfg.phase1.momentum, jax.random.PRNGKey(0))
    return OpenTrajectory(data, model, CheckpointStore(info.directory / "checkpoints"), template)


def kernel_directory(info: TrajectoryInfo, spec: KernelSpec) -> Path:
    """``kernels/<output>-<hash>``: kernels of other probe sets, logits or dtypes never mix."""
    key = {k: getattr(spec, k) for k in ("probe_size", "probe_seed", "output", "logit", "dtype")}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return info.directory / "kernels" / f"{spec.output}-{digest}"


def compute_trajectory_kernels(
    info: TrajectoryInfo, spec: KernelSpec, on_kernel: Callable[[float], None] | None = None
) -> KernelTrajectory:
    """Computes (or finds already stored) the kernel at each requested phase-1 checkpoint."""
    cfg, traj = info.config, open_trajectory(info)
    data, model, store = traj.data, traj.model, traj.store
    idx = probe_set(data, spec)
    x_probe = data.x_train[idx]
    engine = NtkEngine(
        make_apply_fn(model, Dynamics.STANDARD, BatchNormMode.FROZEN), spec.output,
        logit=spec.logit, implementation=spec.implementation, block_size=spec.block_size,
        memory_budget=int(spec.memory_budget_gb * 2**30), dtype=spec.dtype, model=model,
    )
    trajectory = KernelTrajectory(kernel_directory(info, spec))
    wanted = None if spec.epochs is None else set(spec.epochs)
    for step in store.steps():
        record = store.meta(step)
        epoch = record["epoch"]
        if (wanted is not None and epoch not in wanted) or trajectory.has(epoch):
            continue
        state = traj.restore(step)
        kernel = engine(None, state.params, state.batch_stats, x_probe)
        meta = {"model": cfg.model.name, "epoch": epoch, "step": step, "output": spec.output,
                "exact_epoch": record.get("exact_epoch", epoch),
                "logit": spec.logit, "dtype": spec.dtype, "mode": info.mode, "seed": info.seed,
                "trajectory": info.id, "implementation": spec.implementation}
        trajectory.save(KernelRecord(kernel, idx, data.y_train[idx], meta))
        if on_kernel is not None:
            on_kernel(epoch)
    store.close()
    return trajectory


def per_kernel(kernels: np.ndarray, output: str) -> np.ndarray:
    """[T, ..., N, N] -> [T, C, N, N]: class-wise stacks stay, single kernels get C = 1."""
    if output == "full":  # [T, N, N, O, O] -> class-wise diagonal blocks [T, O, N, N]
        return np.einsum("tijoo->toij", kernels)
    return kernels if kernels.ndim == 4 else kernels[:, None]


def trajectory_measures(trajectory: KernelTrajectory, num_classes: int) -> list[dict[str, Any]]:
    """One row per stored epoch: distances to init/previous/final, velocity, alignment,
    spectrum; class-wise values averaged over classes."""
    epochs = trajectory.epochs()
    records = [trajectory.load(e) for e in epochs]
    exact = [r.meta.get("exact_epoch", e) for r, e in zip(records, epochs, strict=True)]
    k = per_kernel(np.stack([r.kernel for r in records]), records[0].meta["output"])
    dist = trajectory_distances(k, np.asarray(exact))  # velocities over the true step gaps
    per = summary(k, records[0].labels, num_classes)
    rows = []
    for t, epoch in enumerate(epochs):
        row: dict[str, Any] = {"epoch": float(epoch)}
        row.update({name: float(np.mean(v[t])) for name, v in {**dist, **per}.items()})
        rows.append(row)
    return rows


def cross_trajectory_distances(a: KernelTrajectory, b: KernelTrajectory) -> list[dict[str, Any]]:
    """S(a_t, b_t) at the epochs both trajectories have (class-wise mean)."""
    common = sorted(set(a.epochs()) & set(b.epochs()))
    if not common:
        return []
    _, ka = a.stack(common)
    _, kb = b.stack(common)
    output = a.load(common[0]).meta["output"]
    d = cross_distance(per_kernel(ka, output), per_kernel(kb, output)).mean(axis=-1)
    return [{"epoch": float(e), "distance": float(v)} for e, v in zip(common, d, strict=True)]
