"""Training: reproducibility bit for bit, checkpoint/restore continuation, schedules, modes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.attacks import AttackConfig
from core.checkpoints import CheckpointStore
from core.dynamics import Anchor, make_apply_fn
from core.train import (
    Divergence,
    epoch_batches,
    init_state,
    is_adversarial,
    learning_rate,
    make_step,
    run_phase,
)
from tests.helpers import tiny_model

pytestmark = pytest.mark.smoke  # CI also runs these on Python 3.13

BATCH = 16  # 64 training images -> 4 steps per epoch
ATTACK = AttackConfig(eps=0.1, step_size=0.05, iters=3)


def _setup(synthetic, dynamics="standard", scheme="reference"):
    model, params, bs = tiny_model("cnn")
    bn = "update" if dynamics == "standard" else "frozen"
    apply = make_apply_fn(model, dynamics, bn)
    schedule = lambda s, lr: learning_rate(s, 4, lr, (2,), 0.1)  # noqa: E731
    steps = {
        False: make_step(apply, momentum=0.9, lr=0.05, schedule=schedule),
        True: make_step(apply, momentum=0.9, lr=0.05, schedule=schedule, attack=ATTACK,
                        scheme=scheme),
    }
    state = init_state(params, bs, 0.9, jax.random.PRNGKey(7))
    anchor = None if dynamics == "standard" else Anchor(params, bs)
    data = (jnp.asarray(synthetic.x_train), jnp.asarray(synthetic.y_train))
    return state, anchor, steps, data


def _run(state, anchor, steps, data, total, **kw):
    history = []
    state = run_phase(state, anchor, steps, *data, mode="F", flip_epoch=1, batch_size=BATCH,
                      total_steps=total, on_epoch=lambda e, m: history.append((e, m)), **kw)
    return state, history


def _equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.all(x == y)), a, b)))


@pytest.mark.parametrize("dynamics", ["standard",
                                      pytest.param("centered", marks=pytest.mark.slow)])
def test_same_seed_same_result_bit_for_bit(synthetic, dynamics):
    a, hist_a = _run(*_setup(synthetic, dynamics), total=12)
    b, hist_b = _run(*_setup(synthetic, dynamics), total=12)
    assert _equal(a, b) and hist_a == hist_b
    assert len(hist_a) == 3


def test_four_epochs_equal_two_restore_two(synthetic, tmp_path):
    straight, hist_straight = _run(*_setup(synthetic), total=16)

    state, anchor, steps, data = _setup(synthetic)
    store = CheckpointStore(tmp_path / "ckpt")
    first, _ = _run(state, anchor, steps, data, total=8, checkpoint_steps=frozenset({8}),
                    on_checkpoint=lambda s, step, _: store.save(step, s, {"epoch": step / 4}))
    assert store.steps() == [8]

    # A new process would rebuild everything: fresh template, fresh jitted steps.
    template, anchor, steps, data = _setup(synthetic)
    restored, meta = store.restore(8, template)
    assert meta == {"epoch": 2.0} and int(restored.step) == 8
    assert _equal(restored, first)
    resumed, hist_resumed = _run(restored, anchor, steps, data, total=16)
    assert _equal(resumed, straight)
    assert hist_resumed == hist_straight[2:]


def test_epoch_order_depends_on_key_and_epoch_only():
    k = jax.random.PRNGKey(0)
    a, b = epoch_batches(k, 3, 50, 8), epoch_batches(k, 3, 50, 8)
    assert a.shape == (6, 8) and bool(jnp.all(a == b))
    assert not bool(jnp.all(a == epoch_batches(k, 4, 50, 8)))
    assert len(set(np.asarray(a).ravel().tolist())) == 48  # no repeats within an epoch


def test_step_learning_rate_schedule():
    lr = [float(learning_rate(jnp.int32(s), 10, 0.1, (1, 2.5), 0.1)) for s in (0, 9, 10, 24, 25)]
    np.testing.assert_allclose(lr, [0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6)


def test_data_modes():
    assert [is_adversarial("C", e, 0) for e in (0, 5)] == [False, False]
    assert [is_adversarial("A", e, 9) for e in (0, 5)] == [True, True]
    assert [is_adversarial("F", e, 2) for e in (0, 1, 2, 3)] == [False, False, True, True]


@pytest.mark.slow
def test_adversarial_schemes_differ_and_reference_takes_two_sgd_steps(synthetic):
    results = {}
    for scheme in ("reference", "madry"):
        state, anchor, steps, data = _setup(synthetic, scheme=scheme)
        idx = jnp.arange(BATCH)
        new, _ = steps[True](state, anchor, *data, idx)
        results[scheme] = new
        assert int(new.step) == 1
    assert not _equal(results["reference"].params, results["madry"].params)
    # Momentum after two SGD steps is m2 = 0.9 g1 + g2, after one it is g1: the reference's
    # trace differs from the clean step's alone.
    state, anchor, steps, data = _setup(synthetic)
    clean, _ = steps[False](state, anchor, *data, jnp.arange(BATCH))
    assert not _equal(clean.opt_state, results["reference"].opt_state)


def test_divergence_names_epoch_and_step(synthetic):
    model, params, bs = tiny_model("mlp")
    apply = make_apply_fn(model, "standard", "update")
    step = make_step(apply, momentum=0.9, lr=1e6)
    state = init_state(params, bs, 0.9, jax.random.PRNGKey(0))
    data = (jnp.asarray(synthetic.x_train), jnp.asarray(synthetic.y_train))
    with pytest.raises(Divergence, match=r"epoch \d+ \(step \d+\)"):
        run_phase(state, None, {False: step}, *data, mode="C", flip_epoch=0, batch_size=BATCH,
                  total_steps=40)


def test_run_phase_donates_its_own_states_only_and_compiles_each_step_once(synthetic, tmp_path):
    """run_phase donates each step's input state to its output (a state handed to
    on_checkpoint is gone once the phase goes on) but never the caller's, which phase 2 keeps
    as its anchor; the result is the non-donating steps' bit for bit. A state partly restored
    from a checkpoint (committed to its device) and partly new, as phase 2 starts from, still
    compiles each step once."""
    model, params, bs = tiny_model("mlp")
    apply = make_apply_fn(model, "centered", "frozen")
    store = CheckpointStore(tmp_path / "ckpt")
    store.save(0, init_state(params, bs, 0.9, jax.random.PRNGKey(0)), {})
    restored, _ = store.restore(0, init_state(params, bs, 0.9, jax.random.PRNGKey(0)))
    anchor = Anchor(restored.params, restored.batch_stats)
    data = (jnp.asarray(synthetic.x_train), jnp.asarray(synthetic.y_train))

    def phase(steps):
        state = init_state(anchor.params, anchor.batch_stats, 0.9, jax.random.PRNGKey(1))
        seen = {}

        def keep(s, step, running):
            seen[step] = s

        out = run_phase(state, anchor, steps, *data, mode="C", flip_epoch=0, batch_size=BATCH,
                        total_steps=8, checkpoint_steps=frozenset({4}), on_checkpoint=keep)
        return state, seen[4], out

    step = make_step(apply, momentum=0.9, lr=0.05)
    caller, at4, donated = phase({False: step})
    assert not any(a.is_deleted() for a in jax.tree.leaves((caller, anchor)))
    assert all(a.is_deleted() for a in jax.tree.leaves(at4))  # went to the step after it
    _, at4_plain, plain = phase({False: step.plain})  # plain functions: nothing donated
    assert not any(a.is_deleted() for a in jax.tree.leaves(at4_plain))
    assert _equal(donated, plain)
    assert step.programs[1]._cache_size() == 1
