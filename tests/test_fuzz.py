"""Fuzz: bad configs, ``--set`` overrides and damaged state files end in exit 2 with a message
that names the offending field or file (not only "no traceback").

Each generated case is wrong by construction (a value outside what its field accepts, a key
no model has, a truncated or retyped state file), so every case must be refused and the
assertion can demand the name. About 280 cases a run, derandomized (the same cases in CI every
time); ``pytest tests/test_fuzz.py --hypothesis-seed=N`` draws other ones (tests/conftest.py).
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from core.config import MAX_SCALAR_CHARS, RESULT_METRICS, ExperimentConfig
from sweep.cli import main
from sweep.layout import (
    LEGACY_FAILED,
    LEGACY_VARIANT,
    RESULT_ROW,
    STATE_FILE,
    trial_outcomes,
)

BASE = {
    "name": "fuzz",
    "seeds": [0],
    "dataset": {"name": "synthetic", "synthetic": {"n_train": 64, "n_test": 16, "num_classes": 3}},
    "model": {"name": "mlp", "widths": [8]},
    "codes": ["CC", "AC"],
    "switch_points": [0, 1],
    "phase1": {"epochs": 2, "lr": 0.05, "batch_size": 16, "lr_decay_epochs": [],
               "attack": {"eps": 0.1, "iters": 2}},
    "phase2": {"epochs": 1, "batch_size": 16},
    "eval": {"linf": {"eps": 0.1, "iters": 2}, "l2": None, "max_test": 16},
    "kernel": {"probe_size": 12},
}

# Numeric fields: every one refuses negatives, non-finite numbers, booleans, text and mappings.
NUMBERS = ["phase1.lr", "phase1.momentum", "phase1.batch_size", "phase1.epochs",
           "phase1.attack.eps", "phase1.attack.iters", "phase1.attack.restarts",
           "phase1.lr_decay_factor", "phase1.flip_epoch", "phase2.lr", "phase2.epochs",
           "phase2.batch_size", "eval.batch_size", "eval.max_test", "eval.linf.iters",
           "eval.margin_restarts", "eval.masking_threshold",
           "eval.linf.eps", "kernel.probe_size", "kernel.probe_seed", "kernel.memory_budget_gb",
           "kernel.storage_budget_gb", "kernel.logit", "kernel.block_size",
           "dataset.synthetic.n_train", "dataset.synthetic.num_classes"]
LISTS = ["seeds", "switch_points", "fractional_checkpoints", "model.widths",
         "phase1.lr_decay_epochs"]  # of numbers: one bad element
CHOICES = {"model.name": ["mlp", "cnn", "resnet18"],
           "dataset.name": ["digits", "cifar10", "cifar100", "synthetic"],
           "phase2.dynamics": ["centered", "linearized", "standard"],
           "phase2.bn": ["frozen", "batch"],
           "kernel.output": ["logit", "classwise", "trace", "full"],
           "kernel.dtype": ["float32", "float64"], "phase1.attack.norm": ["linf", "l2"],
           "phase1.attack.loss": ["ce", "margin"], "phase1.adv_scheme": ["reference", "madry"]}
MAPPINGS = ["", "dataset", "model", "phase1", "phase1.attack", "phase2", "eval", "eval.linf",
            "kernel"]

bad_number = st.one_of(
    st.integers(max_value=-1), st.floats(max_value=-1e-6, allow_infinity=False),
    st.sampled_from([math.nan, math.inf, -math.inf, True, False]),
    st.text(min_size=1, max_size=6).filter(lambda t: not _is_number(t)),
    st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2),
    st.integers(10 ** (MAX_SCALAR_CHARS + 1), 10 ** (MAX_SCALAR_CHARS + 50)),  # too long to read
)
bad_name = st.one_of(st.just(""), st.text(min_size=101, max_size=120),
                     st.builds(lambda a, b: f"{a}/{b}", st.text(max_size=5), st.text(max_size=5)),
                     st.builds(lambda a: f".{a}", st.text(max_size=5)), st.integers())
unknown_key = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)


def _is_number(text: str) -> bool:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(value, int | float) or value is None


def _choice_case(path: str) -> st.SearchStrategy:
    return st.one_of(st.text(max_size=10).filter(lambda t, ok=CHOICES[path]: t not in ok),
                     st.integers(), st.lists(st.sampled_from(CHOICES[path]), min_size=1))


# (dotted path, value): a value its field refuses, and the name the message must contain.
bad_fields = st.one_of(
    st.tuples(st.sampled_from(NUMBERS), bad_number),
    st.tuples(st.sampled_from(LISTS), bad_number.map(lambda v: [v])),
    st.sampled_from(sorted(CHOICES)).flatmap(lambda p: st.tuples(st.just(p), _choice_case(p))),
    st.tuples(st.just("name"), bad_name),
)


def _set(config: dict, path: str, value) -> dict:
    out = copy.deepcopy(config)
    *parents, leaf = path.split(".")
    node = out
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return out


def _dump(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _refused(capsys, argv: list[str], name: str) -> None:
    """``ntk-sweep argv`` exits 2 with a short message naming ``name`` (a dotted field path,
    followed by its message, a sub-field or index, or a file)."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err[-500:])
    assert err.startswith("ntk-sweep: error:") and "Traceback" not in err
    assert re.search(re.escape(name) + r"[:.\['\s]", err), (name, err[-800:])
    assert len(err) < 20_000  # values are echoed cut short


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))


