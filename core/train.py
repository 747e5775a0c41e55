"""Pure jitted training steps over an explicit state, and the loop that runs one phase.

A step is ``step(state, anchor, x_all, y_all, idx) -> (state, metrics)``: it gathers the
minibatch ``x_all[idx]`` on device, so the whole training set is transferred once. Randomness
comes from the state's key only:

* minibatch order of epoch e: ``permutation(fold_in(fold_in(key, 0), e), N)``;
* PGD random start at step s: ``fold_in(fold_in(key, 1), s)``.

Hence a phase restored from a checkpoint after step s continues bit-identically.

Buffer donation: ``run_phase`` runs each step with the state's buffers donated to the new
state (``jax.jit(..., donate_argnums=0)``): the new parameters, BatchNorm statistics and
momentum are written over the old ones rather than into a second state (XLA may add
temporaries of its own: on an H100, ResNet-18 of width 64, the 85 MiB state is aliased and
the temporaries grow by 57-83 MiB, 2-29 MiB less per step in all). It copies the state it is
given once at the start, since callers keep that one (the switch-point network is phase 2's
anchor and is evaluated after it; the initial state is the template of checkpoint restores);
calling a ``Step`` directly donates nothing. Donation is active on every backend: jax 0.10's
CPU client implements it too (no "donation is not implemented" warning), so the tests on CPU
exercise the same aliasing as a GPU run.

SGD with momentum: ``m <- mu m + g``, ``theta <- theta - lr(epoch) m`` (optax ``trace`` then a
learning-rate scale, as ``optax.sgd``), lr(epoch) = lr * factor^(number of decay epochs <= epoch).

Data modes: ``C`` clean steps; ``A`` adversarial steps; ``F`` clean before ``flip_epoch``,
adversarial from then on. Adversarial step schemes:

* ``reference`` (default, the paper's code): an SGD step on the clean batch, then PGD against
  the updated parameters, then a second SGD step on the adversarial batch.
* ``madry``: PGD against the current parameters, then one SGD step on the adversarial batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from core.attacks import AttackConfig, pgd
from core.dynamics import Anchor, ApplyFn, logits_fn


class TrainState(NamedTuple):
    """Everything a phase needs to continue.

    Attributes:
      params: network (or linear model) parameters theta.
      batch_stats: BatchNorm running statistics ({} without BatchNorm).
      opt_state: momentum trace, same tree as params.
      step: int32 [] minibatch steps taken in this phase.
      key: uint32 [2] the phase's PRNG key.
    """

    params: Any
    batch_stats: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


class Divergence(RuntimeError):
    """The training loss became NaN or infinite."""


StepFn = Callable[..., tuple[TrainState, dict[str, jax.Array]]]


class Step:
    """A jitted training step (``make_step``) at base learning rate ``lr``: calling it (or
    ``plain``) leaves the state passed in intact; ``donating`` is the same step compiled to
    donate that state's buffers to the state it returns (the old one is unusable afterwards),
    for loops that drop each old state, as ``run_phase`` does. Each is traced and compiled on
    its first call only. The learning rate is an argument of the compiled programs, not a
    constant in them: ``with_lr`` gives the step at another rate sharing the programs (a sweep
    over learning rates compiles its steps once)."""

    def __init__(self, step: StepFn | None, lr: float,
                 programs: tuple[Callable[..., Any], Callable[..., Any]] | None = None):
        assert step is not None or programs is not None
        self.programs = programs or (jax.jit(step), jax.jit(step, donate_argnums=0))
        self.lr = float(lr)

    def with_lr(self, lr: float) -> Step:
        return Step(None, lr, self.programs)

    def plain(self, state: TrainState, anchor: Anchor | None, x_all, y_all, idx):
        return self.programs[0](state, anchor, x_all, y_all, idx, self.lr)

    def donating(self, state: TrainState, anchor: Anchor | None, x_all, y_all, idx):
        return self.programs[1](state, anchor, x_all, y_all, idx, self.lr)

    __call__ = plain


def init_state(params: Any, batch_stats: Any, momentum: float, key: jax.Array) -> TrainState:
    """A fresh phase: zero momentum, step 0."""
    opt_state = optax.trace(decay=momentum).init(params)
    return TrainState(params, batch_stats, opt_state, jnp.zeros((), jnp.int32), key)


def learning_rate(
    step: jax.Array, steps_per_epoch: int, lr: float, decay_epochs: tuple[float, ...], factor: float
) -> jax.Array:
    """lr * factor^(#{b in decay_epochs : b <= epoch}) with epoch = step / steps_per_epoch."""
    epoch = step / steps_per_epoch
    n_decays = sum((epoch >= b).astype(jnp.float32) for b in decay_epochs) if decay_epochs else 0.0
    return lr * factor**n_decays


def make_step(
    apply: ApplyFn,
    *,
    momentum: float,
    lr: float,
    schedule: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    attack: AttackConfig | None = None,
    scheme: str = "reference",
) -> Step:
    """A jitted training step at base learning rate ``lr``; adversarial when ``attack`` is
    given. ``schedule(step, lr)``: the rate at a step (``learning_rate``; default ``lr``).

    Returns:
      ``step(state, anchor, x_all [N, ...], y_all [N], idx [B]) -> (state, metrics)`` with
      metrics ``loss`` (mean cross-entropy of the last SGD step's batch) and ``accuracy``;
      ``step.donating`` the same step donating ``state``, ``step.with_lr`` the same programs
      at another rate (see ``Step``).
    """
    tx = optax.trace(decay=momentum)

    def sgd(state: TrainState, anchor, x, y, lr):
        def loss_fn(params):
            logits, batch_stats = apply(anchor, params, state.batch_stats, x, True)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (batch_stats, logits)

        (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state)
        params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
        acc = (logits.argmax(axis=1) == y).mean()
        return state._replace(params=params, batch_stats=batch_stats, opt_state=opt_state), {
            "loss": loss,
            "accuracy": acc,
        }

    def step(state: TrainState, anchor: Anchor | None, x_all, y_all, idx, base_lr):
        x, y = x_all[idx], y_all[idx]
        lr = base_lr if schedule is None else schedule(state.step, base_lr)
        if attack is None:
            new, metrics = sgd(state, anchor, x, y, lr)
        else:
            new = state
            if scheme == "reference":
                new, _ = sgd(new, anchor, x, y, lr)
            key = jax.random.fold_in(jax.random.fold_in(state.key, 1), state.step)
            x_adv = pgd(logits_fn(apply, anchor, new.params, new.batch_stats), x, y, key, attack)
            new, metrics = sgd(new, anchor, x_adv, y, lr)
        return new._replace(step=state.step + 1), metrics

    return Step(step, lr)


def epoch_batches(key: jax.Array, epoch: int, n: int, batch_size: int) -> jax.Array:
    """int32 [n // batch_size, batch_size]: the minibatches of one epoch (remainder dropped)."""
    perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, 0), epoch), n)
    spe = n // batch_size
    return perm[: spe * batch_size].reshape(spe, batch_size).astype(jnp.int32)


