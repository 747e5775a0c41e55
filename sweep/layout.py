"""The output directory of a sweep: what lives where, and how to read it back.

Layout under ``<out>`` (the sweep's output directory)::

    sweep.json                       the space, MLflow parent run, Tune experiment (resume)
    trajectories/                    the trajectory store (``core/trajectory_store.py``)
    trials/<trial id>/state.json     the trial's own record (``TrialState``): its sampled
                                     values but the seed, the worker's last stage
                                     (``ntk-sweep status``), and once it ends its final
                                     metrics and MLflow run (finished) or its error (diverged)
    trials/<trial id>/results.json   its config and result rows (the experiment's tables)
    trials/<trial id>/kernels.png    its kernel figure (also in its MLflow run)
    trials/<trial id>/pending_mlflow_writes.json   writes an attempt could not deliver, and
                                     the files they upload (results.csv, summary.md,
                                     kernels.npz: removed once MLflow has them)
    ray/                             Ray Tune's experiment (``NTK_SWEEP_STORAGE`` moves it)
    mlflow.db, mlartifacts/          the local MLflow store (``MLFLOW_TRACKING_URI`` moves it)

Earlier versions kept the trial's record in four files (``variant.json``, ``heartbeat.json``,
``final.json``, ``failed.json``); they are still read, so a sweep resumed across the upgrade
keeps its finished trials.

This module imports neither JAX nor Ray nor MLflow: ``status``, ``report`` and the CLI read
a sweep through it without loading the runner.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.config import RESULT_METRICS, read_prefix


class StateFileError(ValueError):
    """A file the sweep wrote is missing or damaged; the message starts with its path."""


def write_json(path: Path, data: Any) -> None:
    """Writes JSON atomically (a temporary file renamed over ``path``): a reader, or a
    process killed half-way, never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


MAX_STATE_BYTES = 64 * 2**20  # a state file larger than this is not one the sweep wrote


def read_json(path: Path, kind: type | None = dict) -> Any:
    """A JSON state file the sweep wrote; ``StateFileError`` naming the file and what is wrong
    (missing, too large, not UTF-8 text, not JSON, not a ``kind``)."""
    try:
        data = read_prefix(path, MAX_STATE_BYTES)
    except FileNotFoundError:
        raise StateFileError(f"{path}: not found") from None
    except OSError as e:
        raise StateFileError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > MAX_STATE_BYTES:
        raise StateFileError(f"{path}: more than the {MAX_STATE_BYTES} bytes of a state file "
                             "of ntk-sweep")
    try:
        data = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise StateFileError(f"{path}: not text (damaged?)") from None
    except json.JSONDecodeError as e:
        raise StateFileError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise StateFileError(f"{path}: nested too deeply") from None
    if kind is not None and not isinstance(data, kind):
        raise StateFileError(f"{path}: a JSON {type(data).__name__}, not the "
                             f"{kind.__name__} ntk-sweep wrote")
    return data