@fuzz(100)
@given(case=bad_fields)
def test_bad_config_values_are_refused_naming_the_field(tmp_path_factory, capsys, case):
    path, value = case
    file = tmp_path_factory.mktemp("cfg") / "c.yaml"
    file.write_text(yaml.safe_dump(_set(BASE, path, value), width=10**6))
    _refused(capsys, ["validate", str(file)], path)


def _fields_at(where: str) -> set[str]:
    """The keys the config accepts in the mapping at dotted path ``where``."""
    model: type[BaseModel] = ExperimentConfig
    for part in where.split(".") if where else []:
        ann = model.model_fields[part].annotation
        model = next(c for c in (ann, *getattr(ann, "__args__", ()))
                     if isinstance(c, type) and issubclass(c, BaseModel))
    return set(model.model_fields)


@fuzz(40)
@given(where=st.sampled_from(MAPPINGS), key=unknown_key)
def test_unknown_keys_are_refused_naming_them(tmp_path_factory, capsys, where, key):
    if key in _fields_at(where) or key == "sweep":  # known (or a sweep section at the top)
        return
    path = f"{where}.{key}" if where else key
    file = tmp_path_factory.mktemp("cfg") / "c.yaml"
    file.write_text(yaml.safe_dump(_set(BASE, path, 1)))
    _refused(capsys, ["validate", str(file)], f"{path}: unknown key")


@fuzz(60)
@given(case=bad_fields, how=st.sampled_from(["value", "no-equals", "deep-key"]))
def test_bad_overrides_are_refused_naming_the_key(tmp_path_factory, capsys, case, how):
    path, value = case
    file = tmp_path_factory.mktemp("cfg") / "c.yaml"
    file.write_text(yaml.safe_dump(BASE))
    item = {"value": f"{path}={_dump(value)}", "no-equals": path,
            "deep-key": ".".join([path] * 5) + "=1"}[how]
    _refused(capsys, ["validate", str(file), "--set", item], path)


def _sweep_dir(root: Path) -> tuple[Path, dict]:
    out = root / "out"
    out.mkdir()
    state = {"name": "fuzz", "space": {**BASE, "sweep": {"num_samples": 1}},
             "storage": str(out / "ray"), "tracking_uri": f"sqlite:///{out / 'mlflow.db'}",
             "experiment_id": "1", "parent_run": "0" * 32}
    return out, state


STATE_TYPES = {"name": str, "space": dict, "storage": str, "tracking_uri": str,
               "experiment_id": str, "parent_run": str}
wrong_type = {str: st.one_of(st.integers(), st.lists(st.integers(), max_size=2), st.none()),
              dict: st.one_of(st.text(max_size=4), st.lists(st.integers(), max_size=2))}
damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 0.999)),
    st.tuples(st.just("garble"), st.floats(0, 1)),
    st.tuples(st.just("drop"), st.sampled_from(sorted(STATE_TYPES))),
    st.sampled_from(sorted(STATE_TYPES)).flatmap(
        lambda k: st.tuples(st.just(f"retype:{k}"), wrong_type[STATE_TYPES[k]])),
    st.tuples(st.just("not-a-mapping"), st.one_of(st.lists(st.integers(), max_size=3),
                                                  st.integers(), st.text(max_size=5))),
    st.tuples(st.just("space"), bad_fields),
)


def _damaged(text: str, state: dict, how: str, arg) -> bytes:
    data = text.encode()
    if how == "truncate":  # always before the closing brace: never valid JSON
        return data[:int(arg * (len(data) - 1))]
    if how == "garble":  # a byte that is never UTF-8
        at = int(arg * len(data))
        return data[:at] + b"\xff" + data[at:]
    if how == "drop":
        return json.dumps({k: v for k, v in state.items() if k != arg}).encode()
    if how.startswith("retype:"):
        return json.dumps({**state, how.split(":", 1)[1]: arg}).encode()
    if how == "not-a-mapping":
        return json.dumps(arg).encode()
    path, value = arg  # a stored space no longer valid
    return json.dumps({**state, "space": _set(state["space"], path, value)}).encode()


