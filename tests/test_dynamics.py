"""The linearized and centered models against the network they linearize."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.compat import enable_x64
from core.dynamics import Anchor, make_apply_fn
from tests.helpers import tiny_model

pytestmark = pytest.mark.smoke  # CI also runs these on Python 3.13


def _perturb(tree, key, scale):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    pairs = zip(keys, leaves, strict=True)
    noise = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in pairs]
    return jax.tree.unflatten(treedef, noise)


def _f64(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


@pytest.mark.parametrize("name", ["mlp", *(pytest.param(name, marks=pytest.mark.slow)
                                           for name in ("cnn", "resnet18"))])
def test_linearized_matches_network_at_switch_and_to_first_order(name):
    with enable_x64():
        model, params, bs = tiny_model(name)
        params, bs = _f64(params), _f64(bs)
        # A generic anchor: zero-initialised logits would make some terms vanish.
        params = jax.tree.map(jnp.add, params, _perturb(params, jax.random.PRNGKey(1), 0.1))
        anchor = Anchor(params, bs)
        x = jax.random.uniform(jax.random.PRNGKey(2), (5, 8, 8, 1), jnp.float64)
        net = make_apply_fn(model, "standard", "frozen")
        lin = make_apply_fn(model, "linearized", "frozen")
        cen = make_apply_fn(model, "centered", "frozen")

        f0 = net(None, params, bs, x, False)[0]
        np.testing.assert_allclose(lin(anchor, params, bs, x, False)[0], f0, rtol=1e-12, atol=1e-12)
        assert np.all(np.asarray(cen(anchor, params, bs, x, False)[0]) == 0.0)

        direction = _perturb(params, jax.random.PRNGKey(3), 1.0)
        errors = []
        for h in (4e-6, 2e-6, 1e-6):
            p = jax.tree.map(lambda a, d, h=h: a + h * d, params, direction)
            diff = net(None, p, bs, x, False)[0] - lin(anchor, p, bs, x, False)[0]
            errors.append(float(jnp.linalg.norm(diff)))
            # Centered = linearized minus the switch-point output, at any parameters.
            np.testing.assert_allclose(
                cen(anchor, p, bs, x, False)[0], lin(anchor, p, bs, x, False)[0] - f0,
                rtol=1e-9, atol=1e-12,
            )
        ratios = [errors[0] / errors[1], errors[1] / errors[2]]
        assert errors[0] > 0
        # Error O(h^2): halving h divides it by 4.
        for r in ratios:
            assert 3.5 < r < 4.5, (errors, ratios)


@pytest.mark.slow
def test_frozen_batchnorm_ignores_the_batch_and_batch_mode_does_not():
    model, params, bs = tiny_model("cnn")
    anchor = Anchor(params, bs)
    x = jax.random.uniform(jax.random.PRNGKey(0), (6, 8, 8, 1))
    frozen = make_apply_fn(model, "linearized", "frozen")
    batch = make_apply_fn(model, "linearized", "batch")
    # Frozen: a sample's output does not depend on the rest of the batch, train or not.
    full = frozen(anchor, params, bs, x, True)[0]
    np.testing.assert_allclose(frozen(anchor, params, bs, x[:2], True)[0], full[:2], atol=1e-6)
    # Batch statistics: it does, and the running statistics are left as they were.
    out, new_bs = batch(anchor, params, bs, x, True)
    assert not np.allclose(batch(anchor, params, bs, x[:2], True)[0], out[:2], atol=1e-4)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), new_bs, bs))


def test_standard_update_mode_moves_running_statistics():
    model, params, bs = tiny_model("cnn")
    apply = make_apply_fn(model, "standard", "update")
    x = jax.random.uniform(jax.random.PRNGKey(0), (6, 8, 8, 1))
    _, new_bs = apply(None, params, bs, x, True)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_bs, bs))
    assert any(moved)
    with pytest.raises(ValueError, match="update"):
        make_apply_fn(model, "centered", "update")


def test_the_centered_model_jumps_where_the_network_is_continuous():
    """Why white-box attacks overstate the robustness of tangent-space models (README, "Robust
    accuracy of tangent-space models"). Along a line x(s) = x0 + s d the ReLU network is
    continuous: its largest logit step between grid points shrinks with the grid spacing. The
    centered model J_{theta_t}(x) (theta - theta_t) is not: its Jacobian holds the ReLU masks,
    which switch as x moves, so it jumps, and its largest step stays as the grid gets finer.
    Input gradients see none of the jumps."""
    with enable_x64():
        model, params, bs = tiny_model("mlp")
        params, bs = _f64(params), _f64(bs)
        anchor = Anchor(params, bs)
        moved = jax.tree.map(jnp.add, params, _perturb(params, jax.random.PRNGKey(1), 0.3))
        x0 = jax.random.uniform(jax.random.PRNGKey(2), (8, 8, 1), jnp.float64)
        d = jax.random.normal(jax.random.PRNGKey(3), (8, 8, 1), jnp.float64)

        def largest_step(dynamics: str, n: int) -> float:
            apply = make_apply_fn(model, dynamics, "frozen")
            s = jnp.linspace(0.0, 1.0, n)
            f = apply(anchor, moved, bs, x0[None] + s[:, None, None, None] * d[None], False)[0]
            return float(jnp.abs(jnp.diff(f, axis=0)).max())

        net = [largest_step("standard", n) for n in (1001, 16001)]
        centered = [largest_step("centered", n) for n in (1001, 16001)]
    assert net[1] < net[0] / 8, net  # ~1/16: continuous, steps shrink with the spacing
    assert centered[1] > centered[0] / 2, centered  # a jump does not shrink
    assert centered[1] > 10 * net[1], (net, centered)