def read_record(path: Path, keys: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """``read_json`` of a JSON object that must hold ``keys`` with values of those types;
    ``StateFileError`` naming the file and the first key missing or of another type."""
    data = read_json(path)
    _check(path, "", data, keys)
    return data


def _check(path: Path, where: str, data: dict[str, Any],
           keys: dict[str, type | tuple[type, ...]]) -> None:
    for key, kind in keys.items():
        name = f"{where}.{key}" if where else key
        if key not in data:
            raise StateFileError(f"{path}: {name}: missing")
        if not isinstance(data[key], kind):
            kinds = kind if isinstance(kind, tuple) else (kind,)
            raise StateFileError(f"{path}: {name}: a {type(data[key]).__name__}, not a "
                                 + " or ".join("null" if k is type(None) else k.__name__
                                               for k in kinds))


SWEEP_STATE = "sweep.json"


def _local_path(location: str) -> tuple[str, Path | None]:
    """(``sqlite:///`` or "", the file path) of a local location; (location, None) for a
    URI of anything else (``s3://``, ``http://``)."""
    prefix = "sqlite:///" if location.startswith("sqlite:///") else ""
    path = location[len(prefix):]
    return (location, None) if "://" in path else (prefix, Path(path))


def portable(out: Path, location: str) -> str:
    """``location`` (a path, or a ``sqlite:///`` URI) as ``sweep.json`` keeps it: relative to
    ``out`` when inside it, so that a copied or moved output directory reads its own Ray
    storage and MLflow database, never the original's. Other locations stay as they are."""
    prefix, path = _local_path(location)
    if path is None or not path.is_absolute() or not path.is_relative_to(out):
        return location
    return prefix + str(path.relative_to(out))


def resolved(out: Path, location: str) -> str:
    """The inverse of ``portable`` for the output directory ``out`` the state was read from."""
    prefix, path = _local_path(location)
    if path is None or path.is_absolute():
        return location
    return prefix + str(out.absolute() / path)


def ray_storage(out: Path) -> str:
    """Where Ray Tune keeps the sweep's experiment state: ``NTK_SWEEP_STORAGE`` or
    ``<out>/ray``."""
    return os.environ.get("NTK_SWEEP_STORAGE") or str(out / "ray")


def tracking_uri(out: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').absolute()}"


JAX_CACHE_ENV = "NTK_SWEEP_JAX_CACHE"  # a directory, or "off"


def jax_cache_dir(out: Path | None = None) -> Path | None:
    """Where compiled JAX programs are kept between processes (``core.compat.
    use_compilation_cache``): ``NTK_SWEEP_JAX_CACHE`` ("off": nowhere), else a sweep's
    ``<out>/jax-cache`` (its workers, on every node that mounts it, and later sweeps into it
    share it), else the user's ``$XDG_CACHE_HOME/ntk-sweep/jax``. None also when jax's own
    ``JAX_COMPILATION_CACHE_DIR`` is set: that one is used as it is."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    value = os.environ.get(JAX_CACHE_ENV, "")
    if value == "off":
        return None
    if value:
        return Path(value)
    if out is not None:
        return Path(out) / "jax-cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ntk-sweep" / "jax"


def trial_dir(out: Path, trial_id: str) -> Path:
    """``<out>/trials/<trial id>``: the files of one trial."""
    return out / "trials" / trial_id


CONTEXT_KEY = "_ntk_sweep"  # the param-space entry holding what every trial shares
TRIAL_STATE = "trial.json"  # in the trial's Tune checkpoint: its MLflow run id
STATE_FILE = "state.json"  # in <out>/trials/<trial id>/: its TrialState
PENDING_WRITES = "pending_mlflow_writes.json"  # MLflow writes an attempt could not deliver
# The record of earlier versions, a file per part: read, no longer written.
LEGACY_VARIANT, LEGACY_HEARTBEAT = "variant.json", "heartbeat.json"
LEGACY_FINAL, LEGACY_FAILED = "final.json", "failed.json"
HEARTBEAT_KEYS = {"stage": str, "epoch": (int, float), "time": (int, float)}


@dataclass
class TrialState:
    """A trial's own record (``<out>/trials/<trial id>/state.json``), written whole (atomically)
    by the one worker running the trial, at its start, at every heartbeat and at its end.

    Attributes:
      variant: its sampled values but the seed (``format_variant``).
      heartbeat: the worker's PID, node and niceness, the stage and epoch just finished, the
        MLflow writes waiting for the server, and the time (``ntk-sweep status``).
      final: its final metrics (what it reported to Tune last), once it has finished: what
        ``resume`` counts as finished.
      run_id: its MLflow run, once finished.
      error: why it diverged (phase, epoch, step, cause), when it did.
      sweep: the MLflow run of the sweep it belongs to (None in records of versions before
        it): Tune's trial ids are unique within one sweep only, and ``trials/<id>`` is shared
        by every sweep into the same output directory.
    """

    variant: dict[str, Any] = field(default_factory=dict)
    heartbeat: dict[str, Any] | None = None
    final: dict[str, Any] | None = None
    run_id: str | None = None
    error: str | None = None
    sweep: str | None = None

    def foreign(self, sweep: str | None) -> bool:
        """Whether the record is of a sweep other than ``sweep`` (None: no sweep to compare)."""
        return sweep is not None and self.sweep is not None and self.sweep != sweep

    def write(self, directory: Path) -> None:
        write_json(directory / STATE_FILE, asdict(self))


_STATE_FIELDS = {"variant": dict, "heartbeat": (dict, type(None)), "final": (dict, type(None)),
                 "run_id": (str, type(None)), "error": (str, type(None)),
                 "sweep": (str, type(None))}
NEW_STATE_FIELDS = ("sweep",)  # missing from the records of earlier versions: None


def read_trial_state(directory: Path) -> TrialState:
    """The trial's ``TrialState`` (empty if it has none yet), from ``state.json`` or an earlier
    version's files; ``StateFileError`` naming the file and what is wrong."""
    path = directory / STATE_FILE
    if path.is_file():
        data = read_json(path)  # a JSON object
        for key in NEW_STATE_FIELDS:
            data.setdefault(key, None)
        _check(path, "", data, _STATE_FIELDS)
        if data["heartbeat"] is not None:
            _check(path, "heartbeat", data["heartbeat"], HEARTBEAT_KEYS)
        return TrialState(**{k: data[k] for k in _STATE_FIELDS})
    state = TrialState()
    if (directory / LEGACY_VARIANT).is_file():
        state.variant = read_json(directory / LEGACY_VARIANT)
    if (directory / LEGACY_HEARTBEAT).is_file():
        state.heartbeat = read_record(directory / LEGACY_HEARTBEAT, HEARTBEAT_KEYS)
    if (directory / LEGACY_FINAL).is_file():
        record = read_record(directory / LEGACY_FINAL, {"final": dict})
        state.final, state.run_id = record["final"], record.get("run_id")
    if (directory / LEGACY_FAILED).is_file():
        state.error = read_record(directory / LEGACY_FAILED, {"error": str})["error"]
    return state


def trial_finished(directory: Path) -> bool | None:
    """Whether the trial's record says it finished; None if the record is damaged (it settles
    nothing: the summary lists the trial among the failures, naming the file)."""
    try:
        return read_trial_state(directory).final is not None
    except StateFileError:
        return None


def format_variant(values: dict[str, Any]) -> str:
    """``phase1.attack.eps=0.1, phase2.lr=0.01``: a trial's sampled values but the seed."""
    return ", ".join(f"{p}={v:.4g}" if isinstance(v, float) else f"{p}={v}"
                     for p, v in sorted(values.items()) if p != "seeds")


def variant_label(trial_dir: Path) -> str:
    """The ``format_variant`` of the trial whose directory is ``trial_dir`` (StateFileError if
    its record is damaged)."""
    return format_variant(read_trial_state(trial_dir).variant)


RESULT_ROW = {"seed": int, "code": str, "switch_epoch": (int, float), "switch_rule": str,
              "accuracy": (int, float), "robust_linf": (int, float)}  # in every version's rows


def read_results(path: Path) -> dict[str, Any]:
    """A trial's ``results.json`` (its config and result rows), checked: StateFileError naming
    the file and what is wrong. A result metric an older version did not report (e.g.
    ``worst_linf``) reads as NaN (shown as "-"), so a sweep resumed across an upgrade keeps
    its finished trials."""
    data = read_record(path, {"config": dict, "rows": list})
    for i, row in enumerate(data["rows"]):
        if not isinstance(row, dict):
            raise StateFileError(f"{path}: rows[{i}]: not a mapping")
        for key in (*RESULT_ROW, *RESULT_METRICS):
            value = row.get(key) if key in RESULT_ROW else row.setdefault(key, float("nan"))
            if not isinstance(value, RESULT_ROW.get(key, (int, float))) or isinstance(value, bool):
                raise StateFileError(f"{path}: rows[{i}].{key}: missing or not what ntk-sweep "
                                     "wrote")
    return data


def trial_files(out: Path, trials: Collection[str], name: str) -> list[Path]:
    """``out/trials/<id>/<name>`` of the given trials that have that file, by id."""
    paths = (trial_dir(out, t) / name for t in sorted(set(trials)))
    return [p for p in paths if p.is_file()]


def foreign_trial(directory: Path, state: TrialState) -> str:
    """The error of a trial whose directory holds another sweep's trial of the same id."""
    return (f"{directory / STATE_FILE} is trial {directory.name} of another sweep (MLflow run "
            f"{state.sweep}; {format_variant(state.variant) or 'no sampled values'}): two "
            "sweeps into this output directory drew the same Tune trial id. That trial's "
            "files were neither read nor changed; run this sweep into another --out")


def own_trials(out: Path, trials: Collection[str], sweep: str | None) -> list[str]:
    """The given trials but those whose directory holds another sweep's trial (a damaged
    record counts as the sweep's own: ``trial_outcomes`` lists it as damaged)."""
    def foreign(trial_id: str) -> bool:
        try:
            return read_trial_state(trial_dir(out, trial_id)).foreign(sweep)
        except StateFileError:
            return False
    return [t for t in trials if not foreign(t)]


def sweep_run(out: Path) -> str | None:
    """The MLflow run of the sweep last started in ``out`` (``sweep.json``), None if unknown."""
    try:
        run = read_json(out / SWEEP_STATE).get("parent_run")
    except StateFileError:
        return None
    return run if isinstance(run, str) else None


def trial_outcomes(out: Path, trials: Collection[str], sweep: str | None = None
                   ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """What the given trials left: every result row of those that finished (with its
    ``variant``), and the failures: trials that ended as errors of their own (divergence:
    the error names phase, epoch, step and cause), trials whose files are damaged (named
    with what is wrong; never left out of a summary silently) and, given the ``sweep`` (its
    MLflow run), trials whose directory holds another sweep's trial (its rows never read as
    this sweep's; ``"foreign"``: that sweep's run). Unfinished trials give none."""
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    for trial_id in sorted(set(trials)):
        directory = trial_dir(out, trial_id)
        results = directory / "results.json"
        try:
            state = read_trial_state(directory)
            variant = format_variant(state.variant)
            if state.foreign(sweep):
                failed.append({"trial": trial_id, "variant": "", "foreign": state.sweep or "",
                               "error": foreign_trial(directory, state)})
            elif results.is_file():
                rows += [{**r, "variant": variant} for r in read_results(results)["rows"]]
            elif state.error is not None:
                failed.append({"trial": trial_id, "variant": variant, "error": state.error})
        except StateFileError as e:
            failed.append({"trial": trial_id, "variant": "", "error": f"damaged file: {e}"})
    return rows, failed


def _no_result_files(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to fetch metrics")


def quiet_tune_analysis() -> None:
    """Tune's CSV/JSON loggers are off (issue 15), so its experiment analysis finds no
    per-trial result files and warns, once per trial, that it "failed to fetch metrics": read
    as a failure, it is none (nothing here uses those metrics). Drops only that message, for
    the runner's result grid and for ``status`` (idempotent)."""
    logging.getLogger("ray.tune.analysis.experiment_analysis").addFilter(_no_result_files)
