"""One full experiment in one process: phase 1 per data mode with checkpoints, then phase 2 from
every switch point for every loader code, evaluated clean, under PGD and under transfer.

Keys, all derived from the seed's root key ``PRNGKey(seed)``:

* initial parameters: ``fold_in(root, 0)`` (shared by every data mode, so C and A trajectories
  start from the same network);
* phase 1: ``fold_in(root, 1)`` (shared minibatch order; the modes differ only in the data);
* phase 2 with data mode m from switch step s: ``fold_in(fold_in(fold_in(root, 2), m), s)``;
* evaluation: ``fold_in(root, 3)``; the reference network's examples: ``fold_in(root, 4)``;
* ``ntk-sweep attack --source``: ``fold_in(root, 5)``.

Phase-1 trajectories live in a ``TrajectoryStore`` (``core/trajectory_store.py``: ids, layout,
locks); a trajectory found there is continued from its latest checkpoint instead of retrained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from core import determinism
from core.attacks import AttackLoss, attack_config
from core.checkpoints import CheckpointStore, DamagedCheckpoint
from core.config import (
    MODES,
    NETWORK,
    ExperimentConfig,
)
from core.data import Dataset, dataset_of
from core.dynamics import Anchor, BatchNormMode, Dynamics, make_apply_fn
from core.evaluate import (
    make_crafter,
    make_evaluator,
    make_transfer_evaluator,
)
from core.evaluation_store import (
    NETWORK_FIELDS,
    REFERENCE_FIELDS,
    Evaluation,
    evaluation_key,
    load_reference,
    save_reference,
)
from core.exported import stored_jit
from core.models import init_model, make_model
from core.preflight import preflight
from core.recent import recent
from core.results import result_metrics, result_row, write_results
from core.train import (
    Divergence,
    Step,
    TrainState,
    init_state,
    learning_rate,
    make_step,
    run_phase,
)
from core.trajectory_store import (
    Trajectory,
    TrajectoryStore,
    checkpoint_steps,
    epoch_to_step,
    flush_evaluations,
)
from core.workload import experiment_work

T = TypeVar("T")
LOG = logging.getLogger("ntk_sweep")


class Stage(NamedTuple):
    """What an experiment is training: phase 1 of data mode ``code`` (``C``), or phase 2 of
    loader ``code`` (``AC``) from the phase-1 checkpoint at ``switch_step``; seed ``seed``;
    the phase's minibatch steps per epoch (epoch e ends at step e x ``steps_per_epoch``)."""

    phase: int
    code: str
    seed: int
    switch_step: int | None = None
    steps_per_epoch: int = 0


@dataclass
class Hooks:
    """Callbacks through which a caller watches an experiment (progress bars, logging)."""

    on_step: Callable[[], None] | None = None
    log: Callable[[str], None] = lambda message: None
    planned_steps: Callable[[int], None] = lambda n: None
    # a stage starts: phase 1 of a data mode (before waiting for its trajectory's lock), or
    # phase 2 of a loader from a switch step
    on_stage: Callable[[Stage], None] | None = None
    # the trajectory is locked by another process (a trial training it): this one waits
    on_wait: Callable[[Trajectory], None] | None = None
    # (stage, epoch, the epoch's mean training metrics) after each epoch
    on_epoch: Callable[[Stage, int, dict[str, float]], None] | None = None
    on_result: Callable[[dict[str, Any]], None] | None = None  # each evaluated model's row
    # each phase-1 trajectory the experiment trained or continued, once it is complete, with
    # its epoch history ({"epoch", "loss", "accuracy"}) up to this run's last checkpoint
    on_trajectory: Callable[[Trajectory, list[dict[str, float]]], None] | None = None


@dataclass
class _Context:
    cfg: ExperimentConfig
    data: Dataset
    x_train: jax.Array
    y_train: jax.Array
    x_test: np.ndarray
    y_test: np.ndarray
    model: Any
    out: Path
    hooks: Hooks
    store: TrajectoryStore
    fns: dict[str, Any] = field(default_factory=dict)


def phase_steps(ctx: _Context, phase: str) -> dict[bool, Step]:
    """Jitted clean and adversarial steps of a phase at its learning rate (programs built once
    per process for its other settings, ``_program``: the rate is an argument)."""
    spec = ctx.cfg.phase1 if phase == "phase1" else ctx.cfg.phase2
    spe = len(ctx.y_train) // spec.batch_size

    def build() -> dict[bool, Step]:
        apply = _apply(ctx, phase)

        def schedule(step, lr):
            return learning_rate(step, spe, lr, spec.lr_decay_epochs, spec.lr_decay_factor)

        common = dict(momentum=spec.momentum, lr=spec.lr, schedule=schedule,
                      scheme=spec.adv_scheme)
        return {False: make_step(apply, **common),
                True: make_step(apply, attack=attack_config(spec.attack), **common)}

    # The key: everything but what the steps never read (the rate is an argument; the
    # phase's length and data-mode flip decide which step runs, not what it is). Excluding
    # rather than listing keeps a field added later in the key until shown unread.
    steps = _program(ctx, phase, (_apply_key(ctx, phase), spe, spec.model_dump(
        exclude={"lr", "epochs", "flip_epoch"})), build)
    return {adversarial: step.with_lr(spec.lr) for adversarial, step in steps.items()}


