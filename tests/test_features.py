"""NTK eigen-features: weights, the ascent on the gradient cosine, the PNG grid."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from core.dynamics import make_apply_fn
from core.features import eigen_features, feature_weights, make_feature_fn, write_grid
from core.ntk import NtkEngine
from tests.helpers import tiny_model


def test_feature_weights():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(8, 8))
    k = g @ g.T
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    w = feature_weights(k, labels, c=1, top=3)
    assert w.shape == (7, 8)
    lam, vecs = np.linalg.eigh(k)
    np.testing.assert_allclose(np.abs(w[0]), np.abs(vecs[:, -1]), atol=1e-5)
    np.testing.assert_allclose(w[1], -w[0])
    y = (labels == 1) - (labels == 1).mean()
    alpha = np.linalg.solve(k, y)
    np.testing.assert_allclose(w[6], alpha / np.linalg.norm(alpha), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 8, 1), (32, 32, 3)])
def test_ascent_raises_the_cosine_and_stays_in_the_box(shape):
    model, params, bs = tiny_model("cnn", shape=shape)
    apply = make_apply_fn(model, "standard", "frozen")
    x = np.random.default_rng(0).uniform(size=(9, *shape)).astype(np.float32)
    labels = np.arange(9) % 3
    kernels = NtkEngine(apply, "classwise")(None, params, bs, x)
    images = eigen_features(apply, params, bs, x, labels, kernels, [0, 2], steps=30, lr=0.01)
    assert set(images) == {0, 2} and images[0].shape == (7, *shape)
    assert images[0].min() >= 0 and images[0].max() <= 1
    # The objective went up from the grey start for the top eigendirection.
    weights = feature_weights(kernels[0], labels, 0)
    start = make_feature_fn(apply, steps=0)(params, bs, x, weights[:1], 0)
    f = lambda p, z: apply(None, p, bs, z, False)[0][:, 0]  # noqa: E731
    v = jax.jit(lambda p, w: jax.vjp(lambda q: f(q, x), p)[1](w)[0])(params, weights[0])
    grad = jax.jit(jax.grad(lambda p, z: f(p, z[None])[0]))  # one program, not op by op

    def cos(img):
        g = grad(params, img)
        flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])  # noqa: E731
        a, b = flat(g), flat(v)
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    assert cos(images[0][0]) > cos(np.asarray(start[0])) + 0.05


def test_write_grid(tmp_path):
    images = {c: np.random.default_rng(c).uniform(size=(7, 8, 8, 1)) for c in (0, 1)}
    path = write_grid(images, tmp_path / "f.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
