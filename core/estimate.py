"""What a run will take on this machine, before it starts (``ntk-sweep validate --estimate``).

A run's time is, to first order, its units of work (``core/workload.py``) times the seconds
each takes here, plus compilation:

    T = n_clean1 t_clean1 + n_adv1 t_adv1 + n_clean2 t_clean2 + n_adv2 t_adv2
        + networks t_net + models t_model + kernels t_kernel + references t_ref + compile

The unit times are measured by calling the experiment's own jitted programs
(``core.experiment``: the phase steps, the evaluation ensemble, the NTK engine) on the run's
real shapes: one call to compile, then timed calls. Left out: reading and writing
checkpoints, kernel measures, tracking and Ray's per-trial start (seconds per trial), and
early stops (a switch rule, ASHA), so it is an estimate of the compute, an upper bound where
a run stops early.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import jax

from core.config import DatasetSpec, ExperimentConfig
from core.data import dataset_of
from core.dynamics import Anchor
from core.experiment import (
    craft,
    evaluate_model,
    initial_params,
    make_context,
    phase_steps,
)
from core.train import epoch_batches, init_state, own_copy
from core.trajectory_kernels import kernel_engine, probe_set
from core.workload import Work, experiment_work, sweep_work

# How long to time a unit after its compiling call: at least MIN_REPEATS calls, more until
# MIN_SECONDS have passed (at most MAX_REPEATS); the median is kept.
MIN_REPEATS, MAX_REPEATS, MIN_SECONDS = 2, 20, 0.3


@dataclass(frozen=True)
class UnitTimes:
    """Seconds per unit of ``Work`` (same field names), and compilation seconds (the first
    calls less the timed ones: what a fresh process pays before its first step)."""

    clean1: float = 0.0
    adv1: float = 0.0
    clean2: float = 0.0
    adv2: float = 0.0
    networks: float = 0.0
    models: float = 0.0
    kernels: float = 0.0
    references: float = 0.0
    compile: float = 0.0

    def seconds(self, work: Work) -> dict[str, float]:
        """Seconds of each kind of work in ``work`` (compilation not included)."""
        return {f.name: getattr(work, f.name) * getattr(self, f.name) for f in fields(work)}


def _timed(call: Callable[[], Any]) -> tuple[float, float]:
    """(first call's seconds, median seconds of the later calls) of ``call``, each waited
    for (``block_until_ready``)."""
    start = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - start
    times: list[float] = []
    while len(times) < MIN_REPEATS or (sum(times) < MIN_SECONDS and len(times) < MAX_REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def measure(cfg: ExperimentConfig, work: Work, log: Callable[[str], None] = lambda m: None
            ) -> UnitTimes:
    """Times each unit ``work`` has (others stay 0) for ``cfg``'s dataset, model, batch sizes,
    attacks, dynamics, evaluation ensemble and probe set, on the default device. Writes
    nothing outside a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="ntk-sweep-estimate-") as tmp:
        ctx = make_context(cfg, tmp)
        seed = cfg.seeds[0]
        # Placed as the run places them (committed to the data's device: restored from a
        # checkpoint, or outputs of committed inputs), so that the programs compiled here are
        # the run's own (jit compiles again for other placements).
        device = next(iter(ctx.x_train.devices()))
        params, batch_stats = jax.device_put(initial_params(ctx, seed), device)
        key = jax.random.PRNGKey(seed)
        n = len(ctx.y_train)
        anchor = Anchor(params, batch_stats)
        unit: dict[str, float] = {}
        compile_s = 0.0

        def time_unit(name: str, call: Callable[[], Any], per: int = 1) -> None:
            nonlocal compile_s
            if getattr(work, name) == 0:
                return
            log(f"timing {name}")
            first, each = _timed(call)
            compile_s += max(0.0, first - each)
            unit[name] = each * per

        for phase, (clean, adv), state_anchor in (
            ("phase1", ("clean1", "adv1"), None), ("phase2", ("clean2", "adv2"), anchor),
        ):
            spec = cfg.phase1 if phase == "phase1" else cfg.phase2
            state = init_state(params, batch_stats, spec.momentum, key)
            idx = jax.device_put(epoch_batches(key, 0, n, spec.batch_size)[0], device)
            steps = phase_steps(ctx, phase)
            for name, adversarial in ((clean, False), (adv, True)):
                # The program ``run_phase`` runs: the step donating its state, on a state
                # placed as it places it (each call's output state is the next one's input).
                held = [own_copy(state, ctx.x_train)]

                def step(a=adversarial, an=state_anchor, st=steps, i=idx, h=held):
                    h[0], metrics = st[a].donating(h[0], an, ctx.x_train, ctx.y_train, i)
                    return metrics

                time_unit(name, step)

        # Evaluations: one batch of the test set (every batch has its shape, padded), scaled.
        n_test, batch = len(ctx.y_test), cfg.eval.batch_size
        batches = math.ceil(n_test / batch)
        ctx.x_test, ctx.y_test = ctx.x_test[:batch], ctx.y_test[:batch]
        state = init_state(params, batch_stats, cfg.phase2.momentum, key)
        x_ref = ctx.x_test if cfg.eval.reference else None
        eval_key = jax.random.fold_in(key, 3)
        time_unit("networks", lambda: evaluate_model(ctx, eval_key, state, None, state, x_ref),
                  batches)
        time_unit("models", lambda: evaluate_model(ctx, eval_key, state, anchor, state, x_ref),
                  batches)
        time_unit("references", lambda: craft(ctx, None, state, eval_key), batches)

        if work.kernels:
            spec = cfg.kernel
            x_probe = ctx.data.x_train[probe_set(ctx.data, spec)]
            engine = kernel_engine(ctx.model, spec)
            time_unit("kernels", lambda: engine(None, params, batch_stats, x_probe))
        return UnitTimes(**unit, compile=compile_s)


