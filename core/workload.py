"""What an experiment computes, counted from its config alone (no JAX): minibatch steps by
phase and kind, evaluated models, kernels. The progress bars' planned steps
(``core.experiment.planned_steps``) and the time estimate (``core/estimate.py``) both count
here, so they agree on what a run does.

Counts are upper bounds where the run decides as it goes: a switch rule may stop phase 1
early, and a trajectory already in the store is continued rather than retrained.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from core.config import ExperimentConfig, PhaseSpec
from core.trajectory_store import checkpoint_epochs, epoch_to_step, trajectory_id


@dataclass(frozen=True)
class Work:
    """Units of work; adding two ``Work`` adds their counts."""

    clean1: int = 0  # phase-1 minibatch steps on clean data
    adv1: int = 0  # phase-1 steps on adversarial data (an attack, then SGD)
    clean2: int = 0  # phase-2 steps (linearized / centered / standard dynamics), clean data
    adv2: int = 0
    networks: int = 0  # phase-1 networks evaluated (the ``C-``/``A-`` rows)
    models: int = 0  # phase-2 models evaluated
    kernels: int = 0  # probe-set NTKs of phase-1 checkpoints
    references: int = 0  # reference examples crafted (``eval.reference``, once per seed)

    def __add__(self, other: Work) -> Work:
        return Work(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                       for f in fields(self)})

    @property
    def steps(self) -> int:
        return self.clean1 + self.adv1 + self.clean2 + self.adv2


def _phase(spec: PhaseSpec, mode: str, epochs: float, n_train: int) -> tuple[int, int]:
    """(clean, adversarial) minibatch steps of ``epochs`` epochs of data mode ``mode``."""
    spe = n_train // spec.batch_size
    total = epoch_to_step(epochs, spe)
    adv = {"C": 0, "A": total, "F": max(0, total - spec.flip_epoch * spe)}[mode]
    return total - adv, adv


def phase1_work(cfg: ExperimentConfig, mode: str, n_train: int, kernels: bool) -> Work:
    """One phase-1 trajectory of data mode ``mode`` (one seed), with its kernels if asked."""
    clean, adv = _phase(cfg.phase1, mode, cfg.phase1_epochs, n_train)
    spec = cfg.kernel
    count = (len(spec.epochs) if spec.epochs is not None else len(checkpoint_epochs(cfg))) \
        if kernels and spec.enabled else 0
    return Work(clean1=clean, adv1=adv, kernels=count)


def trajectory_modes(cfg: ExperimentConfig) -> list[str]:
    """The data modes whose phase-1 trajectories an experiment trains (the reference
    network's included)."""
    modes = list(cfg.phase1_modes)
    if cfg.eval.reference and cfg.eval.reference not in modes:
        modes.append(cfg.eval.reference)
    return modes


def switch_work(cfg: ExperimentConfig, n_train: int) -> Work:
    """One seed's phase 2 and evaluations: every loader code from every switch point (the
    rule's included), the phase-1 networks there, and the reference examples. At switch
    point 0 every data mode's network is the initial one, so the network and each loader's
    phase 2 from it are computed once (``core.experiment._InitialRuns``)."""
    switches = len(cfg.switch_points) + (cfg.switch_rule is not None)
    shared = 0 in cfg.switch_points
    networks = len(cfg.phase1_modes) * switches - (len(cfg.phase1_modes) - 1 if shared else 0)
    work = Work(networks=networks, references=1 if cfg.eval.reference else 0)
    for mode in sorted({code[1] for code in cfg.codes}):  # each phase-2 loader data mode
        count = sum(code[1] == mode for code in cfg.codes)
        runs = count * switches - (count - 1 if shared else 0)
        clean, adv = _phase(cfg.phase2, mode, cfg.phase2.epochs, n_train)
        work = work + Work(clean2=clean * runs, adv2=adv * runs, models=runs)
    return work


def experiment_work(cfg: ExperimentConfig, n_train: int, kernels: bool = False) -> Work:
    """Everything one experiment (every seed) computes; kernels only where ``kernels`` (a
    sweep's trials compute them, ``ntk-sweep experiment`` does not)."""
    total = Work()
    for _ in cfg.seeds:
        for mode in trajectory_modes(cfg):
            total = total + phase1_work(cfg, mode, n_train, kernels)
        total = total + switch_work(cfg, n_train)
    return total


def sweep_work(configs: list[ExperimentConfig], n_train: int) -> tuple[Work, int]:
    """The work of a sweep's trials (their configs), each phase-1 trajectory counted once
    however many trials share it (trials train a trajectory once and find it stored after);
    also the number of distinct trajectories."""
    total, seen = Work(), set()
    for cfg in configs:
        for seed in cfg.seeds:
            for mode in trajectory_modes(cfg):
                key = (trajectory_id(cfg, mode, seed), repr(cfg.kernel))
                if key not in seen:
                    seen.add(key)
                    total = total + phase1_work(cfg, mode, n_train, kernels=True)
            total = total + switch_work(cfg, n_train)
    return total, len(seen)

