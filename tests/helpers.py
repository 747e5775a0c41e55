"""Helpers and constants shared by several test files (fixtures live in conftest.py): test
files import from here, never from each other."""

from __future__ import annotations

from typing import Any

import jax

from core.config import ExperimentConfig, config_from_dict
from core.models import init_model, make_model

TINY_MODELS = {
    "mlp": dict(widths=(16, 16)),
    "cnn": dict(width=4, batchnorm=True),
    "resnet18": dict(width=2),
}


def tiny_model(name: str, num_classes: int = 3, shape=(8, 8, 1), seed: int = 0):
    """(model, params, batch_stats) of a tiny ``name`` model."""
    model = make_model(name, num_classes, **TINY_MODELS[name])
    params, batch_stats = init_model(model, jax.random.PRNGKey(seed), shape)
    return model, params, batch_stats


# A tiny experiment (synthetic data, an MLP of width 8, two phase-1 epochs of 4 steps).
BASE: dict[str, Any] = {
    "dataset": {"name": "synthetic", "synthetic": {"n_train": 64, "n_test": 16, "num_classes": 3}},
    "model": {"name": "mlp", "widths": [8]},
    "codes": ["CC"],
    "phase1": {"epochs": 2, "lr": 0.05, "batch_size": 16, "lr_decay_epochs": []},
    "phase2": {"epochs": 1, "batch_size": 16},
    "eval": {"linf": {"eps": 0.1, "iters": 2}, "l2": None, "transfer": False},
}


def tiny_cfg(**changes: Any) -> ExperimentConfig:
    """The config of ``BASE`` with top-level keys replaced by ``changes``."""
    return config_from_dict({**BASE, **changes})


# A tiny sweep: 2 trials (seeds) of the tiny experiment with two codes and a switch rule.
SWEEP: dict[str, Any] = {
    "name": "tiny-sweep",
    "dataset": {"name": "synthetic", "synthetic": {"n_train": 64, "n_test": 16, "num_classes": 3}},
    "model": {"name": "mlp", "widths": [8]},
    "codes": ["CC", "AC"],
    "switch_points": [0, 1, 2],
    # Always true (distances are at most 2): switches at the first checkpoint after init.
    "switch_rule": {"measure": "to_previous", "below": 10, "checkpoints": 1},
    "fractional_checkpoints": [],
    "seeds": [0, 1],
    "phase1": {"epochs": 2, "lr": 0.05, "batch_size": 16, "lr_decay_epochs": [],
               "attack": {"eps": 0.1, "iters": 2}},
    "phase2": {"epochs": 1, "batch_size": 16, "lr": {"grid": [0.01]}},
    "eval": {"linf": {"eps": 0.1, "iters": 2}, "l2": None, "transfer": False},
    "kernel": {"probe_size": 12},
    "sweep": {"resources": {"cpus": 1}},
}

# What a sweep's driver must not print: its libraries' chatter (JAX's fork warning, MLflow's
# database migrations, Tune's configuration table and TensorBoard hint, Tune's state writes).
QUIET = ("os.fork() was called", "Creating initial MLflow database tables", "TensorBoard",
         "Configuration for experiment", "Wrote the latest version")