def shape_key(cfg: ExperimentConfig) -> str:
    """What decides the unit times of a config (two configs with the same key run the same
    programs on the same shapes): everything but counts, learning rates and seeds."""
    keep = {
        "dataset": cfg.dataset, "model": cfg.model, "eval": cfg.eval, "kernel": cfg.kernel,
        **{f"{p}.{k}": getattr(getattr(cfg, p), k) for p in ("phase1", "phase2")
           for k in ("batch_size", "attack", "adv_scheme")},
        "phase2.dynamics": cfg.phase2.dynamics, "phase2.bn": cfg.phase2.bn,
    }
    return repr(sorted(keep.items()))


@dataclass(frozen=True)
class Estimate:
    """A run's estimated seconds by kind of work, and what they rest on."""

    work: Work
    seconds: dict[str, float]  # by ``Work`` field
    compile_s: float  # once per program shape: trials share the persistent compilation cache
    trials: int  # 1 for an experiment
    timed_shapes: int  # distinct program shapes measured
    shapes: int  # distinct program shapes in the run
    device: str

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values()) + self.compile_s


def estimate(configs: list[ExperimentConfig], work_of: Callable[[list[ExperimentConfig]], Work],
             trials: int = 1, repeat: float = 1.0, max_shapes: int = 3,
             log: Callable[[str], None] = lambda m: None) -> Estimate:
    """The estimate for a run of ``configs`` (``trials`` of them in a sweep) whose work
    ``work_of`` counts, ``repeat`` times over (counts rounded). Configs are grouped by
    ``shape_key``; the first ``max_shapes`` groups are timed, later ones take the first
    group's unit times (said in ``timed_shapes``)."""
    groups: dict[str, list[ExperimentConfig]] = {}
    for cfg in configs:
        groups.setdefault(shape_key(cfg), []).append(cfg)
    every_kind = work_of(configs)  # time every kind of work the run has, in each group
    timed = [measure(group[0], every_kind, log) for group in list(groups.values())[:max_shapes]]
    total, seconds, compile_s = Work(), {f.name: 0.0 for f in fields(Work)}, 0.0
    for i, group in enumerate(groups.values()):
        work, units = _scaled(work_of(group), repeat), timed[i] if i < len(timed) else timed[0]
        for name, s in units.seconds(work).items():
            seconds[name] += s
        total, compile_s = total + work, compile_s + units.compile
    return Estimate(total, seconds, compile_s, trials, len(timed), len(groups), _device())


def _scaled(work: Work, factor: float) -> Work:
    return work if factor == 1 else Work(**{f.name: round(getattr(work, f.name) * factor)
                                            for f in fields(work)})


def _device() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu, {os.cpu_count()} cores"
    return f"{d.platform}, {d.device_kind}"


@functools.cache
def _n_train(dataset: DatasetSpec) -> int:
    return len(dataset_of(dataset).y_train)


def for_experiment(cfg: ExperimentConfig, log: Callable[[str], None] = lambda m: None
                   ) -> Estimate:
    """``ntk-sweep experiment``'s time for ``cfg`` (no kernels: ``ntk-sweep kernel`` computes
    them)."""
    def work_of(configs: list[ExperimentConfig]) -> Work:
        return experiment_work(configs[0], _n_train(configs[0].dataset))

    return estimate([cfg], work_of, log=log)


def for_sweep(configs: list[ExperimentConfig], trials: int,
              log: Callable[[str], None] = lambda m: None) -> Estimate:
    """A sweep's time: its trials' ``configs`` (every grid combination; where values are
    drawn at random, the candidates ``SweepSpace.configs`` gives, scaled to ``trials``), each
    phase-1 trajectory and its kernels counted once however many trials share it."""
    def work_of(group: list[ExperimentConfig]) -> Work:
        return sweep_work(group, _n_train(group[0].dataset))[0]

    return estimate(configs, work_of, trials=trials, repeat=trials / len(configs), log=log)


def describe(est: Estimate) -> list[str]:
    """The estimate as ``validate --estimate`` prints it."""
    def span(s: float) -> str:
        return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.1f} min" if s >= 90 \
            else f"{s:.1f} s"

    names = {"clean1": "phase-1 clean steps", "adv1": "phase-1 adversarial steps",
             "clean2": "phase-2 clean steps", "adv2": "phase-2 adversarial steps",
             "networks": "phase-1 network evaluations", "models": "phase-2 model evaluations",
             "kernels": "kernels", "references": "reference example sets"}
    over = f" for {est.trials} trials" if est.trials > 1 else ""
    lines = [f"  estimate on this machine ({est.device}): {span(est.total_s)} of compute{over}"]
    for name, s in sorted(est.seconds.items(), key=lambda kv: -kv[1]):
        if s > 0:
            count = getattr(est.work, name)
            lines.append(f"    {names[name]}: {count:,} x {s / count:.3g} s = {span(s)}")
    lines.append(f"    compilation: {span(est.compile_s)}"
                 + (" (once per program shape: trials share the compilation cache)"
                    if est.trials > 1 else ""))
    if est.timed_shapes < est.shapes:
        lines.append(f"    timed {est.timed_shapes} of {est.shapes} program shapes; the rest "
                     "assumed as fast as the first")
    lines.append("    not counted: checkpoints, tracking, each trial's start; a switch rule or "
                 "ASHA stopping early makes it shorter")
    return lines
