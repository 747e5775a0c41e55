"""Kernel trajectories of an experiment: the empirical NTK at every phase-1 checkpoint, and the
measures along and across trajectories.

Kernels are stored with their trajectory (``Trajectory.kernels``, see
``core/trajectory_store.py`` for the layout).

The probe set is drawn from ``kernel.probe_seed`` only (not the run's seed), so kernels of
different seeds and data modes are computed on the same images and can be compared.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from core.checkpoints import CheckpointStore
from core.config import KernelSpec, SwitchRule
from core.data import Dataset, balanced_subset, dataset_of
from core.dynamics import BatchNormMode, Dynamics, make_apply_fn
from core.kernel_store import KernelRecord, KernelTrajectory
from core.kernels import cross_distance, per_kernel, summary, trajectory_distances
from core.models import init_model, make_model
from core.ntk import NtkEngine
from core.recent import recent
from core.train import TrainState, init_state
from core.trajectory_store import Trajectory

LOG = logging.getLogger(__name__)


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


def open_trajectory(trajectory: Trajectory) -> OpenTrajectory:
    """Loads the trajectory's dataset and model and opens its checkpoint store."""
    cfg = trajectory.config
    ds = cfg.dataset
    data = dataset_of(ds)
    model = make_model(cfg.model.name, data.num_classes, **cfg.model.kwargs())
    params, batch_stats = init_model(model, jax.random.PRNGKey(0), data.x_train.shape[1:])
    template = init_state(params, batch_stats, cfg.phase1.momentum, jax.random.PRNGKey(0))
    return OpenTrajectory(data, model, trajectory.checkpoints(), template)


# Kernel engines of this process by what their programs are built from (the last
# ENGINE_SETS): the trajectories of an experiment and the trials a reused Ray worker runs
# trace and compile an engine's two programs once instead of once per trajectory.
ENGINE_SETS = 4
_ENGINES: dict[str, NtkEngine] = {}


def kernel_engine(model: Any, spec: KernelSpec,
                  input_shape: tuple[int, ...] | None = None) -> NtkEngine:
    """The engine computing a config's kernels of ``model``: the network as evaluated
    (standard dynamics, batch-norm statistics frozen), with ``spec``'s output, logit,
    implementation, block size, memory budget and dtype. Given the shape of one input
    ``input_shape``, the process's engine for (model, spec, shape) (it keeps its compiled
    programs); without it, a new engine."""
    def build() -> NtkEngine:
        return NtkEngine(
            make_apply_fn(model, Dynamics.STANDARD, BatchNormMode.FROZEN), spec.output,
            logit=spec.logit, implementation=spec.implementation, block_size=spec.block_size,
            memory_budget=spec.memory_budget_bytes, dtype=spec.dtype, model=model,
        )

    if input_shape is None:
        return build()
    return recent(_ENGINES, repr((model, spec, tuple(input_shape))), build, ENGINE_SETS)


class KernelRecorder:
    """Computes and stores the probe-set kernel of checkpoints of one trajectory.

    Used after training (``compute_trajectory_kernels``) and during phase 1 (switch rules);
    both write the same files, so a kernel is never computed twice.
    """

    def __init__(self, trajectory: Trajectory, spec: KernelSpec, data: Dataset, model: Any):
        self.spec = spec
        self.indices = probe_set(data, spec)
        self.x_probe = data.x_train[self.indices]
        self.labels = data.y_train[self.indices]
        self.meta = {"model": trajectory.config.model.name, "mode": trajectory.mode,
                     "seed": trajectory.seed, "trajectory": trajectory.id}
        self.engine = kernel_engine(model, spec, self.x_probe.shape[1:])
        self.trajectory = trajectory.kernels(spec)

    def record(self, state: TrainState, step: int, checkpoint_meta: dict[str, Any]) -> None:
        """Computes and saves the kernel of ``state`` (checkpoint ``step``) unless stored."""
        epoch = checkpoint_meta["epoch"]
        if self.trajectory.has(epoch):
            return
        kernel = self.engine(None, state.params, state.batch_stats, self.x_probe)
        spec = self.spec
        meta = {**self.meta, "epoch": epoch, "step": step, "output": spec.output,
                "exact_epoch": checkpoint_meta.get("exact_epoch", epoch), "logit": spec.logit,
                "dtype": spec.dtype, "implementation": spec.implementation}
        self.trajectory.save(KernelRecord(kernel, self.indices, self.labels, meta))


