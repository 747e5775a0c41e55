"""The MLflow run hierarchy of a sweep: kinds, names, params and the step convention, in one
place, so that every question a user asks is a standard MLflow operation (runs table sort and
filter, compare view, chart overlay, ``mlflow.search_runs``).

One experiment per sweep name (opened in MLflow's model-training view)::

    <name> sweep                      kind=sweep: summary table, plots, the sweep file and the
    │                                 resolved base config as artifacts; claim tags; distances
    │                                 between trajectories (``kernel/cross/...``)
    └── trial <variant> seed <s>      kind=trial: the trial's config as params, its means
        ├── trajectory A seed 0       kind=trajectory: phase 1 of one data mode and seed:
        │                             ``train_loss``, ``train_accuracy``, ``epoch``, every kernel
        │                             measure (``alignment``, ``to_init``, ...) as plain names
        └── AC t=10 seed 0            kind=switch_run (or network for ``A-``): one evaluated
                                      model: the result metrics, ``switch_epoch`` as a number,
                                      and its phase-2 ``train_loss``, ``train_accuracy`` and
                                      ``epoch`` curves

Params: every run below the sweep carries its config flattened to dotted keys
(``phase1.attack.eps``, ``phase2.lr``, ``model.width``, ... the swept variables among them),
trajectory runs add ``data_mode``, ``seed`` and ``trajectory_id``, model runs ``code``,
``phase1_mode``, ``phase2_mode``, ``switch_epoch``, ``switch_rule``, ``dynamics``, ``seed``
and ``trajectory_id``. So ``params.code = 'AC' and params.switch_epoch = '10'`` finds the AC
models switched at epoch 10, and selecting trajectory runs overlays C against A, or seed
against seed, in one chart.

Steps: the training step (minibatch) of the run's phase. Epoch-end metrics are logged at
``epoch x steps_per_epoch``, kernel measures at their checkpoint's step, and every curve also
logs ``epoch`` at the same steps (MLflow's charts can use it as the x axis).
"""

from __future__ import annotations

import json
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

from core.config import NETWORK, ExperimentConfig, is_network

PARENT_TAG = "mlflow.parentRunId"  # MLflow's nesting of runs
KIND = "kind"  # the tag naming a run's kind
VARIANT_TAG = "variant"  # a trial's sampled values but the seed (``format_variant``)
SWEEP, TRIAL, TRAJECTORY, SWITCH_RUN, NETWORK_RUN = (
    "sweep", "trial", "trajectory", "switch_run", "network")
MODEL_KINDS = (SWITCH_RUN, NETWORK_RUN)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # not the GenAI view


def flat_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The config as dotted params (lists as JSON), but ``seeds``: a run has one ``seed``."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = value if isinstance(value, str) else json.dumps(value)

    walk("", {k: v for k, v in cfg.model_dump(mode="json").items() if k != "seeds"})
    return out


def trial_name(variant: str, seed: int) -> str:
    return f"trial {variant} seed {seed}" if variant else f"trial seed {seed}"


def trajectory_name(mode: str, seed: int) -> str:
    return f"trajectory {mode} seed {seed}"


def trajectory_params(cfg: ExperimentConfig, mode: str, seed: int, tid: str) -> dict[str, str]:
    return {**flat_params(cfg), "data_mode": mode, "seed": str(seed), "trajectory_id": tid}


def model_name(row: dict[str, Any]) -> str:
    """``AC t=10 seed 1`` (with the switch rule's label when a rule chose the epoch)."""
    rule = f" ({row['switch_rule']})" if row["switch_rule"] else ""
    return f"{row['code']} t={row['switch_epoch']:g}{rule} seed {row['seed']}"


def model_params(cfg: ExperimentConfig, row: dict[str, Any], tid: str) -> dict[str, str]:
    code = row["code"]
    return {**flat_params(cfg), "code": code, "phase1_mode": code[0],
            "phase2_mode": NETWORK if is_network(code) else code[1:],
            "switch_epoch": f"{row['switch_epoch']:g}", "switch_rule": row["switch_rule"],
            "dynamics": row["dynamics"], "seed": str(row["seed"]), "trajectory_id": tid}


def model_kind(code: str) -> str:
    return NETWORK_RUN if is_network(code) else SWITCH_RUN


def train_metrics(epoch_metrics: dict[str, float]) -> dict[str, float]:
    """An epoch's mean training loss and accuracy as ``train_loss``/``train_accuracy``:
    ``accuracy`` is a model's clean test accuracy, and in one run the latest step of a name
    is what MLflow's tables show."""
    return {"train_loss": epoch_metrics["loss"], "train_accuracy": epoch_metrics["accuracy"]}


@cache
def provenance() -> dict[str, str]:
    """Tags every run carries: the package version and, when the code is a git checkout, its
    commit (``mlflow.source.git.commit``, which MLflow's UI shows) and whether it was dirty."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tags = {"ntk_sweep.version": version("ntk-sweep")}
    except PackageNotFoundError:
        tags = {"ntk_sweep.version": "unknown"}
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], text=True,
                                capture_output=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], text=True, capture_output=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return tags
    return {**tags, "mlflow.source.git.commit": commit, "ntk_sweep.git_dirty": str(bool(dirty))}