@fuzz(60)
@given(how=damage, command=st.sampled_from(["status", "resume", "report"]))
def test_damaged_sweep_state_is_refused_naming_the_file(tmp_path_factory, capsys, how, command):
    out, state = _sweep_dir(tmp_path_factory.mktemp("sweep"))
    (out / "sweep.json").write_bytes(_damaged(json.dumps(state), state, *how))
    _refused(capsys, [command, str(out)], str(out / "sweep.json"))


ROW = {"seed": 0, "code": "CC", "switch_epoch": 1.0, "switch_rule": "",
       **dict.fromkeys(RESULT_METRICS, 0.25), "transfer_linf": math.nan}
STATE = {"variant": {"phase2.lr": 0.01}, "heartbeat": {"stage": "phase1", "epoch": 1, "time": 1.0},
         "final": None, "run_id": None, "error": None}
TRIAL_FILES = {"results.json": {"config": BASE, "rows": [ROW]}, STATE_FILE: STATE,
               LEGACY_FAILED: {"error": "x"}, LEGACY_VARIANT: {"phase2.lr": 0.01}}


@fuzz(40)
@given(name=st.sampled_from(sorted(TRIAL_FILES)), how=st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 0.999)),
    st.tuples(st.just("garble"), st.floats(0, 1)),
    st.tuples(st.just("not-a-mapping"), st.lists(st.integers(), max_size=3)),
    st.tuples(st.just("row"), st.sampled_from(sorted(RESULT_ROW)))))
def test_damaged_trial_files_are_failures_naming_the_file(tmp_path_factory, name, how):
    """A trial whose files are damaged is listed among the failures of the sweep's summary,
    with the file and what is wrong, never left out of the table silently."""
    out = tmp_path_factory.mktemp("sweep")
    trial = out / "trials" / "t_00000"
    trial.mkdir(parents=True)
    kind, arg = how
    name = "results.json" if kind == "row" else name
    # A finished trial (results) or a diverged one (its error), with its sampled values: in
    # its record, or in the files of an earlier version (a sweep resumed across the upgrade).
    if name in (LEGACY_FAILED, LEGACY_VARIANT):
        files = {LEGACY_VARIANT: TRIAL_FILES[LEGACY_VARIANT], LEGACY_FAILED: {"error": "x"}}
    else:
        files = {STATE_FILE: {**STATE, "error": "x"}, "results.json": TRIAL_FILES["results.json"]}
    for file, content in files.items():
        (trial / file).write_text(json.dumps(content))
    if kind == "row":  # a result row without one of its fields
        row = {k: v for k, v in ROW.items() if k != arg}
        data = json.dumps({"config": BASE, "rows": [row]}).encode()
    else:
        data = _damaged(json.dumps(files[name]), files[name], kind, arg)
    (trial / name).write_bytes(data)
    rows, failed = trial_outcomes(out, ["t_00000"])
    assert not rows and len(failed) == 1
    assert str(trial / name) in failed[0]["error"], failed


def test_result_rows_of_an_older_version_read_with_nan_for_new_metrics(tmp_path):
    """A sweep resumed across an upgrade keeps its finished trials: a row without a metric an
    older version did not report reads as NaN, not as a damaged file."""
    trial = tmp_path / "trials" / "t_00000"
    trial.mkdir(parents=True)
    old = {k: v for k, v in ROW.items() if k not in ("worst_linf", "robust_margin")}
    (trial / "results.json").write_text(json.dumps({"config": BASE, "rows": [old]}))
    rows, failed = trial_outcomes(tmp_path, ["t_00000"])
    assert not failed and math.isnan(rows[0]["worst_linf"]) and rows[0]["accuracy"] == 0.25


@pytest.mark.parametrize("change, named", [
    ({"variant": [1]}, "variant: a list, not a dict"),
    ({"heartbeat": {"stage": 1, "epoch": 1, "time": 1.0}}, "heartbeat.stage: a int, not a str"),
    ({"heartbeat": {"stage": "phase1", "time": 1.0}}, "heartbeat.epoch: missing"),
    ({"final": "done"}, "final: a str, not a dict or null"),
    ({"error": 5}, "error: a int, not a str or null"),
    ({"sweep": 7}, "sweep: a int, not a str or null"),
    ({"final": ...}, "final: missing")])