def _apply_key(ctx: _Context, phase: str) -> tuple[Any, ...]:
    """What ``_apply(ctx, phase)`` is built from."""
    base = (ctx.cfg.dataset, ctx.cfg.model)
    return base if phase == "phase1" else (*base, ctx.cfg.phase2.dynamics, ctx.cfg.phase2.bn)


def _apply(ctx: _Context, phase: str):
    if phase == "phase1":
        return make_apply_fn(ctx.model, Dynamics.STANDARD, BatchNormMode.UPDATE)
    p2 = ctx.cfg.phase2
    return make_apply_fn(ctx.model, p2.dynamics, BatchNormMode(p2.bn))


def _evaluator(ctx: _Context, phase: str):
    """The white-box members of the ensemble (attack index, hence key, in this order: linf,
    l2, margin, so that adding the margin attack left the other two's numbers unchanged)."""
    spec = ctx.cfg.eval
    deps = (_apply_key(ctx, phase), spec.linf, spec.l2, spec.margin_restarts)

    def build():
        linf = attack_config(spec.linf, keep_best=True)
        attacks = {"linf": linf}
        if spec.l2 is not None:
            attacks["l2"] = attack_config(spec.l2, keep_best=True)
        if spec.margin_restarts:
            attacks["margin"] = dataclasses.replace(
                linf, loss=AttackLoss.MARGIN, restarts=spec.margin_restarts)
        return make_evaluator(_apply(ctx, phase), attacks, _stored(f"eval-{phase}", deps))

    return _program(ctx, f"eval-{phase}", deps, build)


def _transfer(ctx: _Context):
    deps = (_apply_key(ctx, "phase2"), ctx.cfg.eval.linf)
    return _program(ctx, "transfer", deps, lambda: make_transfer_evaluator(
        _apply(ctx, "phase1"), _apply(ctx, "phase2"), attack_config(ctx.cfg.eval.linf),
        _stored("transfer", deps)))


def _evaluate(ctx: _Context, phase: str, anchor, params, batch_stats,
              key) -> dict[str, np.ndarray]:
    """Per-example correctness (bool [n]) under each white-box member of the ensemble."""
    ev = _evaluator(ctx, phase)
    return ev(anchor, params, batch_stats, ctx.x_test, ctx.y_test, key, ctx.cfg.eval.batch_size)


@dataclass
class Phase1:
    """A trained phase-1 trajectory: its checkpoints, steps per epoch, a template state for
    restoring, and the epoch at which the switch rule triggered (None: no rule, or it did
    not trigger within ``phase1.epochs``)."""

    trajectory: Trajectory
    store: CheckpointStore
    steps_per_epoch: int
    template: TrainState
    rule_epoch: float | None = None


class _RuleWatch:
    """Evaluates ``cfg.switch_rule`` at each phase-1 checkpoint from the probe-set kernels of
    the checkpoints so far (computed once, stored with the trajectory for later measures)."""

    def __init__(self, ctx: _Context, trajectory: Trajectory):
        from core.trajectory_kernels import KernelRecorder

        self.rule = ctx.cfg.switch_rule
        self.recorder = KernelRecorder(trajectory, ctx.cfg.kernel, ctx.data, ctx.model)
        self.records: dict[int, Any] = {}  # step -> KernelRecord
        self.epoch: float | None = None

    def check(self, store: CheckpointStore, template: TrainState, steps: list[int],
              state: TrainState) -> float | None:
        """The trigger epoch over checkpoints ``steps`` (ascending, all stored; the last is
        ``state``'s), computing the kernels still missing."""
        from core.trajectory_kernels import switch_rule_trigger

        if self.epoch is not None:
            return self.epoch
        for step in steps:
            if step in self.records:
                continue
            meta = store.meta(step)
            if not self.recorder.trajectory.has(meta["epoch"]):
                at = state if step == steps[-1] else store.restore(step, template)[0]
                self.recorder.record(at, step, meta)
            self.records[step] = self.recorder.trajectory.load(meta["epoch"])
        self.epoch = switch_rule_trigger([self.records[s] for s in steps], self.rule)
        return self.epoch


