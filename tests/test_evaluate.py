"""Whole-test-set evaluation: padding, robust and transfer accuracy against direct computation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.attacks import AttackConfig, pgd, robust_correct
from core.dynamics import Anchor, logits_fn, make_apply_fn
from core.evaluate import (
    accuracies,
    make_crafter,
    make_evaluator,
    make_transfer_evaluator,
    masked,
    worst_case,
)
from core.experiment import run_experiment
from tests.helpers import tiny_model

ATTACK = AttackConfig(eps=0.1, step_size=0.05, iters=3)


def test_batched_evaluation_equals_one_batch(synthetic):
    model, params, bs = tiny_model("cnn")
    apply = make_apply_fn(model, "standard", "frozen")
    evaluate = make_evaluator(apply, {"linf": ATTACK})
    x, y = synthetic.x_test[:30], synthetic.y_test[:30]  # 30 = 4 batches of 8, the last padded
    key = jax.random.PRNGKey(0)
    correct = evaluate(None, params, bs, x, y, key, batch_size=8)
    assert {k: v.shape for k, v in correct.items()} == {"accuracy": (30,), "robust_linf": (30,)}
    metrics = accuracies(correct)
    f = logits_fn(apply, None, params, bs)
    clean = np.mean(np.asarray(f(jnp.asarray(x)).argmax(1)) == y)
    robust = []
    for b, start in enumerate(range(0, 30, 8)):
        xb, yb = jnp.asarray(x[start:start + 8]), jnp.asarray(y[start:start + 8])
        k = jax.random.fold_in(jax.random.fold_in(key, b), 0)
        robust.append(np.asarray(robust_correct(f, xb, yb, k, ATTACK)))
    assert metrics["accuracy"] == clean
    assert metrics["robust_linf"] == np.concatenate(robust).mean()


@pytest.mark.slow
def test_transfer_from_a_model_to_itself_is_its_own_pgd_accuracy(synthetic):
    model, params, bs = tiny_model("cnn")
    net = make_apply_fn(model, "standard", "frozen")
    lin = make_apply_fn(model, "linearized", "frozen")
    transfer = make_transfer_evaluator(net, lin, ATTACK)
    x, y = synthetic.x_test[:16], synthetic.y_test[:16]
    key = jax.random.PRNGKey(1)
    # The linearized model at its anchor is the network, so transfer = white-box here.
    correct = transfer((None, params, bs), (Anchor(params, bs), params, bs), x, y, key, 16)
    f = logits_fn(net, None, params, bs)
    x_adv = pgd(f, jnp.asarray(x), jnp.asarray(y), jax.random.fold_in(key, 0), ATTACK)
    np.testing.assert_array_equal(correct, np.asarray(f(x_adv).argmax(1)) == y)


@pytest.mark.slow
def test_examples_crafted_once_score_as_the_transfer_attack(synthetic):
    """``make_crafter`` + a clean evaluation on its examples = ``make_transfer_evaluator``
    (same keys, batch by batch), so a reference network's examples are crafted once."""
    model, params, bs = tiny_model("cnn")
    _, other, other_bs = tiny_model("cnn", seed=1)
    net = make_apply_fn(model, "standard", "frozen")
    x, y = synthetic.x_test[:30], synthetic.y_test[:30]
    key = jax.random.PRNGKey(2)
    x_adv = make_crafter(net, ATTACK)((None, params, bs), x, y, key, batch_size=8)
    assert x_adv.shape == x.shape and np.abs(x_adv - x).max() <= ATTACK.eps + 1e-6
    scored = make_evaluator(net, {})(None, other, other_bs, x_adv, y, key, 8)["accuracy"]
    transfer = make_transfer_evaluator(net, net, ATTACK)(
        (None, params, bs), (None, other, other_bs), x, y, key, 8)
    np.testing.assert_array_equal(scored, transfer)


def test_an_example_broken_by_any_one_attack_is_broken():
    """The worst case is per example: two attacks that each break a different half leave
    nothing robust, although each alone reports 50 %."""
    correct = {"accuracy": np.array([1, 1, 1, 1, 0], bool),
               "robust_linf": np.array([1, 1, 0, 0, 0], bool),
               "robust_margin": np.array([0, 0, 1, 1, 0], bool),
               "robust_l2": np.zeros(5, bool)}
    worst = worst_case(correct, ("accuracy", "robust_linf", "robust_margin", "transfer_linf"))
    np.testing.assert_array_equal(worst, np.zeros(5, bool))  # transfer not run: skipped
    correct["robust_margin"] = np.array([1, 0, 0, 0, 0], bool)
    np.testing.assert_array_equal(worst_case(correct, ("robust_linf", "robust_margin")),
                                  [True, False, False, False, False])
    acc = accuracies(correct)
    assert acc["robust_linf"] == 0.4 and acc["robust_margin"] == 0.2


