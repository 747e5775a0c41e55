"""Whole-test-set evaluation: padding, robust and transfer accuracy against direct computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from core.attacks import AttackConfig, pgd, robust_correct
from core.dynamics import Anchor, logits_fn, make_apply_fn
from core.evaluate import make_evaluator, make_transfer_evaluator
from tests.conftest import tiny_model

ATTACK = AttackConfig(eps=0.1, step_size=0.05, iters=3)


def test_batched_evaluation_equals_one_batch(synthetic):
    model, params, bs = tiny_model("cnn")
    apply = make_apply_fn(model, "standard", "frozen")
    evaluate = make_evaluator(apply, {"linf": ATTACK})
    x, y = synthetic.x_test[:30], synthetic.y_test[:30]  # 30 = 4 batches of 8, the last padded
    key = jax.random.PRNGKey(0)
    metrics = evaluate(None, params, bs, x, y, key, batch_size=8)
    f = logits_fn(apply, None, params, bs)
    clean = np.mean(np.asarray(f(jnp.asarray(x)).argmax(1)) == y)
    robust = []
    for b, start in enumerate(range(0, 30, 8)):
        xb, yb = jnp.asarray(x[start:start + 8]), jnp.asarray(y[start:start + 8])
        k = jax.random.fold_in(jax.random.fold_in(key, b), 0)
        robust.append(np.asarray(robust_correct(f, xb, yb, k, ATTACK)))
    assert metrics["accuracy"] == clean
    assert metrics["robust_linf"] == np.concatenate(robust).mean()


def test_transfer_from_a_model_to_itself_is_its_own_pgd_accuracy(synthetic):
    model, params, bs = tiny_model("cnn")
    net = make_apply_fn(model, "standard", "frozen")
    lin = make_apply_fn(model, "linearized", "frozen")
    transfer = make_transfer_evaluator(net, lin, ATTACK)
    x, y = synthetic.x_test[:16], synthetic.y_test[:16]
    key = jax.random.PRNGKey(1)
    # The linearized model at its anchor is the network, so transfer = white-box here.
    acc = transfer((None, params, bs), (Anchor(params, bs), params, bs), x, y, key, 16)
    f = logits_fn(net, None, params, bs)
    x_adv = pgd(f, jnp.asarray(x), jnp.asarray(y), jax.random.fold_in(key, 0), ATTACK)
    assert acc == float(np.mean(np.asarray(f(x_adv).argmax(1)) == y))