def _set_aside(ctx: _Context, store: CheckpointStore, tid: str, error: DamagedCheckpoint) -> None:
    """Sets a damaged checkpoint aside and says so (progress log and a logging warning)."""
    where = store.quarantine(error.step)
    message = (f"trajectory {tid}: {error}; set aside ({where}), continuing from the "
               "checkpoint before it")
    LOG.warning(message)
    ctx.hooks.log(f"warning: {message}")


def _epoch_steps(meta: dict[str, Any], step: int, spe: int, tid: str) -> list[dict[str, float]]:
    """The metrics of the minibatches before ``step`` in its epoch, as the checkpoint kept
    them (``run_phase``'s ``partial``)."""
    if step % spe == 0:
        return []
    kept = meta.get("epoch_steps")
    if not isinstance(kept, list) or len(kept) != step % spe:
        # Written before checkpoints kept them: this epoch's mean would cover only the
        # minibatches after the resume. Refuse rather than log a partial epoch.
        raise DamagedCheckpoint(step, ValueError(
            f"trajectory {tid}: no metrics of the {step % spe} minibatches before it in its "
            "epoch (written by an older version)"))
    return kept


def train_phase1(ctx: _Context, mode: str, seed: int, init: tuple[Any, Any]) -> Phase1:
    """Trains (or continues) the phase-1 trajectory of ``mode`` up to the largest switch
    point, or with a switch rule until it triggers (and the listed switch points are
    reached) or ``phase1.epochs`` ends."""
    cfg, spec = ctx.cfg, ctx.cfg.phase1
    spe = len(ctx.y_train) // spec.batch_size
    trajectory = ctx.store.get(cfg, mode, seed)
    tid = trajectory.id
    if ctx.hooks.on_stage:
        ctx.hooks.on_stage(Stage(1, mode, seed, None, spe))
    # Trials of a sweep that share this trajectory wait here; the next one finds the
    # checkpoints and trains nothing.
    with trajectory.lock(on_wait=ctx.hooks.on_wait and (lambda: ctx.hooks.on_wait(trajectory))):
        store = trajectory.checkpoints()
        watch = _RuleWatch(ctx, trajectory) if cfg.switch_rule else None
        listed_last = epoch_to_step(max(cfg.switch_points, default=0), spe)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
        state = init_state(*init, spec.momentum, key)
        template = state
        ckpt_steps = checkpoint_steps(cfg, spe)
        total = epoch_to_step(cfg.phase1_epochs, spe)
        history: list[dict[str, float]] = []
        stored = store.steps()
        missing = [s for s in ckpt_steps if s not in stored]
        # Continue from the latest checkpoint before the first one still missing (a new switch
        # point may fall before what an earlier, shorter experiment stored).
        done = [s for s in stored if s <= min(missing, default=total)]
        partial: list[dict[str, float]] = []
        while done:
            try:
                state, meta = store.restore(done[-1], template)
                partial = _epoch_steps(meta, done[-1], spe, tid)
                break
            except DamagedCheckpoint as e:  # use the one before; training remakes this one
                _set_aside(ctx, store, tid, e)
                done.pop()
        if done:
            history = meta["history"]
            ctx.hooks.log(f"trajectory {tid} ({mode}, seed {seed}): continuing at step {done[-1]}")
        trajectory.write_record()

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            history.append({"epoch": epoch, **metrics})
            if ctx.hooks.on_epoch:
                ctx.hooks.on_epoch(Stage(1, mode, seed, None, spe), epoch, metrics)

        def on_checkpoint(s: TrainState, step: int, running: list[dict[str, float]]) -> bool:
            meta = {"epoch": ckpt_steps[step], "exact_epoch": step / spe, "step": step,
                    "mode": mode, "seed": seed, "history": history, "epoch_steps": running}
            store.save(step, s, meta)
            if watch is None:
                return False
            triggered = watch.check(store, template, [k for k in sorted(ckpt_steps)
                                                      if k <= step], s)
            return triggered is not None and step >= listed_last

        try:
            run_phase(
                state, None, phase_steps(ctx, "phase1"), ctx.x_train, ctx.y_train, mode=mode,
                flip_epoch=spec.flip_epoch, batch_size=spec.batch_size, total_steps=total,
                checkpoint_steps=frozenset(ckpt_steps), on_checkpoint=on_checkpoint,
                on_epoch=on_epoch, on_step=ctx.hooks.on_step, partial=partial,
            )
        except Divergence as e:
            raise Divergence(f"phase 1 (data mode {mode}, seed {seed}, lr {spec.lr:g}): {e}"
                             ) from None
    phase1 = Phase1(trajectory, store, spe, template)
    if watch is not None:
        phase1.rule_epoch = watch.epoch
        rule = cfg.switch_rule.label()
        ctx.hooks.log(f"seed {seed} {mode}: switch rule {rule} " + (
            f"triggered at epoch {watch.epoch:g}" if watch.epoch is not None
            else f"did not trigger within {cfg.phase1_epochs:g} epochs"))
    return phase1