@pytest.mark.parametrize("transfer, threshold, flagged", [
    (0.30, 0.02, True), (0.49, 0.02, False), (0.47, 0.02, True), (0.60, 0.0, False),
    (None, 0.0, False)])
def test_the_masking_alarm(transfer, threshold, flagged):
    """Flagged when the transfer attack beats the strongest white-box attack by more than the
    threshold (here white-box 0.5 under PGD, 0.55 under the margin attack)."""
    acc = {"accuracy": 0.9, "robust_linf": 0.5, "robust_margin": 0.55}
    if transfer is not None:
        acc["transfer_linf"] = transfer
    assert masked(acc, ("robust_linf", "robust_margin"), ("transfer_linf",), threshold) is flagged


@pytest.mark.slow
def test_an_experiment_reports_the_worst_case_of_its_ensemble(tmp_path):
    """On real models: worst L-inf is at most every L-inf member, per row; the margin attack
    ran; the masked flag is there."""
    from core.config import WORST_LINF
    from tests.helpers import BASE
    from tests.helpers import tiny_cfg as _cfg

    cfg = _cfg(codes=["AC", "CA"], switch_points=[0, 1],
               eval={**BASE["eval"], "transfer": True})
    rows = run_experiment(cfg, tmp_path)
    for r in rows:
        assert isinstance(r["masked"], bool) and not math.isnan(r["robust_margin"])
        members = [r[m] for m in WORST_LINF if not math.isnan(r[m])]
        assert r["worst_linf"] <= min(members)
    assert all(not math.isnan(r["transfer_linf"]) for r in rows if not r["code"].endswith("-"))


@pytest.mark.slow
def test_a_named_reference_network_scores_every_model(tmp_path):
    """``eval.reference: A`` trains the A trajectory even without an A code, crafts its
    examples once per seed, scores every row on them, and the worst case counts them."""
    from tests.helpers import BASE
    from tests.helpers import tiny_cfg as _cfg

    cfg = _cfg(codes=["CC"], switch_points=[0, 2], eval={**BASE["eval"], "reference": "A"})
    rows = run_experiment(cfg, tmp_path)
    trajectories = sorted(p.name for p in (tmp_path / "trajectories").iterdir() if p.is_dir())
    assert len(trajectories) == 2  # C for the rows, A for the reference
    for r in rows:
        assert 0 <= r["reference_linf"] <= 1
        assert r["worst_linf"] <= min(r["reference_linf"], r["robust_linf"], r["accuracy"])
    # Without it: the same rows but for the new column (its key comes after the others').
    plain = run_experiment(_cfg(codes=["CC"], switch_points=[0, 2]), tmp_path / "plain")
    for a, b in zip(rows, plain, strict=True):
        assert math.isnan(b["reference_linf"])
        assert (a["accuracy"], a["robust_linf"]) == (b["accuracy"], b["robust_linf"])


@pytest.mark.slow
def test_a_run_does_its_own_work_while_another_process_trains_its_reference(tmp_path):
    """A run that does not train the reference itself (a sweep's CC trial; reference A)
    while another process holds the reference trajectory: it trains and evaluates its own
    models first and waits only when nothing else is left, and its rows are those of a run
    that never waited (the digits grid as a sweep idled a core through all of phase-1 A)."""
    import json
    import threading

    from core.experiment import Hooks
    from core.trajectory_store import TrajectoryStore
    from tests.helpers import BASE
    from tests.helpers import tiny_cfg as _cfg

    cfg = _cfg(codes=["CC"], switch_points=[0, 1, 2], eval={**BASE["eval"], "reference": "A"})
    alone = run_experiment(cfg, tmp_path / "alone")
    held, release = threading.Event(), threading.Event()

    def other_process() -> None:  # flock: another open file is another holder
        with TrajectoryStore(tmp_path / "busy").get(cfg, "A", 0).lock():
            held.set()
            release.wait(600)

    holder = threading.Thread(target=other_process)
    holder.start()
    held.wait(60)
    events: list[tuple] = []

    def on_wait(trajectory) -> None:
        events.append(("wait", trajectory.mode))
        release.set()

    hooks = Hooks(on_stage=lambda s: events.append(("stage", s.phase, s.code)),
                  on_wait=on_wait, on_result=lambda r: events.append(("row", r["code"])))
    try:
        rows = run_experiment(cfg, tmp_path / "busy", hooks)
    finally:
        release.set()
        holder.join()
    waited = events.index(("wait", "A"))
    assert events[:waited].count(("stage", 2, "CC")) == 3  # every phase 2 before waiting
    assert ("row", "CC") in events[waited:] and ("row", "CC") not in events[:waited]

    def same(rs):
        return [json.dumps({k: v for k, v in r.items() if k != "seconds"}) for r in rs]
    assert same(rows) == same(alone)  # bit for bit, the reference column included
    assert all(0 <= r["reference_linf"] <= 1 for r in rows)
