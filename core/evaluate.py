"""Clean, PGD and transfer correctness per test example, and the worst case over an ensemble.

The test set is cut into fixed-size batches (the last one padded and masked) so one compiled
program serves every batch, every checkpoint and every switch point. Batch b of attack a uses
the key ``fold_in(fold_in(key, b), a)``.

Robust accuracy is a worst case: a figure is only as good as the strongest attack tried. The
evaluators return per-example correctness (bool [n]) so that ``worst_case`` can count an
example as robust only if it survives every attack of the ensemble, and ``masked`` can flag a
model whose black-box (transfer) accuracy falls below its white-box accuracy: its gradients
mislead the white-box attacks, so their figure is not a robustness figure.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from core.attacks import AttackConfig, pgd, robust_correct
from core.dynamics import Anchor, ApplyFn, logits_fn

Jit = Callable[[Callable[..., Any]], Callable[..., Any]]
"""How a program is compiled: ``jax.jit``, or one kept across processes."""
Model = tuple[ApplyFn, Anchor | None, Any, Any]
"""A model to evaluate: (apply, anchor, params, batch_stats)."""


def _padded_batches(x: np.ndarray, y: np.ndarray, batch_size: int):
    """Yields (x [B, ...], y [B], mask [B]) with the last batch zero-padded."""
    n = len(y)
    batch_size = min(batch_size, n)
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        pad = batch_size - len(yb)
        mask = np.r_[np.ones(len(yb), bool), np.zeros(pad, bool)]
        if pad:
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
        yield xb, yb, mask


def make_evaluator(
    apply: ApplyFn, attacks: Mapping[str, AttackConfig], jit: Jit = jax.jit
) -> Callable[..., dict[str, np.ndarray]]:
    """Returns ``evaluate(anchor, params, batch_stats, x, y, key, batch_size) -> correct``.

    ``correct``: bool [n] per example, ``accuracy`` (clean) and ``robust_<name>`` for each
    attack (correct on every restart of it; ``accuracies`` turns them into fractions).
    ``jit`` compiles the per-batch program (``core.exported.stored_jit``: kept across
    processes).
    """
    names = list(attacks)

    @jit
    def batch_correct(anchor, params, batch_stats, x, y, key):
        f = logits_fn(apply, anchor, params, batch_stats)
        correct = [f(x).argmax(axis=1) == y]
        for a, name in enumerate(names):
            correct.append(robust_correct(f, x, y, jax.random.fold_in(key, a), attacks[name]))
        return jnp.stack(correct)

    def evaluate(anchor, params, batch_stats, x, y, key,
                 batch_size=500) -> dict[str, np.ndarray]:
        parts = []
        for b, (xb, yb, mb) in enumerate(_padded_batches(x, y, batch_size)):
            k = jax.random.fold_in(key, b)
            parts.append(np.asarray(batch_correct(anchor, params, batch_stats, xb, yb, k))[:, mb])
        correct = np.concatenate(parts, axis=1)
        return {"accuracy": correct[0],
                **{f"robust_{n}": correct[i + 1] for i, n in enumerate(names)}}

    return evaluate


def accuracies(correct: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Fractions of examples correct, by name."""
    return {name: float(np.mean(c)) for name, c in correct.items()}


def worst_case(correct: Mapping[str, np.ndarray], members: Collection[str]) -> np.ndarray:
    """bool [n]: correct under every member of the ensemble that was run (an example broken
    by any one attack is broken). Members not in ``correct`` are skipped."""
    present = [correct[m] for m in members if m in correct]
    if not present:
        raise ValueError(f"none of {list(members)} was evaluated")
    return np.logical_and.reduce(present)


def masked(accuracy: Mapping[str, float], white_box: Collection[str],
           black_box: Collection[str], threshold: float) -> bool:
    """Whether a black-box or transfer attack beats every white-box one by more than
    ``threshold`` (a fraction): the model's gradients mislead the white-box attacks."""
    white = [accuracy[m] for m in white_box if m in accuracy]
    black = [accuracy[m] for m in black_box if m in accuracy]
    return bool(white and black and min(black) < min(white) - threshold)


def make_crafter(apply: ApplyFn, attack: AttackConfig,
                 jit: Jit = jax.jit) -> Callable[..., np.ndarray]:
    """Adversarial examples crafted once against one model, to score many models on.

    Returns ``craft(model, x, y, key, batch_size) -> x_adv`` ([n, ...], the shape of x) with
    ``model`` an (anchor, params, batch_stats) triple; batch b uses ``fold_in(key, b)``.
    """

    @jit
    def batch_adv(model, x, y, key):
        return pgd(logits_fn(apply, *model), x, y, key, attack)

    def craft(model, x, y, key, batch_size=500) -> np.ndarray:
        parts = [np.asarray(batch_adv(model, xb, yb, jax.random.fold_in(key, b)))[mb]
                 for b, (xb, yb, mb) in enumerate(_padded_batches(x, y, batch_size))]
        return np.concatenate(parts)

    return craft


def make_transfer_evaluator(
    source_apply: ApplyFn, target_apply: ApplyFn, attack: AttackConfig, jit: Jit = jax.jit
) -> Callable[..., np.ndarray]:
    """Correctness of a target model on adversarial examples crafted against a source model.

    Returns ``transfer(source, target, x, y, key, batch_size) -> correct`` (bool [n]) where
    source and target are (anchor, params, batch_stats) triples. A target that resists its own
    attack but not a transferred one is masking gradients.
    """

    @jit
    def batch_correct(source, target, x, y, key):
        x_adv = pgd(logits_fn(source_apply, *source), x, y, key, attack)
        return logits_fn(target_apply, *target)(x_adv).argmax(axis=1) == y

    def transfer(source, target, x, y, key, batch_size=500) -> np.ndarray:
        parts = [np.asarray(batch_correct(source, target, xb, yb, jax.random.fold_in(key, b)))[mb]
                 for b, (xb, yb, mb) in enumerate(_padded_batches(x, y, batch_size))]
        return np.concatenate(parts)

    return transfer
