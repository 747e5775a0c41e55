"""Projected gradient descent (PGD) attacks in L-inf and L2, with FGSM as the one-step case.

PGD maximises a loss L(f(x'), y) over the set {x' : ||x' - x|| <= eps, 0 <= x' <= 1}:

    x_0     = clip(x + delta_0, 0, 1)            delta_0 uniform in the eps-ball (random start)
    x_{i+1} = clip(P_eps(x_i + alpha * s(grad_x L(f(x_i), y))), 0, 1)

with s(g) = sign(g) for L-inf and g / ||g||_2 for L2, and P_eps the projection onto the
eps-ball around x. The whole loop is one ``lax.fori_loop`` inside the caller's jit, so an
attack is a single compiled program. Every random draw comes from the key passed in.

With ``keep_best`` (evaluation), each image keeps the first iterate that the model
misclassifies, so a sample counts as robust only if every iterate is classified correctly.

``schedule="apgd"`` replaces the fixed step by APGD's (Croce & Hein 2020, the core of
AutoAttack), per image: initial step eta = 2 eps, a momentum step

    z       = P(x_k + eta s(grad L(x_k)))
    x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}))       (x_1 = z: no momentum)

and at checkpoints (after 22 % of the iterations, then at intervals shrinking by 3 % to at
least 6 %) eta halves, and the image restarts from its highest-loss point, when the loss rose
in at most 75 % of the steps since the last checkpoint, or when eta was not halved there and
the best loss has not improved since.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax

if TYPE_CHECKING:
    from core.config import AttackSpec

LogitsFn = Callable[[jax.Array], jax.Array]


class Norm(enum.StrEnum):
    LINF = "linf"
    L2 = "l2"


class AttackLoss(enum.StrEnum):
    CROSS_ENTROPY = "ce"
    MARGIN = "margin"


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """One PGD attack.

    Attributes:
      norm: ``linf`` or ``l2``.
      eps: radius of the perturbation ball.
      step_size: alpha; the reference uses 2 * eps / iters.
      iters: number of gradient steps (1 with step_size = eps and no random start is FGSM).
      random_start: start uniformly inside the eps-ball.
      loss: ``ce`` (cross-entropy) or ``margin`` (max_{j != y} z_j - z_y).
      restarts: independent random starts in evaluation; a sample is robust only if it
        survives all of them.
      keep_best: keep each sample's first misclassified iterate (evaluation).
      schedule: ``fixed`` (step_size every iteration) or ``apgd`` (APGD's adaptive step from
        2 eps, momentum 0.75; step_size unused).
    """

    norm: Norm = Norm.LINF
    eps: float = 4 / 255
    step_size: float = 2 * (4 / 255) / 20
    iters: int = 20
    random_start: bool = True
    loss: AttackLoss = AttackLoss.CROSS_ENTROPY
    restarts: int = 1
    keep_best: bool = False
    schedule: str = "fixed"

    @classmethod
    def reference(cls, norm: Norm | str = Norm.LINF, iters: int = 20, **kw) -> AttackConfig:
        """The reference settings: L-inf eps 4/255 step 2 eps / iters; L2 eps 0.25 step 0.01."""
        norm = Norm(norm)
        if norm is Norm.LINF:
            eps = kw.pop("eps", 4 / 255)
            return cls(norm, eps, kw.pop("step_size", 2 * eps / iters), iters, **kw)
        return cls(norm, kw.pop("eps", 0.25), kw.pop("step_size", 0.01), iters, **kw)

    def fgsm(self) -> AttackConfig:
        """The one-step version: a single step of size eps from x (no random start)."""
        return dataclasses.replace(self, iters=1, step_size=self.eps, random_start=False)


def attack_loss(logits: jax.Array, y: jax.Array, loss: AttackLoss) -> jax.Array:
    """Per-sample loss [B] to maximise, from logits [B, O] and labels [B]."""
    if AttackLoss(loss) is AttackLoss.CROSS_ENTROPY:
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)
    true = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    others = jnp.where(jax.nn.one_hot(y, logits.shape[1], dtype=bool), -jnp.inf, logits)
    return others.max(axis=1) - true


def _flat_norm(v: jax.Array) -> jax.Array:
    """Per-sample L2 norm [B, 1, ..., 1] of v [B, ...]."""
    return jnp.sqrt(jnp.sum(v**2, axis=tuple(range(1, v.ndim)), keepdims=True))


def project(delta: jax.Array, norm: Norm, eps: float) -> jax.Array:
    """Projects perturbations delta [B, ...] onto the eps-ball of the given norm."""
    if norm is Norm.LINF:
        return jnp.clip(delta, -eps, eps)
    return delta * jnp.minimum(1.0, eps / jnp.maximum(_flat_norm(delta), 1e-12))


def random_start(key: jax.Array, x: jax.Array, norm: Norm, eps: float) -> jax.Array:
    """A perturbation drawn uniformly from the eps-ball, [B, ...] like x.

    L-inf: each coordinate uniform in [-eps, eps]. L2: uniform direction (normalised Gaussian)
    and radius eps * u^(1/d), which is uniform in volume.
    """
    if norm is Norm.LINF:
        return jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
    k_dir, k_rad = jax.random.split(key)
    direction = jax.random.normal(k_dir, x.shape, x.dtype)
    direction = direction / jnp.maximum(_flat_norm(direction), 1e-12)
    d = x[0].size
    radius = eps * jax.random.uniform(k_rad, (x.shape[0],) + (1,) * (x.ndim - 1)) ** (1.0 / d)
    return direction * radius


def _ascent_direction(g: jax.Array, norm: Norm) -> jax.Array:
    if norm is Norm.LINF:
        return jnp.sign(g)
    return g / jnp.maximum(_flat_norm(g), 1e-12)


def pgd(
    logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array, cfg: AttackConfig
) -> jax.Array:
    """Adversarial examples [B, ...] for inputs x [B, ...] in [0, 1] and labels y [B].

    Args:
      logits_fn: inference-mode model, x [B, ...] -> logits [B, O]; samples must not interact.
      x: clean inputs.
      y: int labels.
      key: PRNG key for the random start.
      cfg: the attack.
    """
    if cfg.schedule == "apgd":
        return apgd(logits_fn, x, y, key, cfg)
    norm = Norm(cfg.norm)

    def loss_and_logits(xa):
        logits = logits_fn(xa)
        return attack_loss(logits, y, cfg.loss).sum(), logits

    grad_fn = jax.grad(loss_and_logits, has_aux=True)
    start = random_start(key, x, norm, cfg.eps) if cfg.random_start else jnp.zeros_like(x)
    x0 = jnp.clip(x + start, 0.0, 1.0)
    found = jnp.zeros(x.shape[0], bool)

    def body(_, carry):
        xa, best, found = carry
        g, logits = grad_fn(xa)
        if cfg.keep_best:
            wrong = (logits.argmax(axis=1) != y) & ~found
            best = jnp.where(_expand(wrong, xa), xa, best)
            found = found | wrong
        step = xa + cfg.step_size * _ascent_direction(g, norm)
        xa = jnp.clip(x + project(step - x, norm, cfg.eps), 0.0, 1.0)
        return xa, best, found

    xa, best, found = jax.lax.fori_loop(0, cfg.iters, body, (x0, x0, found))
    if not cfg.keep_best:
        return xa
    return jnp.where(_expand(found, xa), best, xa)


def apgd_checkpoints(iters: int) -> list[int]:
    """The iterations (0-based) after which APGD checks its progress: the first after
    max(22 % of iters, 1) iterations, each next one sooner by max(3 %, 1), at least 6 %
    (AutoAttack's integer version of the paper's p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03,
    0.06))."""
    first, least, shrink = (max(int(f * iters), 1) for f in (0.22, 0.06, 0.03))
    points, at, window = [], first, first
    while at <= iters:
        points.append(at - 1)
        window = max(window - shrink, least)
        at += window
    return points


def apgd(
    logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array, cfg: AttackConfig
) -> jax.Array:
    """``pgd`` with APGD's step-size schedule (module docstring): ``cfg.iters`` + 1 gradient
    evaluations, as AutoAttack's APGD."""
    norm = Norm(cfg.norm)
    marks = apgd_checkpoints(cfg.iters)
    is_mark = jnp.zeros(cfg.iters, bool).at[jnp.array(marks)].set(True)
    windows = jnp.zeros(cfg.iters).at[jnp.array(marks)].set(
        jnp.diff(jnp.array([-1, *marks])).astype(jnp.float32))

    def loss_grad(xa):
        def total(v):
            logits = logits_fn(v)
            per = attack_loss(logits, y, cfg.loss)
            return per.sum(), (per, logits)

        g, (per, logits) = jax.grad(total, has_aux=True)(xa)
        return g, per, logits

    def to_ball(v):
        return jnp.clip(x + project(v - x, norm, cfg.eps), 0.0, 1.0)

    start = random_start(key, x, norm, cfg.eps) if cfg.random_start else jnp.zeros_like(x)
    x0 = jnp.clip(x + start, 0.0, 1.0)
    g0, loss0, logits0 = loss_grad(x0)
    found = logits0.argmax(axis=1) != y
    b = x.shape[0]
    carry = dict(xa=x0, old=x0, g=g0, eta=jnp.full(b, 2 * cfg.eps, x.dtype), prev=loss0,
                 best_loss=loss0, x_max=x0, g_max=g0, rises=jnp.zeros(b),
                 halved=jnp.zeros(b, bool), best_at_mark=loss0, adv=x0, found=found)

    def body(i, c):
        momentum = jnp.where(i > 0, 0.75, 1.0)
        z = to_ball(c["xa"] + _expand(c["eta"], x) * _ascent_direction(c["g"], norm))
        xa = to_ball(c["xa"] + momentum * (z - c["xa"]) + (1 - momentum) * (c["xa"] - c["old"]))
        g, loss, logits = loss_grad(xa)
        wrong = (logits.argmax(axis=1) != y) & ~c["found"]
        adv = jnp.where(_expand(wrong, x), xa, c["adv"])
        better = loss > c["best_loss"]
        x_max = jnp.where(_expand(better, x), xa, c["x_max"])
        g_max = jnp.where(_expand(better, x), g, c["g_max"])
        best_loss = jnp.where(better, loss, c["best_loss"])
        rises = c["rises"] + (loss > c["prev"])
        # At a checkpoint: halve eta and go back to the best point where progress stalled.
        stalled = (rises <= 0.75 * windows[i]) | (~c["halved"] & (c["best_at_mark"] >= best_loss))
        halve = is_mark[i] & stalled
        old = xa
        xa = jnp.where(_expand(halve, x), x_max, xa)
        g = jnp.where(_expand(halve, x), g_max, g)
        return dict(
            xa=xa, old=old, g=g, eta=jnp.where(halve, c["eta"] / 2, c["eta"]), prev=loss,
            best_loss=best_loss, x_max=x_max, g_max=g_max,
            rises=jnp.where(is_mark[i], 0.0, rises),
            halved=jnp.where(is_mark[i], halve, c["halved"]),
            best_at_mark=jnp.where(is_mark[i], best_loss, c["best_at_mark"]),
            adv=adv, found=c["found"] | wrong)

    c = jax.lax.fori_loop(0, cfg.iters, body, carry)
    if cfg.keep_best:
        return jnp.where(_expand(c["found"], x), c["adv"], c["x_max"])
    return c["x_max"]


