"""Shared fixtures: tiny models and data so every test runs in seconds on 2 CPU cores."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

from core.data import load_synthetic  # noqa: E402
from core.models import init_model, make_model  # noqa: E402

TINY_MODELS = {
    "mlp": dict(widths=(16, 16)),
    "cnn": dict(width=4, batchnorm=True),
    "resnet18": dict(width=2),
}


@pytest.fixture(scope="session")
def synthetic():
    return load_synthetic(seed=0, n_train=64, n_test=32, shape=(8, 8, 1), num_classes=3)


def tiny_model(name: str, num_classes: int = 3, shape=(8, 8, 1), seed: int = 0):
    """(model, params, batch_stats) of a tiny ``name`` model."""
    model = make_model(name, num_classes, **TINY_MODELS[name])
    params, batch_stats = init_model(model, jax.random.PRNGKey(seed), shape)
    return model, params, batch_stats
