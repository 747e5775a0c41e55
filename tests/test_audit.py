"""``ntk-sweep attack``: a model of a finished run rebuilt (phase 2 again from its stored
checkpoint) reproduces its recorded row exactly, can be attacked otherwise, and a rebuild that
does not reproduce the row is reported as such, never as the run's model's figures."""

from __future__ import annotations

import json

import pytest

from core.audit import AuditError, ModelRef
from core.checkpoints import CheckpointStore
from core.experiment import run_experiment
from sweep.cli import main
from tests.helpers import BASE
from tests.helpers import tiny_cfg as _cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = _cfg(codes=["CC", "AC"], switch_points=[0, 1],
               eval={**BASE["eval"], "transfer": True, "reference": "A"})
    run_experiment(cfg, out)
    return out


@pytest.mark.slow
def test_a_rebuilt_model_reproduces_its_row(run, capsys):
    assert main(["attack", str(run), "--model", "AC@1"]) == 0
    printed = capsys.readouterr().out
    assert "every figure equals the recorded row's" in printed
    record = json.loads((run / "audits" / "AC@1-seed0.json").read_text())
    assert record["reproduces_row"] and record["audit"]["accuracy"] == \
        record["recorded"]["accuracy"]
    # The network itself too (no phase 2 to run).
    assert main(["attack", str(run), "--model", "A-@0"]) == 0


@pytest.mark.slow
def test_a_run_of_an_earlier_version_is_audited_with_its_own_attacks(tmp_path, capsys):
    """results.json written before evaluation attacks had a ``schedule`` (they ran PGD's fixed
    step): audited with that, not with today's default (APGD), it reproduces its rows."""
    cfg = _cfg(codes=["CC"], switch_points=[1],
               eval={**BASE["eval"], "linf": {**BASE["eval"]["linf"], "schedule": "fixed"}})
    run_experiment(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    del results["config"]["eval"]["linf"]["schedule"]  # as the earlier version wrote it
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["attack", str(tmp_path), "--model", "CC@1"]) == 0
    assert "every figure equals the recorded row's" in capsys.readouterr().out
    record = json.loads((tmp_path / "audits" / "CC@1-seed0.json").read_text())
    assert record["eval"]["linf"]["schedule"] == "fixed"


@pytest.mark.slow
def test_other_attacks_and_a_source_model(run, capsys):
    assert main(["attack", str(run), "--model", "CC@1", "--source", "A-@1",
                 "--set", "eval.linf.iters=4", "--set", "eval.margin_restarts=3"]) == 0
    record = json.loads((run / "audits" / "CC@1-seed0.json").read_text())
    audit = record["audit"]
    assert record["eval"]["linf"]["iters"] == 4 and record["source"] == "A-@1"
    assert audit["worst_linf"] <= min(audit["source_linf"], audit["robust_linf"],
                                      audit["reference_linf"], audit["transfer_linf"])
    assert audit["accuracy"] == record["recorded"]["accuracy"]  # the same model


@pytest.mark.slow
def test_a_rebuild_that_does_not_reproduce_the_row_says_so(run, capsys):
    results = json.loads((run / "results.json").read_text())
    row = next(r for r in results["rows"] if (r["code"], r["switch_epoch"]) == ("AC", 1.0))
    row["robust_linf"] += 1 / 16  # one more of the 16 test images "robust" than measured
    tampered = run.parent / "tampered"
    tampered.mkdir()
    (tampered / "results.json").write_text(json.dumps(results))
    (tampered / "trajectories").symlink_to(run / "trajectories")
    assert main(["attack", str(tampered), "--model", "AC@1"]) == 1
    assert "does not reproduce the run's row (robust_linf differ" in capsys.readouterr().out
    assert not json.loads((tampered / "audits" / "AC@1-seed0.json").read_text())[
        "reproduces_row"]


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--model", "AC"], "a model is CODE@EPOCH"),
    (["--model", "AA@1"], "AA@1, seed 0: not a row of the run (switch epochs of AA: none"),
    (["--model", "AC@7"], "AC@7, seed 0: not a row of the run (switch epochs of AC: [0.0, 1.0]"),
    (["--model", "AC@1", "--seed", "3"], "--seed 3: the run's seeds are [0]"),
    (["--model", "AC@1", "--set", "phase2.lr=1"], "only eval.* settings apply here"),
    (["--model", "AC@1", "--set", "eval.linf.iters=-1"], "eval.linf.iters"),
    (["--model", "AC@1", "--source", "CA@1"], "CA@1, seed 0: not a row"),
])
def test_bad_requests_are_refused_before_work(run, capsys, args, message):
    assert main(["attack", str(run), *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_checkpoint_of_the_earlier_format_is_named_not_missing(tmp_path, capsys):
    """A run whose checkpoints are orbax directories (``<step>/``, before one-file
    checkpoints): the audit says the checkpoint is of an earlier format and how to remake it,
    rather than that none is stored."""
    out = tmp_path / "run"
    run_experiment(_cfg(codes=["CC"], switch_points=[0, 1]), out)
    (pack,) = out.glob("trajectories/*/trajectory.pack")
    for step in CheckpointStore(pack).steps():  # orbax directories, as an earlier version
        (pack.parent / "checkpoints" / str(step) / "state").mkdir(parents=True)
        (pack.parent / "checkpoints" / str(step) / "state" / "d").write_bytes(b"x")
    pack.unlink()
    assert main(["attack", str(out), "--model", "CC@1"]) == 2
    err = capsys.readouterr().err
    assert "was written by an earlier version (directory 4/)" in err
    assert "run the experiment again with the same config and --out" in err


def test_model_references():
    assert ModelRef.parse("AC@10") == ModelRef("AC", 10.0)
    assert ModelRef.parse("A-@2.5") == ModelRef("A-", 2.5) and str(ModelRef("A-", 2.5)) == "A-@2.5"
    with pytest.raises(AuditError):
        ModelRef.parse("AC@-1")
