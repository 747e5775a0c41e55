"""Model structure: the reference ResNet-18 details, explicit BatchNorm state, shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.models import init_model, make_model
from tests.helpers import TINY_MODELS, tiny_model


# ResNet-18's logits: at 32x32x3 in test_resnet18_reference_details, at 8x8x1 in the dynamics
# and NTK tests (each a compilation of 3-6 s here).
@pytest.mark.parametrize("name", [name for name in TINY_MODELS if name != "resnet18"])
@pytest.mark.parametrize("shape", [(8, 8, 1), (32, 32, 3)])
def test_logit_shapes(name, shape):
    model, params, bs = tiny_model(name, num_classes=5, shape=shape)
    x = jnp.zeros((3, *shape))
    assert model.apply({"params": params, "batch_stats": bs}, x, train=False).shape == (3, 5)


@pytest.mark.slow
def test_resnet18_reference_details():
    model = make_model("resnet18", 10, width=4)
    params, bs = init_model(model, jax.random.PRNGKey(0), (32, 32, 3))
    # 3x3 stride-1 stem, no max-pool: the first stage still sees 32x32 feature maps.
    assert params["Conv_0"]["kernel"].shape == (3, 3, 3, 4)
    _, state = model.apply({"params": params, "batch_stats": bs}, jnp.ones((2, 32, 32, 3)),
                           train=True, mutable=["batch_stats", "intermediates"])
    blocks = [k for k in params if k.startswith("BasicBlock")]
    assert len(blocks) == 8  # four stages of two basic blocks
    # Zero-initialised logits layer: the network outputs exactly 0 at initialisation.
    assert not np.any(np.asarray(params["Dense_0"]["kernel"]))
    out = model.apply({"params": params, "batch_stats": bs}, jnp.ones((2, 32, 32, 3)))
    assert not np.any(np.asarray(out))
    # BatchNorm momentum 0.9: running mean = 0.9 * 0 + 0.1 * batch mean.
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3))
    _, upd = model.apply({"params": params, "batch_stats": bs}, x, train=True,
                         mutable=["batch_stats"])
    stem = jax.lax.conv_general_dilated(
        x, params["Conv_0"]["kernel"], (1, 1), [(1, 1), (1, 1)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(upd["batch_stats"]["BatchNorm_0"]["mean"],
                               0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_models_without_batchnorm_have_empty_state():
    for name in ("mlp",):
        _, _, bs = tiny_model(name)
        assert bs == {}
    _, _, bs = tiny_model("cnn")
    assert set(bs) == {"BatchNorm_0", "BatchNorm_1", "BatchNorm_2"}


def test_paper_mlp_widths():
    model = make_model("mlp", 10, widths=(2048, 2048))
    params, _ = init_model(model, jax.random.PRNGKey(0), (8, 8, 1))
    assert params["Dense_1"]["kernel"].shape == (2048, 2048)
    with pytest.raises(ValueError, match="unknown model"):
        make_model("vgg", 10)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_jitted_initialisation_gives_the_bits_of_eager_flax_init(name):
    """init_model is one jitted program (fewer programs for a new process to lower and load)
    and must give exactly what flax's eager ``init`` gives: runs stay reproducible across it."""
    model = make_model(name, 3, **TINY_MODELS[name])
    key = jax.random.PRNGKey(7)
    params, stats = init_model(model, key, (8, 8, 1))
    eager = model.init(key, jnp.zeros((1, 8, 8, 1), jnp.float32), train=False)
    for got, want in ((params, eager["params"]), (stats, eager.get("batch_stats", {}))):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
