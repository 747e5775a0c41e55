"""PGD and FGSM: constraints, the analytic worst case of a linear model, strength ordering."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core.attacks import AttackConfig, apgd_checkpoints, attack_loss, pgd, robust_correct
from core.dynamics import Anchor, make_apply_fn
from core.train import init_state, make_step, run_phase
from tests.helpers import tiny_model

ATTACKS = {
    "linf": AttackConfig(norm="linf", eps=0.1, step_size=0.03, iters=7),
    "l2": AttackConfig(norm="l2", eps=0.5, step_size=0.2, iters=7),
}


@pytest.mark.parametrize("schedule", ["fixed", "apgd"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dynamics", ["standard", *(pytest.param(d, marks=pytest.mark.slow)
                                                for d in ("linearized", "centered"))])
def test_pgd_stays_in_the_ball_and_the_box(norm, dynamics, schedule):
    model, params, bs = tiny_model("cnn")
    apply = make_apply_fn(model, dynamics, "frozen")
    moved = jax.tree.map(lambda p: p * 1.1 + 0.01, params)  # away from the anchor
    f = lambda x: apply(Anchor(params, bs), moved, bs, x, False)[0]  # noqa: E731
    x = jax.random.uniform(jax.random.PRNGKey(0), (16, 8, 8, 1))
    x = x.at[:4].set(0.0).at[4:8].set(1.0)  # images on the box boundary
    y = jnp.arange(16) % 3
    cfg = dataclasses.replace(ATTACKS[norm], schedule=schedule)
    x_adv = jax.jit(lambda x, y, k: pgd(f, x, y, k, cfg))(x, y, jax.random.PRNGKey(1))
    delta = (x_adv - x).reshape(16, -1)
    tol = 1e-6
    if norm == "linf":
        assert float(jnp.abs(delta).max()) <= cfg.eps + tol
    else:
        assert float(jnp.linalg.norm(delta, axis=1).max()) <= cfg.eps + tol
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float(jnp.abs(delta).max()) > 0  # it did move


def _linear_binary(w: jax.Array, b: float):
    """Two-logit model whose logit difference z_1 - z_0 = w . x + b."""
    return lambda x: jnp.stack([jnp.zeros(x.shape[0]), x.reshape(x.shape[0], -1) @ w + b], axis=1)


@pytest.mark.parametrize("schedule", ["fixed", "apgd"])
@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_pgd_reaches_the_linear_worst_case_linf(loss, schedule):
    d = 20
    w = jax.random.normal(jax.random.PRNGKey(0), (d,))
    f = _linear_binary(w, 0.1)
    x = jax.random.uniform(jax.random.PRNGKey(1), (8, d))
    y = jnp.arange(8) % 2
    eps = 0.15
    cfg = AttackConfig(norm="linf", eps=eps, step_size=eps / 4, iters=20, loss=loss,
                       schedule=schedule)
    x_adv = pgd(f, x, y, jax.random.PRNGKey(2), cfg)
    # Worst case inside box and ball: move each pixel by eps against the label's sign of w,
    # clipped to [0, 1] (the feasible set is a product of intervals).
    s = jnp.where(y == 1, -1.0, 1.0)[:, None] * jnp.sign(w)[None]
    optimum = jnp.clip(x + eps * s, jnp.maximum(x - eps, 0), jnp.minimum(x + eps, 1))
    np.testing.assert_allclose(x_adv, optimum, atol=1e-6)
    margin = lambda z: attack_loss(z, y, "margin")  # noqa: E731
    np.testing.assert_allclose(margin(f(x_adv)), margin(f(optimum)), rtol=1e-5)


@pytest.mark.parametrize("schedule", ["fixed", "apgd"])
def test_pgd_reaches_the_linear_worst_case_l2(schedule):
    d = 20
    w = jax.random.normal(jax.random.PRNGKey(0), (d,))
    f = _linear_binary(w, 0.0)
    x = 0.4 + 0.2 * jax.random.uniform(jax.random.PRNGKey(1), (8, d))  # box never binds
    y = jnp.arange(8) % 2
    eps = 0.1
    cfg = AttackConfig(norm="l2", eps=eps, step_size=0.05, iters=30, loss="margin",
                       schedule=schedule)
    x_adv = pgd(f, x, y, jax.random.PRNGKey(2), cfg)
    s = jnp.where(y == 1, -1.0, 1.0)[:, None]
    optimum = x + eps * s * w / jnp.linalg.norm(w)
    # APGD's step halves towards the optimum rather than landing on it: 30 steps, 1e-5.
    np.testing.assert_allclose(x_adv, optimum, atol=1e-5 if schedule == "fixed" else 5e-5)
    worst = (x @ w) * s[:, 0] + eps * jnp.linalg.norm(w)  # analytic worst margin
    np.testing.assert_allclose(attack_loss(f(x_adv), y, "margin"), worst,
                               rtol=1e-5 if schedule == "fixed" else 1e-4)


def test_apgd_checkpoints_are_autoattacks():
    """The iterations after which APGD checks progress, against a plain transcription of
    AutoAttack's counter (first window 22 %, shrinking by 3 %, at least 6 %)."""
    for iters in (1, 5, 10, 20, 100, 1000):
        first, least, shrink = max(int(0.22 * iters), 1), max(int(0.06 * iters), 1), \
            max(int(0.03 * iters), 1)
        expected, counter, k = [], 0, first
        for i in range(iters):
            counter += 1
            if counter == k:
                expected.append(i)
                k, counter = max(k - shrink, least), 0
        assert apgd_checkpoints(iters) == expected, iters


