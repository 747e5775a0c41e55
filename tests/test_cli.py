"""The ``ntk-sweep experiment`` command end to end, and its refusal of bad input."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweep.cli import main

SMOKE = {
    "name": "smoke",
    "seeds": [0],
    "dataset": {"name": "digits"},
    "model": {"name": "cnn", "width": 4},
    "codes": ["CC", "AC", "CA", "AA"],
    "switch_points": [0, 0.5, 1],
    "phase1": {"epochs": 1, "lr": 0.05, "batch_size": 256, "lr_decay_epochs": [],
               "attack": {"eps": 0.1, "iters": 2}},
    "phase2": {"epochs": 1, "batch_size": 256, "attack": {"eps": 0.1, "iters": 2}},
    "eval": {"linf": {"eps": 0.1, "iters": 3}, "l2": {"norm": "l2", "eps": 0.5, "iters": 3},
             "max_test": 64},
}


def _write(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "sweep.cli", *args], capture_output=True,
                          text=True, timeout=600, env=env)


def _rows(out: Path) -> list[dict]:
    with (out / "results.csv").open() as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_experiment_smoke_all_four_codes(tmp_path, capsys):
    cfg = _write(tmp_path, SMOKE)
    out = tmp_path / "run"
    proc = _cli("experiment", str(cfg), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "results (mean" in proc.stdout and str(out / "results.csv") in proc.stdout
    rows = _rows(out)
    assert {r["code"] for r in rows} == {"CC", "AC", "CA", "AA", "C-", "A-"}
    assert len(rows) == 6 * 3
    for r in rows:
        for k in ("accuracy", "robust_linf", "robust_l2"):
            assert 0.0 <= float(r[k]) <= 1.0
        assert float(r["robust_linf"]) <= float(r["accuracy"])
    assert (out / "switch_point.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert len(summary) == 18
    trajectories = [p for p in (out / "trajectories").iterdir() if p.is_dir()]
    assert len(trajectories) == 2  # one per phase-1 data mode, shared by its two codes
    # 1437 images / 256 = 5 steps an epoch: checkpoints at 0, the reference fractions <= 1
    # (0.125 -> 1, 0.25 -> 1, 0.375 -> 2, 0.5 -> 2, 0.75 -> 4) and the last epoch.
    from core.checkpoints import CheckpointStore

    steps = CheckpointStore(trajectories[0] / "trajectory.pack").steps()
    assert steps == [0, 1, 2, 4, 5]

    # Same seed, same numbers; and a rerun over the same output reuses the trajectories.
    again = _cli("experiment", str(cfg), "--out", str(out), "--quiet")
    assert again.returncode == 0, again.stderr
    assert _rows(out) == rows

    # Kernel trajectories of both phase-1 runs, their measures, and eigen-feature images.
    kern = _cli("kernel", str(out), "--set", "kernel.probe_size=30", "--quiet")
    assert kern.returncode == 0, kern.stderr
    with (out / "kernel_measures.csv").open() as f:
        measures = list(csv.DictReader(f))
    assert len(measures) == 2 * len(steps)
    assert {float(m["epoch"]) for m in measures} == {0.0, 0.25, 0.5, 0.75, 1.0}
    assert all(float(m["to_init"]) < 1e-5 for m in measures if float(m["epoch"]) == 0)
    assert re.search(r"distance [AC]/seed 0 vs [AC]/seed 0 at epoch 1: 0\.\d+", kern.stdout)
    for plot in ("kernel_distances.png", "kernel_heatmap_A_seed0.png",
                 "kernel_heatmap_C_seed0.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG", plot
    from core.kernel_store import KernelTrajectory
    from core.pack import Pack

    # A trajectory is its pack (record, checkpoints, kernels, evaluations) and its lock.
    assert all(sorted(p.name for p in t.iterdir()) == ["trajectory.pack"] for t in trajectories)
    assert all(t.with_name(t.name + ".lock").is_file() for t in trajectories)
    packs = [t / "trajectory.pack" for t in trajectories]
    settings = [{k[1] for k in Pack(p).entries() if k[0] == "kernel"} for p in packs]
    assert all(len(s) == 1 and min(s).startswith("classwise-") for s in settings)
    kernels = [KernelTrajectory(p, min(s)) for p, s in zip(packs, settings, strict=True)]
    assert [len(k.epochs()) for k in kernels] == [len(steps)] * 2
    # The paper's claims: written by 'experiment' (claim 3 without data), completed by
    # 'kernel' (its kernels), and the numbers behind claim 1 are the rows' (one seed).
    claims = {c["key"]: c for c in json.loads((out / "claims.json").read_text())[0]["claims"]}
    assert claims["3"]["verdict"] != "not enough data", claims["3"]
    assert claims["3 (distinct kernels)"]["verdict"] == "not enough data"  # one seed
    worst = {(r["code"], float(r["switch_epoch"])): float(r["worst_linf"]) for r in rows}
    assert claims["1"]["numbers"]["ac_minus_cc"] == pytest.approx(
        worst[("AC", 1.0)] - worst[("CC", 1.0)])
    summary_md = (out / "summary.md").read_text()
    assert summary_md.count("## The paper's claims") == 1 and "**3: " in summary_md
    assert main(["claims", str(out), "--metric", "robust_linf"]) == 0
    printed = capsys.readouterr().out
    assert "the paper's claims" in printed and "robust_linf" in printed
    feat = _cli("features", str(out), "--epoch", "1", "--classes", "0,3", "--steps", "5",
                "--set", "kernel.probe_size=30")
    assert feat.returncode == 0, feat.stderr
    assert len(list((out / "features").glob("*.png"))) == 2
    for args, message in [
        (("kernel", "--set", "kernel.probe_size=5000"), "kernel.probe_size: 5000 exceeds"),
        (("kernel", "--set", "kernel.logit=10", "--set", "kernel.output=logit"),
         "kernel.logit: 10 is not a class of digits"),
        (("kernel", "--set", "kernel.epochs=[7]"), "kernel.epochs: none of [7.0]"),
        (("features", "--epoch", "1", "--classes", "0,42"), "--classes: [42] not in"),
        (("features", "--epoch", "3"), "--epoch 3: trajectory"),
        (("claims", "--metric", "robust"), "--metric: 'robust' is not one of"),
        (("claims", "--fraction", "2"), "--fraction: 2.0 is not in (0, 1)"),
    ]:
        # In this process: refused before any work, so a subprocess would only add its start.
        code, err = main([args[0], str(out), *args[1:]]), capsys.readouterr().err
        assert code == 2 and message in err, (args, err[-500:])


@pytest.mark.smoke
def test_invalid_config_exits_2_and_names_the_field(tmp_path):
    bad = {**SMOKE, "phase1": {**SMOKE["phase1"], "attack": {"eps": -0.1}}}
    proc = _cli("experiment", str(_write(tmp_path, bad)), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "phase1.attack.eps" in proc.stderr and "greater than 0" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"phase_1": {}}, "phase_1: unknown key (did you mean 'phase1'?)"),
        ({"phase2": {"dynamic": "centered"}},
         "phase2.dynamic: unknown key (did you mean 'dynamics'?)"),
        ({"codes": ["CX"]}, "codes"),
        ({"switch_points": [0, 5]}, "switch_points: 5.0 is beyond phase1.epochs = 1"),
        ({"switch_points": [-1]}, "switch_points"),
        ({"model": {"name": "vgg"}}, "model.name"),
        ({"dataset": {"name": "cifar10"}}, "data_dir is required"),
        ({"dataset": {"name": "cifar10", "data_dir": "/nonexistent"}},
         "cifar-10-batches-bin/test_batch.bin"),
        ({"phase1": {**SMOKE["phase1"], "batch_size": 5000}}, "phase1.batch_size: 5000 exceeds"),
        ({"seeds": "zero"}, "seeds"),
        # Configs that used to validate and run wrong (issue 11, item 5):
        ({"seeds": [0, 1, 0]}, "seeds: Value error, seeds must be distinct; repeated: [0]"),
        ({"phase1": {**SMOKE["phase1"], "batch_size": True}}, "phase1.batch_size: Input should "
         "be a valid integer"),
        ({"phase1": {**SMOKE["phase1"], "lr": float("inf")}}, "phase1.lr: Input should be a "
         "finite number"),
        ({"phase1": {**SMOKE["phase1"], "attack": {"eps": float("nan")}}},
         "phase1.attack.eps: Input should be a finite number"),
        ({"phase1": {**SMOKE["phase1"], "epochs": 1e9}}, "phase1.epochs: Input should be less "
         "than or equal to 10000"),
        ({"phase2": {"epochs": float("inf")}}, "phase2.epochs: Input should be a finite number"),
        ({"model": {"name": "mlp", "widths": [16, False]}}, "model.widths.1"),
    ],
)
def test_bad_configs_are_refused_before_work(tmp_path, capsys, change, message):
    path = _write(tmp_path, {**SMOKE, **change})
    out = tmp_path / "out"
    assert main(["experiment", str(path), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_malformed_yaml_and_missing_file(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("phase1: [unclosed\n")
    assert main(["experiment", str(path)]) == 2
    assert "malformed YAML" in capsys.readouterr().err
    assert main(["experiment", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: cannot read" in capsys.readouterr().err


def test_claims_of_a_directory_that_is_no_run_or_is_damaged(tmp_path, capsys):
    assert main(["claims", str(tmp_path)]) == 2
    assert "neither results.json" in capsys.readouterr().err
    (tmp_path / "results.json").write_text('{"config": {}, "rows": [{"seed": "0"}]}')
    assert main(["claims", str(tmp_path)]) == 2
    assert "results.json: rows[0].seed" in capsys.readouterr().err


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["experiment", str(_write(tmp_path, SMOKE)), "--out", str(blocker / "x")]) == 2
    assert "not writable" in capsys.readouterr().err
    assert blocker.read_text() == "not a directory"


@pytest.mark.smoke
def test_overrides_and_validate(tmp_path, capsys):
    path = _write(tmp_path, SMOKE)
    assert main(["validate", str(path), "--set", "seeds=[1,2]", "--set", "phase2.epochs=3"]) == 0
    assert "seeds [1, 2]" in capsys.readouterr().out
    assert main(["validate", str(path), "--set", "phase2.epochs=-3"]) == 2
    assert "phase2.epochs" in capsys.readouterr().err


@pytest.mark.smoke
def test_shipped_configs_are_valid(capsys):
    assert main(["list"]) == 0
    listed = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    names = list(listed)
    assert "digits-demo" in names
    # What each entry is: a sweep varies more than its seeds or has a sweep: section, an
    # experiment does neither.
    assert listed["digits-demo"] == "experiment" and listed["quickstart"] == "sweep"
    assert listed["eps-sweep"] == "sweep"
    for name in names:
        assert main(["validate", name]) == 0, name


def test_version_and_what_counts_as_a_sweep(capsys):
    from importlib.metadata import version

    from sweep.space import is_sweep

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"ntk-sweep {version('ntk-sweep')}"
    assert not is_sweep({"seeds": {"grid": [0, 1]}, "phase2": {"lr": 0.1}})  # seeds only
    assert not is_sweep({"seeds": [0, 1, 2]})
    assert is_sweep({"seeds": [0], "phase2": {"lr": {"grid": [0.1, 0.01]}}})
    assert is_sweep({"seeds": [0], "sweep": {"num_samples": 2}})
    assert not is_sweep(["not", "a", "mapping"])


def test_validate_describes_a_sweep(capsys):
    """What a user needs before starting a sweep: its grid, what a trial runs, the resources
    of a trial and how many run at once here."""
    import os

    assert main(["validate", "eps-sweep"]) == 0
    out = capsys.readouterr().out
    assert "eps-sweep: valid sweep, 8 trials over phase1.attack.eps, seeds" in out
    assert "phase1.attack.eps: grid [0.05, 0.1, 0.2, 0.3]" in out
    assert "seeds: grid [0, 1]" in out
    assert "a trial: 8 evaluated models at most" in out  # 2 switch points x (2 codes + C-, A-)
    cpus = os.cpu_count()
    assert f"resources per trial: 1 CPU, 0 GPU; on this machine ({cpus} CPUs) " \
           f"{min(cpus, 8)} trials at once" in out


@pytest.mark.slow
def test_compiled_programs_are_kept_between_runs(tmp_path):
    """A second experiment loads the programs the first compiled (``NTK_SWEEP_JAX_CACHE``)
    instead of compiling them: no new cache entry, and the same results bit for bit."""
    from tests.helpers import BASE

    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(NTK_SWEEP_JAX_CACHE=str(cache), TF_CPP_MIN_LOG_LEVEL="3")
    path = _write(tmp_path, {**BASE, "name": "cached", "codes": ["CC", "AC"],
                             "switch_points": [0, 1]})
    entries = []
    for out in ("first", "second"):
        done = subprocess.run([sys.executable, "-m", "sweep.cli", "experiment", str(path),
                               "--out", str(tmp_path / out), "--quiet"], capture_output=True,
                              text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        entries.append(sorted(p.name for p in cache.iterdir()))
    assert entries[0] and entries[1] == entries[0]
    assert _rows(tmp_path / "first") == _rows(tmp_path / "second")


def test_where_compiled_programs_are_kept(tmp_path, monkeypatch):
    from sweep.layout import jax_cache_dir

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("NTK_SWEEP_JAX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert jax_cache_dir() == tmp_path / "xdg" / "ntk-sweep" / "jax"
    assert jax_cache_dir(tmp_path / "sweep") == tmp_path / "sweep" / "jax-cache"
    monkeypatch.setenv("NTK_SWEEP_JAX_CACHE", str(tmp_path / "mine"))
    assert jax_cache_dir(tmp_path / "sweep") == tmp_path / "mine"
    monkeypatch.setenv("NTK_SWEEP_JAX_CACHE", "off")
    assert jax_cache_dir(tmp_path / "sweep") is None
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))  # jax's own wins
    monkeypatch.delenv("NTK_SWEEP_JAX_CACHE")
    assert jax_cache_dir(tmp_path / "sweep") is None