def _expand(mask: jax.Array, like: jax.Array) -> jax.Array:
    return mask.reshape(mask.shape + (1,) * (like.ndim - 1))


def robust_correct(
    logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array, cfg: AttackConfig
) -> jax.Array:
    """bool [B]: correct on every one of ``cfg.restarts`` PGD runs.

    Restart r starts from ``fold_in(key, r)``; clean misclassifications count as not robust.
    """

    def body(r, ok):
        xa = pgd(logits_fn, x, y, jax.random.fold_in(key, r), cfg)
        return ok & (logits_fn(xa).argmax(axis=1) == y)

    ok = logits_fn(x).argmax(axis=1) == y
    return jax.lax.fori_loop(0, max(cfg.restarts, 1), body, ok)


def attack_config(spec: AttackSpec, keep_best: bool = False) -> AttackConfig:
    """The attack a config's ``AttackSpec`` describes (``keep_best``: keep each example's
    strongest iterate, as the evaluation does). Default step: 2 eps / iters (L-inf), 0.01
    (L2)."""
    step = spec.step_size
    if step is None:
        step = 2 * spec.eps / spec.iters if spec.norm == "linf" else 0.01
    return AttackConfig(Norm(spec.norm), spec.eps, step, spec.iters, spec.random_start,
                        AttackLoss(spec.loss), spec.restarts, keep_best, spec.schedule)