def run_phase2(
    ctx: _Context, code: str, seed: int, switch_step: int, anchor: Anchor,
    epochs: list[tuple[int, dict[str, float]]] | None = None,
) -> tuple[TrainState, dict[str, float]]:
    """Phase 2 of loader ``code`` (data mode ``code[1]``) from the switch-point anchor;
    returns the final state and the last epoch's training metrics (every epoch's are
    appended to ``epochs`` if given)."""
    mode = code[1]
    spec = ctx.cfg.phase2
    root = jax.random.PRNGKey(seed)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(root, 2), MODES.index(mode)),
                             switch_step)
    spe = len(ctx.y_train) // spec.batch_size
    last: dict[str, float] = {"loss": float("nan"), "accuracy": float("nan")}

    if ctx.hooks.on_stage:
        ctx.hooks.on_stage(Stage(2, code, seed, switch_step, spe))

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        last.update(metrics)
        if epochs is not None:
            epochs.append((epoch, metrics))
        if ctx.hooks.on_epoch:
            ctx.hooks.on_epoch(Stage(2, code, seed, switch_step, spe), epoch, metrics)

    state = init_state(anchor.params, anchor.batch_stats, spec.momentum, key)
    try:
        state = run_phase(
            state, anchor, phase_steps(ctx, "phase2"), ctx.x_train, ctx.y_train, mode=mode,
            flip_epoch=spec.flip_epoch, batch_size=spec.batch_size,
            total_steps=epoch_to_step(spec.epochs, spe), on_epoch=on_epoch,
            on_step=ctx.hooks.on_step,
        )
    except Divergence as e:
        raise Divergence(f"phase 2 ({code} from switch step {switch_step}, seed {seed}, "
                         f"lr {spec.lr:g}): {e}") from None
    return state, last


def _restore(ctx: _Context, phase1: Phase1, mode: str, seed: int, init: tuple[Any, Any],
             step: int) -> tuple[Phase1, TrainState, dict[str, Any]]:
    """The checkpoint at ``step`` of a trained trajectory; a damaged one is set aside and
    retrained from the checkpoint before it (the trajectory returned is then a new one)."""
    try:
        return phase1, *phase1.store.restore(step, phase1.template)
    except DamagedCheckpoint as e:
        _set_aside(ctx, phase1.store, phase1.trajectory.id, e)
        phase1.store.close()
        phase1 = train_phase1(ctx, mode, seed, init)
        return phase1, *phase1.store.restore(step, phase1.template)


def reference_examples(ctx: _Context, seed: int, init: tuple[Any, Any],
                        key: jax.Array) -> np.ndarray:
    """x_adv [n_test, ...]: ``eval.linf`` PGD crafted on the phase-1 network of mode
    ``eval.reference`` (seed ``seed``) at its last checkpoint within this run's phase 1
    (``phase1.epochs``, or the largest switch point); crafted once, stored with the
    trajectory (``core/evaluation_store.py``)."""
    mode = ctx.cfg.eval.reference
    phase1 = train_phase1(ctx, mode, seed, init)
    end = epoch_to_step(ctx.cfg.phase1_epochs, phase1.steps_per_epoch)
    last = max(s for s in phase1.store.steps() if s <= end)  # not a longer earlier run's
    path = phase1.trajectory.reference_path(_eval_key(ctx, REFERENCE_FIELDS), last)
    if (x := load_reference(path)) is not None:
        phase1.store.close()
        return x
    phase1, state, meta = _restore(ctx, phase1, mode, seed, init, last)
    phase1.store.close()
    ctx.hooks.log(f"seed {seed}: reference examples from the {mode} network at epoch "
                  f"{meta['epoch']:g}")
    x = craft(ctx, None, state, key)
    save_reference(path, x)
    return x


def craft(ctx: _Context, anchor: Anchor | None, state: TrainState, key: jax.Array) -> np.ndarray:
    """x_adv [n_test, ...]: ``eval.linf`` crafted on a phase-1 network (``anchor`` None) or a
    phase-2 model around ``anchor``; one compiled crafter per phase."""
    phase = "phase1" if anchor is None else "phase2"
    deps = (_apply_key(ctx, phase), ctx.cfg.eval.linf)
    crafter = _program(ctx, f"craft-{phase}", deps, lambda: make_crafter(
        _apply(ctx, phase), attack_config(ctx.cfg.eval.linf), _stored(f"craft-{phase}", deps)))
    return crafter((anchor, state.params, state.batch_stats), ctx.x_test, ctx.y_test, key,
                   ctx.cfg.eval.batch_size)


