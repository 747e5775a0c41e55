"""Clean accuracy, PGD robust accuracy and transfer accuracy over a whole test set.

The test set is cut into fixed-size batches (the last one padded and masked) so one compiled
program serves every batch, every checkpoint and every switch point. Batch b of attack a uses
the key ``fold_in(fold_in(key, b), a)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from core.attacks import AttackConfig, pgd, robust_correct
from core.dynamics import Anchor, ApplyFn, logits_fn

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
    apply: ApplyFn, attacks: Mapping[str, AttackConfig]
) -> Callable[..., dict[str, float]]:
    """Returns ``evaluate(anchor, params, batch_stats, x, y, key, batch_size) -> metrics``.

    Metrics: ``accuracy`` and ``robust_<name>`` for each attack, fractions in [0, 1].
    """
    names = list(attacks)

    @jax.jit
    def batch_counts(anchor, params, batch_stats, x, y, mask, key):
        f = logits_fn(apply, anchor, params, batch_stats)
        counts = [jnp.sum((f(x).argmax(axis=1) == y) & mask)]
        for a, name in enumerate(names):
            ok = robust_correct(f, x, y, jax.random.fold_in(key, a), attacks[name])
            counts.append(jnp.sum(ok & mask))
        return jnp.stack(counts)

    def evaluate(anchor, params, batch_stats, x, y, key, batch_size=500) -> dict[str, float]:
        total = np.zeros(len(names) + 1, np.int64)
        for b, (xb, yb, mb) in enumerate(_padded_batches(x, y, batch_size)):
            k = jax.random.fold_in(key, b)
            total += np.asarray(batch_counts(anchor, params, batch_stats, xb, yb, mb, k))
        metrics = {"accuracy": total[0] / len(y)}
        metrics.update({f"robust_{n}": total[i + 1] / len(y) for i, n in enumerate(names)})
        return {k: float(v) for k, v in metrics.items()}

    return evaluate


def make_transfer_evaluator(
    source_apply: ApplyFn, target_apply: ApplyFn, attack: AttackConfig
) -> Callable[..., float]:
    """Accuracy of a target model on adversarial examples crafted against a source model.

    Returns ``transfer(source, target, x, y, key, batch_size) -> accuracy`` where source and
    target are (anchor, params, batch_stats) triples. A target that resists its own attack but
    not a transferred one is masking gradients.
    """

    @jax.jit
    def batch_count(source, target, x, y, mask, key):
        x_adv = pgd(logits_fn(source_apply, *source), x, y, key, attack)
        pred = logits_fn(target_apply, *target)(x_adv).argmax(axis=1)
        return jnp.sum((pred == y) & mask)

    def transfer(source, target, x, y, key, batch_size=500) -> float:
        correct = 0
        for b, (xb, yb, mb) in enumerate(_padded_batches(x, y, batch_size)):
            correct += int(batch_count(source, target, xb, yb, mb, jax.random.fold_in(key, b)))
        return correct / len(y)

    return transfer