def test_a_damaged_trial_record_is_a_failure_naming_the_field(tmp_path, change, named):
    """Every field of a trial's record (state.json) is checked: a damaged one makes the trial
    a failure of the summary and ``damaged`` in status, naming the file and the field."""
    from sweep.review import _trial_files

    trial = tmp_path / "trials" / "t_00000"
    trial.mkdir(parents=True)
    record = {k: v for k, v in {**STATE, **change}.items() if v is not ...}
    (trial / STATE_FILE).write_text(json.dumps(record))
    (trial / "results.json").write_text(json.dumps({"config": BASE, "rows": [ROW]}))
    rows, failed = trial_outcomes(tmp_path, ["t_00000"])
    assert not rows and f"{trial / STATE_FILE}: {named}" in failed[0]["error"], failed
    status, _, _ = _trial_files(trial, "RUNNING")
    assert status.startswith("damaged: ") and named in status


def test_a_trial_directory_of_another_sweep_is_never_read_as_this_sweeps(tmp_path):
    """``trials/<id>`` is shared by every sweep into an output directory, and Tune's ids are
    unique within one sweep only: a record of another sweep is a failure naming the file,
    its rows never this sweep's; a record without a sweep (an earlier version's) is read."""
    from sweep.layout import own_trials

    ours, other, older = (tmp_path / "trials" / f"t_0000{i}" for i in range(3))
    for trial, sweep in ((ours, "run-a"), (other, "run-b"), (older, ...)):
        trial.mkdir(parents=True)
        record = {**STATE, "final": {"finished": 1}, "sweep": sweep}
        (trial / STATE_FILE).write_text(json.dumps({k: v for k, v in record.items()
                                                    if v is not ...}))
        (trial / "results.json").write_text(json.dumps({"config": BASE, "rows": [ROW]}))
    ids = ["t_00000", "t_00001", "t_00002"]
    rows, failed = trial_outcomes(tmp_path, ids, "run-a")
    assert len(rows) == 2 and [f["trial"] for f in failed] == ["t_00001"]
    assert f"{other / STATE_FILE} is trial t_00001 of another sweep (MLflow run run-b" in (
        failed[0]["error"]) and failed[0]["foreign"] == "run-b"
    assert own_trials(tmp_path, ids, "run-a") == ["t_00000", "t_00002"]
    assert len(trial_outcomes(tmp_path, ids)[0]) == 3  # no sweep given: nothing to compare


def test_a_trial_of_an_earlier_version_reads_from_its_four_files(tmp_path):
    """A sweep resumed across the upgrade: a trial recorded in the earlier version's files
    (variant.json, heartbeat.json, final.json; failed.json) counts as finished (or failed),
    with its variant, and is not run again."""
    from sweep.layout import LEGACY_FINAL, LEGACY_HEARTBEAT, read_trial_state, trial_finished
    from sweep.review import _trial_files

    done, diverged = tmp_path / "trials" / "t_00000", tmp_path / "trials" / "t_00001"
    for trial in (done, diverged):
        trial.mkdir(parents=True)
        (trial / LEGACY_VARIANT).write_text(json.dumps({"phase2.lr": 0.01}))
        (trial / LEGACY_HEARTBEAT).write_text(json.dumps(STATE["heartbeat"]))
    (done / LEGACY_FINAL).write_text(json.dumps({"run_id": "r1", "final": {"finished": 1}}))
    (done / "results.json").write_text(json.dumps({"config": BASE, "rows": [ROW]}))
    (diverged / LEGACY_FAILED).write_text(json.dumps({"error": "loss is nan"}))
    state = read_trial_state(done)
    assert (state.final, state.run_id, state.variant) == ({"finished": 1}, "r1",
                                                           {"phase2.lr": 0.01})
    assert trial_finished(done) is True and trial_finished(diverged) is False
    # A damaged record settles nothing (the runner must not take the trial for one its
    # scheduler stopped; the summary lists it as damaged, naming the file).
    damaged = tmp_path / "trials" / "t_00002"
    damaged.mkdir()
    (damaged / STATE_FILE).write_text("{")
    assert trial_finished(damaged) is None
    assert _trial_files(done, "RUNNING")[0] == "finished"
    assert _trial_files(diverged, "RUNNING")[0] == "failed"
    rows, failed = trial_outcomes(tmp_path, ["t_00000", "t_00001"])
    assert [r["variant"] for r in rows] == ["phase2.lr=0.01"]
    assert failed == [{"trial": "t_00001", "variant": "phase2.lr=0.01", "error": "loss is nan"}]