def is_adversarial(mode: str, epoch: int, flip_epoch: int) -> bool:
    """Whether epoch ``epoch`` of a phase with data mode C, A or F trains on adversarial data."""
    return mode == "A" or (mode == "F" and epoch >= flip_epoch)


def own_copy(state: TrainState, data: jax.Array) -> TrainState:
    """``state`` in fresh buffers (donating them leaves the caller's intact), all committed to
    the device of ``data``. Committed: a step's outputs are committed whenever one of its inputs
    is, and jit compiles once more for a state of other placement, so a state partly restored
    from a checkpoint (committed) and partly new (momentum, key: not committed), as phase 2's
    is, compiled every phase-2 step twice (first step, then the rest)."""
    devices = data.devices() if isinstance(data, jax.Array) else set(jax.devices()[:1])
    if len(devices) != 1:  # data sharded over devices: keep the state's own placement
        return jax.tree.map(jnp.copy, state)
    return jax.device_put(state, next(iter(devices)), may_alias=False)


def run_phase(
    state: TrainState,
    anchor: Anchor | None,
    steps: dict[bool, StepFn],
    x_train: jax.Array,
    y_train: jax.Array,
    *,
    mode: str,
    flip_epoch: int,
    batch_size: int,
    total_steps: int,
    checkpoint_steps: frozenset[int] = frozenset(),
    on_checkpoint: Callable[[TrainState, int, list[dict[str, float]]], bool | None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    on_step: Callable[[], None] | None = None,
    partial: Sequence[Mapping[str, float]] = (),
) -> TrainState:
    """Runs a phase from ``state.step`` up to ``total_steps`` minibatch steps.

    ``on_checkpoint(state, s, running)`` is called with the state after s steps for each s in
    ``checkpoint_steps`` (including 0 and ``total_steps``) and ``running``, the metrics of the
    minibatches of the epoch in progress (empty at an epoch's start): a checkpoint must keep
    them, so that a phase resumed there with ``partial=running`` reports the whole epoch's
    mean, not the mean of the minibatches after the resume. When it returns True the phase
    stops there (a switch rule has triggered); ``on_epoch(epoch, metrics)`` after each
    completed epoch with the epoch's mean loss and accuracy.

    Steps that are ``Step``s run donating: ``state`` is copied once here (the caller's stays
    intact) and each step's input state is donated to its output, so a state handed to
    ``on_checkpoint`` is valid during the call only (save it, or copy it to keep it).

    Raises:
      Divergence: the loss of an epoch is not finite (names epoch and step).
    """
    n = int(x_train.shape[0])
    spe = n // batch_size
    if spe == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the training set ({n})")
    s = int(state.step)
    if len(partial) != s % spe:
        raise ValueError(f"resuming at step {s} (minibatch {s % spe} of its epoch) needs the "
                         f"metrics of {s % spe} minibatches, got {len(partial)}")
    if all(isinstance(fn, Step) for fn in steps.values()):
        steps = {adversarial: fn.donating for adversarial, fn in steps.items()}
        state = own_copy(state, x_train)  # the caller's state is not donated
    batches, history = None, [dict(m) for m in partial]
    while True:
        if s in checkpoint_steps and on_checkpoint is not None:
            running = [{k: float(v) for k, v in m.items()} for m in history] if s % spe else []
            if on_checkpoint(state, s, running):
                return state
        if s >= total_steps:
            return state
        epoch, i = divmod(s, spe)
        if batches is None or i == 0:
            batches = epoch_batches(state.key, epoch, n, batch_size)
            history = history if i else []
        adversarial = is_adversarial(mode, epoch, flip_epoch)
        state, metrics = steps[adversarial](state, anchor, x_train, y_train, batches[i])
        history.append(metrics)
        s += 1
        if on_step is not None:
            on_step()
        if i == spe - 1:
            # float64 mean of the float32 values: the same whether some came back as Python
            # floats from a checkpoint's ``running`` or all are this run's device scalars.
            summary = {k: float(np.mean([float(m[k]) for m in history])) for k in history[0]}
            if not np.isfinite(summary["loss"]):
                raise Divergence(
                    f"loss is {summary['loss']} in epoch {epoch + 1} (step {s}): training diverged"
                )
            if on_epoch is not None:
                on_epoch(epoch + 1, summary)
