"""Standard, linearized and centered apply functions around switch-point parameters.

For a network f_theta and switch-point parameters theta_t (the *anchor*):

* standard:   f_theta(x)
* linearized: f_{theta_t}(x) + J_{theta_t}(x) (theta - theta_t)
* centered:   J_{theta_t}(x) (theta - theta_t)   (exactly 0 at theta = theta_t)

The Jacobian-vector product is one ``jax.jvp`` of the anchor network, so a linearized forward
pass costs about one forward plus one tangent pass and never materialises J.

Every apply function has the signature ``apply(anchor, params, batch_stats, x, train)`` and
returns ``(logits [B, O], batch_stats)``. The anchor is an argument rather than a closure so
that one compiled step serves every switch point.

BatchNorm (``bn``):

* ``"update"``: training passes normalise with batch statistics and update the running
  statistics; inference passes use them. Phase 1 (standard dynamics only).
* ``"frozen"``: always inference mode with the anchor's running statistics. Phase 2 default.
* ``"batch"``: training passes normalise with batch statistics, running statistics stay at the
  anchor's; inference passes use them (ablation).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax

Params = Any
BatchStats = Any


class Dynamics(enum.StrEnum):
    STANDARD = "standard"
    LINEARIZED = "linearized"
    CENTERED = "centered"


class BatchNormMode(enum.StrEnum):
    UPDATE = "update"
    FROZEN = "frozen"
    BATCH = "batch"


class Anchor(NamedTuple):
    """Switch-point parameters theta_t and BatchNorm running statistics."""

    params: Params
    batch_stats: BatchStats


ApplyFn = Callable[[Anchor | None, Params, BatchStats, jax.Array, bool], tuple[jax.Array, Any]]


def _network(model: nn.Module, params: Params, batch_stats: BatchStats, x: jax.Array, batch: bool):
    """f_theta(x) [B, O] and the running statistics updated by this pass (if ``batch``)."""
    variables = {"params": params, "batch_stats": batch_stats}
    if not batch:
        return model.apply(variables, x, train=False), batch_stats
    logits, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return logits, updated.get("batch_stats", batch_stats)


def make_apply_fn(
    model: nn.Module, dynamics: Dynamics | str, bn: BatchNormMode | str = BatchNormMode.FROZEN
) -> ApplyFn:
    """Returns ``apply(anchor, params, batch_stats, x, train) -> (logits, batch_stats)``."""
    dynamics, bn = Dynamics(dynamics), BatchNormMode(bn)
    if dynamics is not Dynamics.STANDARD and bn is BatchNormMode.UPDATE:
        raise ValueError("BatchNorm mode 'update' is only defined for standard dynamics")

    if dynamics is Dynamics.STANDARD:

        def apply_standard(anchor, params, batch_stats, x, train):
            if bn is BatchNormMode.FROZEN or not train:
                return _network(model, params, batch_stats, x, batch=False)
            logits, updated = _network(model, params, batch_stats, x, batch=True)
            return logits, updated if bn is BatchNormMode.UPDATE else batch_stats

        return apply_standard

    centered = dynamics is Dynamics.CENTERED

    def apply_linear(anchor, params, batch_stats, x, train):
        use_batch = train and bn is BatchNormMode.BATCH

        def f(p):
            return _network(model, p, anchor.batch_stats, x, batch=use_batch)[0]

        delta = jax.tree.map(lambda p, p0: p - p0, params, anchor.params)
        f0, jvp = jax.jvp(f, (anchor.params,), (delta,))
        return (jvp if centered else f0 + jvp), batch_stats

    return apply_linear


def logits_fn(
    apply: ApplyFn, anchor: Anchor | None, params: Params, batch_stats: BatchStats
) -> Callable[[jax.Array], jax.Array]:
    """The inference-mode map x [B, ...] -> logits [B, O] of one model (what attacks attack)."""
    return lambda x: apply(anchor, params, batch_stats, x, False)[0]