def compute_trajectory_kernels(
    trajectory: Trajectory, spec: KernelSpec, on_kernel: Callable[[float], None] | None = None,
    on_wait: Callable[[], None] | None = None,
) -> KernelTrajectory:
    """Computes (or finds already stored) the kernel at each requested phase-1 checkpoint,
    holding the trajectory's lock: trials that share a trajectory compute its kernels once
    (the second finds them stored; ``on_wait`` is called if it has to wait)."""
    with trajectory.lock(on_wait):
        return _compute_kernels(trajectory, spec, on_kernel)


def _compute_kernels(trajectory: Trajectory, spec: KernelSpec,
                     on_kernel: Callable[[float], None] | None) -> KernelTrajectory:
    traj = open_trajectory(trajectory)
    recorder = KernelRecorder(trajectory, spec, traj.data, traj.model)
    for epoch in recorder.trajectory.verify():
        LOG.warning("trajectory %s: the kernel of epoch %g in %s was damaged; set aside, "
                    "computed again", trajectory.id, epoch, recorder.trajectory.path)
    wanted = None if spec.epochs is None else set(spec.epochs)
    for step in traj.store.steps():
        record = traj.store.meta(step)
        epoch = record["epoch"]
        if (wanted is not None and epoch not in wanted) or recorder.trajectory.has(epoch):
            continue
        recorder.record(traj.restore(step), step, record)
        if on_kernel is not None:
            on_kernel(epoch)
    traj.store.close()
    return recorder.trajectory


def switch_rule_trigger(records: list[KernelRecord], rule: SwitchRule) -> float | None:
    """The epoch at which ``rule`` triggers on the kernels of consecutive checkpoints
    ``records`` (ascending epochs), or None: the first checkpoint at epoch >= ``rule.after``
    that ends a run of ``rule.checkpoints`` consecutive checkpoints (t >= 1) whose class-wise
    mean ``rule.measure`` is below ``rule.below`` (the values ``trajectory_measures`` gives).
    """
    if len(records) < 2:
        return None
    epochs = [r.meta["epoch"] for r in records]
    exact = np.asarray([r.meta.get("exact_epoch", r.meta["epoch"]) for r in records])
    k = per_kernel(np.stack([r.kernel for r in records]), records[0].meta["output"])
    values = trajectory_distances(k, exact)[rule.measure].reshape(len(records), -1).mean(axis=1)
    run = 0
    for t in range(1, len(records)):
        run = run + 1 if values[t] < rule.below else 0
        if run >= rule.checkpoints and epochs[t] >= rule.after:
            return float(epochs[t])
    return None


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
        row: dict[str, Any] = {"epoch": float(epoch), "step": int(records[t].meta["step"])}
        row.update({name: float(np.mean(v[t])) for name, v in {**dist, **per}.items()})
        rows.append(row)
    return rows


def cross_trajectory_distances(a: KernelTrajectory, b: KernelTrajectory) -> list[dict[str, Any]]:
    """S(a_t, b_t) at the epochs both trajectories have (class-wise mean), with the training
    step of ``a``'s checkpoint at each."""
    common = sorted(set(a.epochs()) & set(b.epochs()))
    if not common:
        return []
    records = [a.load(e) for e in common]
    ka = np.stack([r.kernel for r in records])
    _, kb = b.stack(common)
    output = records[0].meta["output"]
    d = cross_distance(per_kernel(ka, output), per_kernel(kb, output)).mean(axis=-1)
    return [{"epoch": float(e), "step": int(r.meta["step"]), "distance": float(v)}
            for e, r, v in zip(common, records, d, strict=True)]