def _score(ctx: _Context, phase: str, anchor, state: TrainState, x: np.ndarray) -> np.ndarray:
    """bool [n]: the model's correctness on inputs ``x`` (e.g. adversarial examples crafted
    on another model) with the test labels."""
    evaluator = _program(ctx, f"clean-{phase}", _apply_key(ctx, phase),
                         lambda: make_evaluator(_apply(ctx, phase), {}))
    return evaluator(anchor, state.params, state.batch_stats, x, ctx.y_test,
                     jax.random.PRNGKey(0), ctx.cfg.eval.batch_size)["accuracy"]


def initial_params(ctx: _Context, seed: int) -> tuple[Any, Any]:
    """(params, batch_stats) at initialisation for ``seed`` (key ``fold_in(seed, 0)``)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
    return init_model(ctx.model, key, ctx.data.x_train.shape[1:])


def eval_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """The evaluation keys of a seed: the ensemble's (``fold_in(seed, 3)``) and the reference
    examples' (``fold_in(seed, 4)``)."""
    root = jax.random.PRNGKey(seed)
    return jax.random.fold_in(root, 3), jax.random.fold_in(root, 4)


def _stack() -> str:
    """What of the stack changes evaluations' numbers: the JAX version and backend, and on a
    GPU whether its operations are deterministic (``core/determinism.py``)."""
    stack = f"jax {jax.__version__} {jax.default_backend()}"
    return stack if (ops := determinism.state()) == "cpu" else f"{stack} deterministic {ops}"


def _eval_key(ctx: _Context, fields: tuple[str, ...]) -> str:
    return evaluation_key(ctx.cfg.eval, fields, _stack())


def _network_correct(ctx: _Context, trajectory: Trajectory, step: int, state: TrainState,
                    key: jax.Array) -> dict[str, np.ndarray]:
    """The white-box members' per-example correctness of the phase-1 network at ``step``
    (``state``): stored with the trajectory by whichever process evaluated it first."""
    stored = trajectory.evaluations(_eval_key(ctx, NETWORK_FIELDS))
    if (correct := stored.get(step)) is None:
        correct = _evaluate(ctx, "phase1", None, state.params, state.batch_stats, key)
        stored.put(step, correct)
    return correct


