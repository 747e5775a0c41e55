"""Helpers and constants shared by several test files (fixtures live in conftest.py): test
files import from here, never from each other."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import jax

from core.config import ExperimentConfig, config_from_dict
from core.models import init_model, make_model
from sweep.layout import StateFileError, TrialState, read_trial_state

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
         "Configuration for experiment", "Wrote the latest version",
         "Failed to fetch metrics")  # Tune's loggers are off: no result.json to fetch


def bulk_sweep(uri: str, trials: int, children: int) -> tuple[str, str]:
    """A sweep's runs written straight into MLflow's SQLite tables (seconds, where the client
    would take an hour): a parent, ``trials`` finished trial runs, and under each ``children``
    evaluated models (seed = trial, code CC, switch epochs 0..children-1) with their
    ``accuracy`` and ``worst_linf``. Returns (experiment id, parent run id)."""
    import uuid
    from pathlib import Path

    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlParam, SqlRun, SqlTag
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking import MlflowClient

    from sweep.mlflow_runs import PARENT_TAG

    client = MlflowClient(uri)
    exp = client.create_experiment("big")
    parent = client.create_run(exp, run_name="sweep", tags={"kind": "sweep"}).info.run_id
    runs, tags, params, metrics = [], [], [], []

    def run(name: str, parent_id: str, run_tags: dict[str, str],
            run_params: dict[str, str] | None = None) -> str:
        rid = uuid.uuid4().hex
        runs.append(dict(run_uuid=rid, name=name, source_type="LOCAL", source_name="",
                         entry_point_name="", user_id="test", status="FINISHED",
                         start_time=len(runs), end_time=len(runs), source_version="",
                         lifecycle_stage="active", artifact_uri="", experiment_id=int(exp)))
        tags.extend(dict(key=k, value=v, run_uuid=rid)
                    for k, v in {PARENT_TAG: parent_id, **run_tags}.items())
        params.extend(dict(key=k, value=v, run_uuid=rid) for k, v in (run_params or {}).items())
        return rid

    for t in range(trials):
        trial = run(f"trial {t}", parent, {"kind": "trial"})
        for c in range(children):
            rid = run(f"CC t={c}", trial, {"kind": "switch_run"},
                      {"seed": str(t), "code": "CC", "dynamics": "centered",
                       "switch_epoch": str(c), "switch_rule": ""})
            metrics.extend(dict(key=k, value=v, timestamp=0, step=0, is_nan=False,
                                run_uuid=rid) for k, v in (("accuracy", 0.5),
                                                           ("worst_linf", c / children)))
    store = SqlAlchemyStore(uri, str(Path(uri.removeprefix("sqlite:///")).parent / "art"))
    with store.ManagedSessionMaker() as session:
        session.bulk_insert_mappings(SqlRun, runs)
        session.bulk_insert_mappings(SqlTag, tags)
        session.bulk_insert_mappings(SqlParam, params)
        session.bulk_insert_mappings(SqlLatestMetric, metrics)
    return exp, parent


def trial_states(out: Path) -> dict[str, TrialState]:
    """Every trial's record under a sweep's output directory, by trial id (those readable:
    a record is replaced atomically, but a trial may not have written one yet)."""
    states = {}
    for directory in sorted(out.glob("trials/*")):
        with contextlib.suppress(StateFileError):
            states[directory.name] = read_trial_state(directory)
    return states


def finished_trials(out: Path) -> list[str]:
    """The trials whose record says they finished (what ``resume`` counts as finished)."""
    return [t for t, state in trial_states(out).items() if state.final is not None]