def test_attack_is_one_compiled_loop():
    """The iteration count does not unroll: the program is the same size for 5 and 500 steps."""
    model, params, bs = tiny_model("mlp")
    f = lambda x: model.apply({"params": params}, x)  # noqa: E731
    x = jnp.zeros((4, 8, 8, 1))
    y = jnp.zeros(4, jnp.int32)
    sizes = []
    for iters in (5, 500):
        cfg = AttackConfig(iters=iters)
        jaxpr = jax.make_jaxpr(lambda x, c=cfg: pgd(f, x, y, jax.random.PRNGKey(0), c))(x)
        sizes.append(str(jaxpr).count("\n"))  # equations, not digits of the length
        assert "while" in str(jaxpr) or "scan" in str(jaxpr)
    assert sizes[0] == sizes[1]


def _trained_mlp(synthetic):
    model, params, bs = tiny_model("mlp")
    apply = make_apply_fn(model, "standard", "update")
    step = make_step(apply, momentum=0.9, lr=0.05)
    state = init_state(params, bs, 0.9, jax.random.PRNGKey(0))
    state = run_phase(state, None, {False: step}, jnp.asarray(synthetic.x_train),
                      jnp.asarray(synthetic.y_train), mode="C", flip_epoch=0, batch_size=16,
                      total_steps=80)
    return lambda x: apply(None, state.params, state.batch_stats, x, False)[0]


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_more_pgd_iterations_never_beat_fgsm(synthetic, norm):
    f = _trained_mlp(synthetic)
    x, y = jnp.asarray(synthetic.x_test), jnp.asarray(synthetic.y_test)
    key = jax.random.PRNGKey(5)
    eps = 0.08 if norm == "linf" else 0.6
    base = AttackConfig(norm=norm, eps=eps, step_size=eps / 4, iters=1, keep_best=True)
    clean = float(jnp.mean(f(x).argmax(1) == y))
    fgsm = float(jnp.mean(robust_correct(f, x, y, key, base.fgsm())))
    accs = []
    for iters in (10, 40):
        cfg = dataclasses.replace(base, iters=iters, step_size=2.5 * eps / iters)
        accs.append(float(jnp.mean(robust_correct(f, x, y, key, cfg))))
    accs.append(float(jnp.mean(robust_correct(
        f, x, y, key, dataclasses.replace(base, iters=40, schedule="apgd")))))
    assert clean > 0.8
    assert all(a <= fgsm for a in accs), (fgsm, accs)
    assert fgsm < clean  # the attack does something


@pytest.mark.slow
def test_restarts_only_lower_robust_accuracy(synthetic):
    f = _trained_mlp(synthetic)
    x, y = jnp.asarray(synthetic.x_test), jnp.asarray(synthetic.y_test)
    one = AttackConfig(eps=0.08, step_size=0.02, iters=5, restarts=1)
    four = dataclasses.replace(one, restarts=4)
    key = jax.random.PRNGKey(3)
    ok1, ok4 = robust_correct(f, x, y, key, one), robust_correct(f, x, y, key, four)
    # Restart 0 of both uses the same key, so four restarts can only remove robust samples.
    assert bool(jnp.all(ok4 <= ok1))


def test_random_start_comes_from_the_key():
    model, params, _ = tiny_model("mlp")
    f = lambda x: model.apply({"params": params}, x)  # noqa: E731
    x = jnp.full((4, 8, 8, 1), 0.5)
    y = jnp.zeros(4, jnp.int32)
    cfg = AttackConfig(iters=0)
    a = pgd(f, x, y, jax.random.PRNGKey(0), cfg)
    b = pgd(f, x, y, jax.random.PRNGKey(0), cfg)
    c = pgd(f, x, y, jax.random.PRNGKey(1), cfg)
    assert bool(jnp.all(a == b)) and not bool(jnp.all(a == c))


def test_margin_loss_is_best_other_minus_true():
    z = jnp.array([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0]])
    y = jnp.array([2, 0])
    np.testing.assert_allclose(attack_loss(z, y, "margin"), [1.0, -4.0])
    np.testing.assert_allclose(
        attack_loss(z, y, "ce"), optax.softmax_cross_entropy_with_integer_labels(z, y)
    )