def evaluate_model(ctx: _Context, key: jax.Array, switch: TrainState, anchor: Anchor | None,
                   state: TrainState, x_ref: np.ndarray | None,
                   white_box: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per-example correctness (bool [n]) of one model under the ensemble: a phase-1 network
    (``anchor`` None, ``state`` the network) or a phase-2 model around ``anchor``, whose
    transfer attack is crafted on the switch-point network ``switch``; ``x_ref``: the
    reference network's examples, if the config names one; ``white_box``: the white-box
    members' results, if known (``_network_correct``)."""
    phase = "phase1" if anchor is None else "phase2"
    correct = dict(white_box) if white_box is not None else _evaluate(
        ctx, phase, anchor, state.params, state.batch_stats, key)
    if anchor is not None and ctx.cfg.eval.transfer:
        correct["transfer_linf"] = _transfer(ctx)(
            (None, switch.params, switch.batch_stats), (anchor, state.params, state.batch_stats),
            ctx.x_test, ctx.y_test, key, ctx.cfg.eval.batch_size)
    if x_ref is not None:
        correct["reference_linf"] = _score(ctx, phase, anchor, state, x_ref)
    return correct


class _InitialRuns:
    """The models of switch step 0 of one seed, computed once per store. Every data mode's
    trajectory starts from the initial network (key ``fold_in(root, 0)``), so the network's
    row and phase 2 of a loader from it depend on the loader, not on the trajectory (A-@0 =
    C-@0, AC@0 = CC@0, AA@0 = CA@0 bit for bit). Each is kept, with its per-example
    correctness, training metrics and phase-2 epoch curve, as an ``"initial"`` record of the
    pack of the trajectory that computed it (``core/evaluation_store.py``); a run of another
    trajectory of the seed, in this process or another (a sweep's AC trial after its CC
    trial), copies it and replays its epochs through the hooks."""

    def __init__(self, ctx: _Context, seed: int):
        self.ctx, self.seed = ctx, seed
        self.siblings = [ctx.store.get(ctx.cfg, mode, seed) for mode in MODES]
        self._keys: dict[str, str] = {}

    def key(self, loader: str) -> str:
        """The setting of ``loader``'s records (a data mode, or ``NETWORK`` for the network
        itself): a hash of the seed, the loader, the stack and the config but for what a
        model of step 0 never reads (excluded rather than listed, as in ``phase_steps``:
        a field added later is in the key until shown unread)."""
        if loader not in self._keys:
            cfg = self.ctx.cfg
            unread = {"name", "seeds", "codes"}
            # The reference examples are crafted on the end of a phase-1 trajectory, whose
            # length follows phase 1, the switch points and a switch rule (and through its
            # measure, the kernel settings): read unless there is no reference.
            if cfg.eval.reference is None:
                unread |= {"phase1", "switch_points", "switch_rule", "kernel",
                           "fractional_checkpoints"}
            if loader == NETWORK:
                unread.add("phase2")
            settings = {"config": cfg.model_dump(mode="json", exclude=unread),
                        "seed": self.seed, "loader": loader, "stack": _stack()}
            self._keys[loader] = hashlib.sha256(
                json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        return self._keys[loader]

    def find(self, loader: str) -> Evaluation | None:
        """``loader``'s model of step 0 as a trajectory of the seed keeps it, or None."""
        for trajectory in self.siblings:
            found = trajectory.evaluations(self.key(loader), "initial").record(0)
            if found is not None and isinstance(found.meta.get("train"), dict) and isinstance(
                    found.meta.get("epochs"), list):
                return found
        return None

    def ready(self, codes: list[str]) -> bool:
        """Whether every model of step 0 of ``codes`` (and their networks) is kept."""
        return all(self.find(loader) is not None for loader in {c[1] for c in codes})

    def keep(self, trajectory: Trajectory, step: int, loader: str,
             correct: dict[str, np.ndarray], train: dict[str, float],
             epochs: list[tuple[int, dict[str, float]]] | None) -> None:
        """Keeps the model of ``loader`` if ``step`` is 0, as a record of ``trajectory``."""
        if step == 0:
            trajectory.evaluations(self.key(loader), "initial").put(
                0, correct, {"train": train, "epochs": epochs or []})

    def copy(self, step: int, switch: float, code: str, t0: float) -> dict[str, Any] | None:
        """``code``'s row at step 0 if its model is kept (a phase-2 model's epochs replayed
        to the hooks as ``code``'s), else None."""
        if step != 0 or (found := self.find(code[1])) is None:
            return None
        cfg, hooks = self.ctx.cfg, self.ctx.hooks
        if code[1] != NETWORK:
            stage = Stage(2, code, self.seed, 0, len(self.ctx.y_train) // cfg.phase2.batch_size)
            if hooks.on_stage:
                hooks.on_stage(stage)
            for epoch, metrics in found.meta["epochs"] if hooks.on_epoch else ():
                hooks.on_epoch(stage, epoch, metrics)
        dynamics = "network" if code[1] == NETWORK else cfg.phase2.dynamics
        metrics = result_metrics(found.correct, cfg.eval.masking_threshold)
        return result_row(self.seed, code, dynamics, switch, metrics, found.meta["train"], t0)


class _Reference:
    """The reference network's examples of one seed (``eval.reference``), crafted when first
    asked for. A run whose own phase-1 data modes include the reference's asks at once. One
    that does not (a sweep's CC trial, whose reference A another trial trains) does its own
    work first: ``get(wait=False)`` answers None until the reference trajectory is stored to
    this config's end and no process holds it, and its models wait for their reference column
    instead of the run for the trajectory (which idled a core through all of phase-1 A)."""

    def __init__(self, ctx: _Context, seed: int, init: tuple[Any, Any], key: jax.Array):
        self.ctx, self.seed, self.init, self.key = ctx, seed, init, key
        self.x: np.ndarray | None = None

    def get(self, wait: bool) -> np.ndarray | None:
        """x_adv [n_test, ...]; None if ``wait`` is False and the trajectory is not ready."""
        if self.x is None and (wait or self._stored()):
            self.x = reference_examples(self.ctx, self.seed, self.init, self.key)
        return self.x

    def _stored(self) -> bool:
        cfg = self.ctx.cfg
        trajectory = self.ctx.store.get(cfg, cfg.eval.reference, self.seed)
        if not trajectory.exists() or trajectory.busy():
            return False
        store = trajectory.checkpoints()
        try:
            spe = len(self.ctx.y_train) // cfg.phase1.batch_size
            return set(checkpoint_steps(cfg, spe)) <= set(store.steps())
        finally:
            store.close()


@dataclass
class _Evaluated:
    """A model evaluated but for its reference column: ``correct`` (per-example correctness
    under the ensemble), ``model`` (phase, anchor, state: what ``_score`` needs), ``fields``
    (``result_row``'s seed, code, dynamics, switch epoch and training metrics), its phase-1
    ``trajectory``, switch ``step`` and phase-2 ``epochs`` (for ``_InitialRuns.keep``),
    ``seconds`` spent so far."""

    correct: dict[str, np.ndarray]
    model: tuple[str, Anchor | None, TrainState]
    fields: tuple[int, str, str, float, dict[str, float]]
    trajectory: Trajectory
    step: int
    epochs: list[tuple[int, dict[str, float]]] | None
    seconds: float

    def finish(self, ctx: _Context, at_init: _InitialRuns,
               x_ref: np.ndarray | None) -> dict[str, Any]:
        """The result row, with the reference column scored on ``x_ref`` if given."""
        t0 = time.perf_counter() - self.seconds
        if x_ref is not None:
            self.correct["reference_linf"] = _score(ctx, *self.model, x_ref)
        seed, code, dynamics, switch, train = self.fields
        at_init.keep(self.trajectory, self.step, code[1], self.correct, train, self.epochs)
        metrics = result_metrics(self.correct, ctx.cfg.eval.masking_threshold)
        return result_row(seed, code, dynamics, switch, metrics, train, t0)


def run_seed(ctx: _Context, seed: int) -> list[dict[str, Any]]:
    """Every trajectory and switch run of one seed; one result row per evaluated model."""
    cfg = ctx.cfg
    init = initial_params(ctx, seed)
    eval_key, ref_key = eval_keys(seed)
    reference = None if cfg.eval.reference is None else _Reference(ctx, seed, init, ref_key)
    if reference is not None and cfg.eval.reference in cfg.phase1_modes:
        reference.get(wait=True)
    rows: list[dict[str, Any]] = []
    # At switch step 0 every data mode's network is the initial one (same key): the network
    # and each loader's phase 2 from it are computed once per store, and the other modes'
    # rows are copies (A-@0 = C-@0, AC@0 = CC@0, AA@0 = CA@0 bit for bit), their phase-2
    # epoch curves replayed through the hooks.
    at_init = _InitialRuns(ctx, seed)
    # Switch points done but not yet reported, in order: their rows (or models waiting for
    # the reference's examples) and the labels of their rows.
    waiting: list[tuple[list[dict[str, Any] | _Evaluated], list[str]]] = []

    def evaluate(trajectory: Trajectory, switch: TrainState, anchor: Anchor | None,
                 state: TrainState, fields: tuple[int, str, str, float, dict[str, float]],
                 step: int, epochs: list[tuple[int, dict[str, float]]] | None,
                 t0: float) -> dict[str, Any] | _Evaluated:
        x_ref = None if reference is None else reference.get(wait=False)
        known = None if anchor is not None else _network_correct(ctx, trajectory, step, state,
                                                                eval_key)
        correct = evaluate_model(ctx, eval_key, switch, anchor, state, x_ref, known)
        model = _Evaluated(correct, ("phase1" if anchor is None else "phase2", anchor, state),
                           fields, trajectory, step, epochs, time.perf_counter() - t0)
        return model if reference is not None and x_ref is None else model.finish(
            ctx, at_init, None)

    def settle(wait: bool) -> None:
        """Reports the waiting switch points' rows, once the reference's examples are there
        (``wait``: trains or waits for the reference trajectory if need be)."""
        pending = any(isinstance(m, _Evaluated) for made, _ in waiting for m in made)
        x_ref = reference.get(wait) if pending and reference is not None else None
        if pending and x_ref is None:
            return
        for made, labels in waiting:
            done = [m.finish(ctx, at_init, x_ref) if isinstance(m, _Evaluated) else m
                    for m in made]
            for r in done:
                r["switch_rule"] = labels[0]
            done += [{**r, "switch_rule": label} for label in labels[1:] for r in done]
            rows.extend(done)
            for r in done if ctx.hooks.on_result else ():
                ctx.hooks.on_result(r)
        waiting.clear()

    for mode1 in cfg.phase1_modes:
        phase1 = train_phase1(ctx, mode1, seed, init)
        spe = phase1.steps_per_epoch
        # switch epoch -> labels of its rows: "" for a listed switch point, the rule's label
        # for the epoch a switch rule chose (a shared epoch is trained and evaluated once).
        switches: dict[float, list[str]] = {e: [""] for e in cfg.switch_points}
        if phase1.rule_epoch is not None:
            switches.setdefault(phase1.rule_epoch, []).append(cfg.switch_rule.label())
        order = sorted(switches)
        # The C trajectory computes the models of step 0 (in a sweep, the seed's C trial);
        # another does step 0 last unless they are kept already, to copy them then.
        if (mode1 != MODES[0] and order and epoch_to_step(order[0], spe) == 0
                and not at_init.ready([mode1 + NETWORK, *(c for c in cfg.codes
                                                          if c[0] == mode1)])):
            order = order[1:] + order[:1]
        first = len(rows)
        for switch in order:
            t0 = time.perf_counter()
            step = epoch_to_step(switch, spe)
            phase1, state, meta = _restore(ctx, phase1, mode1, seed, init, step)
            hist = meta["history"]
            made: list[dict[str, Any] | _Evaluated] = []
            if (row := at_init.copy(step, switch, mode1 + NETWORK, t0)) is None:
                ctx.hooks.log(f"seed {seed} {mode1}: evaluating the network at epoch {switch}")
                row = evaluate(phase1.trajectory, state, None, state, (
                    seed, mode1 + NETWORK, "network", switch, hist[-1] if hist else {}),
                    step, None, t0)
            made.append(row)
            anchor = Anchor(state.params, state.batch_stats)
            for code in [c for c in cfg.codes if c[0] == mode1]:
                t0 = time.perf_counter()
                if (row := at_init.copy(step, switch, code, t0)) is None:
                    ctx.hooks.log(f"seed {seed} {code}: phase 2 from epoch {switch}")
                    epochs: list[tuple[int, dict[str, float]]] = []
                    final, train = run_phase2(ctx, code, seed, step, anchor, epochs)
                    row = evaluate(phase1.trajectory, state, anchor, final, (
                        seed, code, cfg.phase2.dynamics, switch, train), step, epochs, t0)
                made.append(row)
            waiting.append((made, switches[switch]))
            settle(wait=False)
        settle(wait=True)  # complete before the next data mode copies its rows at step 0
        rows[first:] = sorted(rows[first:], key=lambda r: r["switch_epoch"])  # step 0 first
        if ctx.hooks.on_trajectory:
            end = epoch_to_step(cfg.phase1_epochs, spe)
            last = max((s for s in phase1.store.steps() if s <= end), default=None)
            history = [] if last is None else phase1.store.meta(last)["history"]
            ctx.hooks.on_trajectory(phase1.trajectory, history)
        phase1.store.close()
    return rows


def planned_steps(cfg: ExperimentConfig, n_train: int) -> int:
    """Minibatch steps of the whole experiment, for progress bars."""
    return experiment_work(cfg, n_train).steps


def make_context(cfg: ExperimentConfig, out: Path, hooks: Hooks | None = None,
                 store_root: str | Path | None = None) -> _Context:
    """The data (test set cut to ``eval.max_test``), model and caches an experiment's phases
    and evaluations share; trajectories under ``store_root`` (default ``out``)."""
    data = dataset_of(cfg.dataset)
    n_test = cfg.eval.max_test or len(data.y_test)
    return _Context(
        cfg, data, jnp.asarray(data.x_train), jnp.asarray(data.y_train),
        data.x_test[:n_test], data.y_test[:n_test],
        make_model(cfg.model.name, data.num_classes, **cfg.model.kwargs()), out,
        hooks or Hooks(), TrajectoryStore(store_root if store_root is not None else out),
    )


# Jitted programs by what they are built from, kept across the experiments of a process (the
# trials a reused Ray worker runs, switch points and seeds of one config, configs that differ
# elsewhere: another phase-2 learning rate rebuilds only the phase-2 steps): a program is traced
# and compiled once per process instead of once per experiment. The last PROGRAMS programs.
PROGRAMS = 48
_PROGRAMS: dict[str, Any] = {}


def _program(ctx: _Context, name: str, deps: Any, build: Callable[[], T]) -> T:
    """Program ``name`` of this experiment: the process's, if one was built from ``deps``
    (everything its closure reads: ``repr`` of settings and sizes), else ``build()``."""
    if name not in ctx.fns:
        ctx.fns[name] = recent(_PROGRAMS, repr((name, deps)), build, PROGRAMS)
    return ctx.fns[name]


def _stored(name: str, deps: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Compiles a program ``name`` built from ``deps`` so that its export is kept across
    processes (``core/exported.py``: the persistent cache spares compiling, not tracing)."""
    return lambda fn: stored_jit(fn, name, repr(deps))


def run_experiment(
    cfg: ExperimentConfig, out: str | Path, hooks: Hooks | None = None,
    store_root: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Runs the experiment and writes its tables under ``out``; returns the result rows.

    Phase-1 trajectories live under ``store_root/trajectories`` (default ``out``): experiments
    given the same root share them, and never train a stored epoch again.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = make_context(cfg, out, hooks, store_root)
    preflight(cfg, data=ctx.data)  # before any training: batch sizes, a switch rule's probe set
    ctx.hooks.planned_steps(planned_steps(cfg, len(ctx.data.y_train)))
    rows = [r for seed in cfg.seeds for r in run_seed(ctx, seed)]
    flush_evaluations()  # the networks' evaluations kept while another process held a lock
    write_results(out, cfg, rows)
    return rows
