"""A real local Ray Tune sweep recorded in a real MLflow (SQLite): structure, reuse of
phase-1 trajectories within and across sweeps."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from sweep.layout import read_trial_state, tracking_uri
from sweep.runner import run_sweep
from sweep.space import parse_space
from tests import browser
from tests.helpers import SWEEP


@pytest.mark.slow
@pytest.mark.smoke
def test_local_sweep_mlflow_structure_and_trajectory_reuse(tmp_path, ray_local, monkeypatch):
    space = parse_space(SWEEP)
    records = run_sweep(space, tmp_path)
    assert len(records) == 2 and not any(r["error"] for r in records)
    # Per trial (one seed): a C and an A trajectory, each trained once to the longest switch
    # point (2 epochs), although 3 switch points x 1 code use each of them.
    assert sorted(r["phase1_epochs_trained"] for r in records) == [4, 4]
    assert all(0 <= r["robust_linf"] <= r["accuracy"] <= 1 for r in records)
    # Tune's own loggers are off: results live in the trial files and MLflow.
    for written_by_tune_loggers in ("progress.csv", "result.json", "events.out.tfevents.*",
                                    "params.json", "params.pkl"):
        assert not list(tmp_path.glob(f"ray/*/*/{written_by_tune_loggers}"))
    assert len(list(tmp_path.glob("ray/*/*/checkpoint_*"))) == 2  # Tune's own state is there

    client = MlflowClient(tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("tiny-sweep")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_kind = {}
    for r in runs:
        by_kind.setdefault(r.data.tags.get("kind"), []).append(r)
    (parent,) = by_kind["sweep"]
    trials = by_kind["trial"]
    assert len(trials) == 2
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parent.info.run_id}
    assert {t.info.run_name for t in trials} == {"trial phase2.lr=0.01 seed 0",
                                                 "trial phase2.lr=0.01 seed 1"}
    for run in runs:  # every run says what made it
        assert run.data.tags["ntk_sweep.version"] and run.data.tags["mlflow.source.git.commit"]
    switch_runs = by_kind["switch_run"]
    assert len(switch_runs) == 2 * 2 * 4  # seeds x codes x (3 switch points + the rule)
    trial_ids = {t.info.run_id for t in trials}
    for run in switch_runs:
        params = run.data.params
        assert run.data.tags["mlflow.parentRunId"] in trial_ids
        assert params["code"] in ("CC", "AC") and params["dynamics"] == "centered"
        assert params["phase1_mode"] == params["code"][0] and params["phase2_mode"] == "C"
        assert params["dataset.name"] == "synthetic" and params["model.name"] == "mlp"
        assert params["phase1.attack.eps"] == "0.1" and params["phase2.lr"] == "0.01"
        assert params["switch_epoch"] in ("0", "1", "2")
        assert run.data.metrics["switch_epoch"] == float(params["switch_epoch"])
        assert params["switch_rule"] in ("", "to_previous<10x1")
        assert params["switch_epoch"] == "1" or params["switch_rule"] == ""
        assert run.info.run_name.startswith(f"{params['code']} t={params['switch_epoch']}")
        assert "robust_linf" in run.data.metrics
        # Its own phase-2 curve: one epoch of 4 steps.
        curve = client.get_metric_history(run.info.run_id, "train_loss")
        assert [m.step for m in curve] == [4]
    assert len(by_kind["network"]) == 2 * 2 * 4  # the phase-1 networks at each switch
    # The comparisons users make are plain MLflow searches: AC against CC at switch epoch 2.
    found = client.search_runs([exp.experiment_id], "params.switch_epoch = '2' and "
                               "params.switch_rule = '' and params.phase2_mode = 'C'")
    assert sorted(r.data.params["code"] for r in found) == ["AC", "AC", "CC", "CC"]
    # One run per trajectory: plain metric names on one step axis (the training step).
    trajectories = by_kind["trajectory"]
    assert sorted(t.info.run_name for t in trajectories) == [
        f"trajectory {m} seed {s}" for m in "AC" for s in (0, 1)]
    from core.kernels import MEASURES

    for t in trajectories:
        assert t.data.tags["mlflow.parentRunId"] in trial_ids
        assert len(t.data.params["trajectory_id"]) == 16
        loss = client.get_metric_history(t.info.run_id, "train_loss")
        assert [m.step for m in loss] == [4, 8]  # epochs 1 and 2 of 4 steps
        assert set(MEASURES) <= set(t.data.metrics)
        to_init = client.get_metric_history(t.info.run_id, "to_init")
        assert [m.step for m in to_init] == [0, 4, 8] and to_init[0].value < 1e-5
        epochs = client.get_metric_history(t.info.run_id, "epoch")
        assert {m.step: m.value for m in epochs} == {0: 0, 4: 1, 8: 2}
        to_final = client.get_metric_history(t.info.run_id, "to_final")
        assert to_final[-1].value < 1e-5 and to_final[0].value > 0
    artifacts = {a.path for a in client.list_artifacts(trials[0].info.run_id)}
    assert {"results.csv", "summary.md", "kernels.png"} <= artifacts
    # One overview figure a trial, beside it and in its run; no PDF twins in a sweep.
    assert not any(a.endswith(".pdf") for a in artifacts)
    cross = client.get_metric_history(trials[0].info.run_id, "kernel/cross/AC/distance")
    assert len(cross) == 3 and cross[0].value < 1e-5  # same initial network for C and A
    # The worker's resident memory at the trial's end (how reused workers grow; scale.py).
    assert 50 < trials[0].data.metrics["memory/worker_rss_mb"] < 64_000
    # The rule triggered where the logged distance to the previous kernel is below 10.
    (a0,) = [t for t in trajectories if t.info.run_name == "trajectory A seed 0"]
    assert a0.data.metrics["switch_rule_epoch"] == 1
    to_prev = client.get_metric_history(a0.info.run_id, "to_previous")
    assert [m.step for m in to_prev if m.value < 10][1] == 4
    # Kernels (switch points and last checkpoint) as one artifact of the trial run, removed
    # from beside the trial once MLflow has it.
    trial_of_a0 = a0.data.tags["mlflow.parentRunId"]
    assert "kernels.npz" in {a.path for a in client.list_artifacts(trial_of_a0)}
    local = client.download_artifacts(trial_of_a0, "kernels.npz", str(tmp_path / "download"))
    with np.load(local, allow_pickle=False) as z:
        assert z["A/epochs"].tolist() == [0, 1, 2] and z["C/epochs"].tolist() == [0, 1, 2]
        assert z["A/kernels"].shape == (3, 3, 12, 12)  # class-wise kernels on the probe set
        assert [m["epoch"] for m in json.loads(str(z["A/meta"]))] == [0, 1, 2]
    # Beside each trial: its rows, state and figure; the tables went to MLflow.
    for trial in tmp_path.glob("trials/*"):
        assert sorted(p.name for p in trial.iterdir()) == [
            "kernels.png", "results.json", "state.json"]
        state = read_trial_state(trial)
        assert state.final["finished"] == 1 and state.run_id and state.error is None
        assert state.heartbeat["stage"] == "kernels" and set(state.variant) == {"phase2.lr"}
    # The sweep's definition on the parent: the file as given, the resolved config.
    assert {"sweep/sweep.yaml", "sweep/resolved-config.yaml"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert parent.data.params["swept"] == "phase2.lr, seeds"
    # Seed vs seed and benign vs adversarial, on the parent (4 trajectories: 6 pairs).
    parent_metrics = client.get_run(parent.info.run_id).data.metrics
    pairs = {k for k in parent_metrics if k.startswith("kernel/cross/")}
    assert pairs == {f"kernel/cross/{a}-{b}/distance" for a, b in
                     [("A0", "A1"), ("A0", "C0"), ("A0", "C1"), ("A1", "C0"), ("A1", "C1"),
                      ("C0", "C1")]}
    assert parent_metrics["kernel/cross/A0-A1/distance"] > 0  # different initialisations
    # The sweep's summary over seeds, on the parent run and beside the sweep.
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.md", "switch_point.png",
            "cross_trajectory.png"} <= parent_artifacts
    summary = (tmp_path / "summary.md").read_text()
    assert "| AC | 2 | 2 |" in summary  # code AC, switch epoch 2, both seeds
    # The paper's claims over both seeds: a section of the summary, files, parent-run tags.
    assert {"claims.md", "claims.json"} <= parent_artifacts
    assert summary.count("## The paper's claims") == 1
    tags = client.get_run(parent.info.run_id).data.tags
    assert tags["claim/2"] == "not enough data"  # the sweep has no AA rows
    for key in ("1", "3", "3_distinct_kernels"):  # AC and CC rows; C and A kernels, 2 seeds
        assert tags[f"claim/{key}"] in ("holds", "does not hold", "reversed"), key
    (study,) = json.loads((tmp_path / "claims.json").read_text())
    worst = {(r["code"], r["seed"]): r["worst_linf"] for t in records for r in json.loads(
        (tmp_path / "trials" / t["trial_id"] / "results.json").read_text())["rows"]
        if r["switch_epoch"] == 2 and not r["switch_rule"]}
    assert study["claims"][0]["numbers"]["ac_minus_cc"] == pytest.approx(
        sum(worst[("AC", s)] - worst[("CC", s)] for s in (0, 1)) / 2)

    # A second sweep over the same storage trains no phase-1 epoch.
    again = run_sweep(space, tmp_path)
    assert [r["phase1_epochs_trained"] for r in again] == [0, 0]
    assert sorted(r["robust_linf"] for r in again) == sorted(r["robust_linf"] for r in records)
    # Its summary is its own two trials, not the earlier sweep's as well (4 "seeds").
    assert "| AC | 2 | 2 |" in (tmp_path / "summary.md").read_text()
    # Its models of switch step 0 are the first sweep's, kept with the trajectories: copied,
    # their phase-2 curves replayed into its runs.
    zero: dict[tuple[str, str], list] = {}
    for run in client.search_runs([exp.experiment_id], "tags.kind = 'switch_run' and "
                                  "params.switch_epoch = '0'"):
        zero.setdefault((run.data.params["code"], run.data.params["seed"]), []).append(
            [(m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                  "train_loss")])
    assert len(zero) == 4 and all(len(c) == 2 and c[0] == c[1] != [] for c in zero.values())

    # A third sweep whose Tune trial ids are the first's (ids are unique within one sweep
    # only; forced here): its trials fail naming the directory, and the first sweep's trials
    # are neither reported as its results nor changed.
    first = {p: p.read_bytes() for t in records for p in (tmp_path / "trials" / t["trial_id"]
                                                          ).iterdir()}
    monkeypatch.setenv("_TEST_TUNE_TRIAL_UUID", records[0]["trial_id"].split("_")[0])
    third = run_sweep(space, tmp_path)
    assert sorted(r["trial_id"] for r in third) == sorted(r["trial_id"] for r in records)
    assert all("of another sweep" in r["error"] for r in third), [r["error"] for r in third]
    assert {p: p.read_bytes() for p in first} == first
    summary = (tmp_path / "summary.md").read_text()
    assert "| AC |" not in summary and summary.count("of another sweep (MLflow run") == 2


@pytest.mark.slow
def test_each_model_run_has_its_own_phase2_curve_when_rows_wait_for_the_reference(
        tmp_path, ray_local):
    """A CC trial whose reference network (A) no trial of its own trains keeps its models'
    rows until the reference's examples exist (it trains A itself at the end here; in a sweep
    another trial does). Each model's MLflow run still gets its own phase-2 curve, not the
    curve of the last model trained with its code."""
    space = {**SWEEP, "name": "curves", "codes": ["CC"], "switch_rule": None, "seeds": [0],
             "switch_points": [0, 1], "phase2": {**SWEEP["phase2"], "epochs": 2},
             "eval": {**SWEEP["eval"], "reference": "A"}, "kernel": {"enabled": False}}
    (record,) = run_sweep(parse_space(space), tmp_path)
    assert not record["error"]
    rows = json.loads((tmp_path / "trials" / record["trial_id"] / "results.json").read_text()
                      )["rows"]
    client = MlflowClient(tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("curves")
    models = client.search_runs([exp.experiment_id], "tags.kind = 'switch_run'")
    assert len(models) == 2
    for run in models:
        (row,) = [r for r in rows if r["code"] == "CC" and r["switch_epoch"] == float(
            run.data.params["switch_epoch"])]
        curve = client.get_metric_history(run.info.run_id, "train_loss")
        assert [m.step for m in curve] == [4, 8]  # two epochs of 4 steps
        assert curve[-1].value == pytest.approx(row["train_loss"], rel=1e-12, abs=0), (
            run.info.run_name)


def test_run_command_refuses_bad_sweeps_before_ray(tmp_path, capsys):
    import ray
    import yaml

    from sweep.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "phase2": {"lr": {"loguniform": [0, 1]}}}))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "phase2.lr.loguniform: low must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # A misspelt metric: ASHA would compare a metric no trial reports, and stop nothing.
    path.write_text(yaml.safe_dump({**SWEEP, "sweep": {**SWEEP.get("sweep", {}),
                                                       "metric": "robust_lnf"}}))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "sweep.metric" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not ray.is_initialized()


@pytest.mark.slow
def test_a_sweep_that_cannot_start_ray_ends_its_parent_run_failed(tmp_path, monkeypatch):
    """The parent run is created before Ray starts; it used to stay RUNNING forever."""
    import ray

    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # no cluster here: ray.init raises at once
    with pytest.raises(ConnectionError):
        run_sweep(parse_space(SWEEP), tmp_path)
    client = MlflowClient(tracking_uri(tmp_path))
    (parent,) = client.search_runs([client.get_experiment_by_name("tiny-sweep").experiment_id])
    assert parent.data.tags["kind"] == "sweep" and parent.info.status == "FAILED"


@pytest.mark.slow
def test_ray_workers_log_to_a_real_mlflow_server(tmp_path, ray_local, monkeypatch):
    from tests.servers import mlflow_server

    small = {**SWEEP, "name": "server-sweep", "codes": ["CC"], "switch_rule": None,
             "switch_points": [0, 1], "phase1": {**SWEEP["phase1"], "epochs": 1}}
    with mlflow_server(tmp_path / "server") as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        records = run_sweep(parse_space(small), tmp_path / "out")
        assert [r["error"] for r in records] == ["", ""]
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("server-sweep")
        assert exp.artifact_location.startswith("mlflow-artifacts:")  # served by the server
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        trials = [r for r in runs if r.data.tags.get("kind") == "trial"]
        assert len(trials) == 2
        for t in trials:  # logged by Ray workers, through the server
            assert t.info.status == "FINISHED" and "robust_linf" in t.data.metrics
            names = {a.path for a in client.list_artifacts(t.info.run_id)}
            assert {"results.csv", "summary.md", "kernels.png"} <= names
        assert len([r for r in runs if r.data.tags.get("kind") == "switch_run"]) == 2 * 2
        # The comparisons of the README, as MLflow's own searches, against the trial files:
        # CC switched at epoch 1, one model run per seed, nested under its trial.
        recorded = {(r["seed"], r["code"], r["switch_epoch"]): r
                    for path in (tmp_path / "out").glob("trials/*/results.json")
                    for r in json.loads(path.read_text())["rows"]}
        found = client.search_runs([exp.experiment_id],
                                   "params.code = 'CC' and params.switch_epoch = '1'")
        assert sorted(r.data.params["seed"] for r in found) == ["0", "1"]
        for r in found:
            row = recorded[(int(r.data.params["seed"]), "CC", 1)]
            assert {k: r.data.metrics[k] for k in ("accuracy", "robust_linf", "worst_linf")} \
                == {k: row[k] for k in ("accuracy", "robust_linf", "worst_linf")}
            trial = client.get_run(r.data.tags["mlflow.parentRunId"])
            assert trial.data.tags["kind"] == "trial"
            assert trial.data.params["seed"] == r.data.params["seed"]
        # Two trajectories (seed 0 and seed 1) overlay on one step axis.
        c = client.search_runs([exp.experiment_id], "params.data_mode = 'C'")
        curves = [{m.step: m.value for m in
                   client.get_metric_history(t.info.run_id, "train_loss")} for t in c]
        assert len(curves) == 2 and [sorted(h) for h in curves] == [[4], [4]]
        assert curves[0] != curves[1]  # different seeds
    assert not (tmp_path / "out" / "mlflow.db").exists()  # nothing went to the default store
    stored = list((tmp_path / "server" / "artifacts").rglob("summary.md"))
    assert len(stored) == 3  # two trials and the sweep's parent run


@pytest.mark.slow
def test_a_trial_killed_after_creating_its_runs_continues_them(tmp_path):
    """The worker dies right after the trial created its MLflow runs, before Tune recorded the
    checkpoint naming them (a failpoint; a driver killed then leaves the same state, and a
    reused worker starts a trial within milliseconds). The retry finds the runs by the trial's
    id and continues them: one trial run, one run per trajectory, none left RUNNING."""
    import ray

    from sweep.tracking import FAILPOINT

    marker = tmp_path / "killed"
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, runtime_env={
        "env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3", FAILPOINT: f"trial-runs-created:{marker}"}})
    try:
        small = {**SWEEP, "name": "retry-sweep", "codes": ["CC", "AC"], "switch_rule": None,
                 "seeds": [0], "switch_points": [0, 1], "phase1": {**SWEEP["phase1"],
                                                                   "epochs": 1}}
        records = run_sweep(parse_space(small), tmp_path / "out")
    finally:
        ray.shutdown()
    assert marker.exists() and [r["error"] for r in records] == [""]
    client = MlflowClient(tracking_uri(tmp_path / "out"))
    exp = client.get_experiment_by_name("retry-sweep")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_kind: dict[str, list] = {}
    for r in runs:
        by_kind.setdefault(r.data.tags.get("kind"), []).append(r)
    (trial,) = by_kind["trial"]
    trajectories = by_kind["trajectory"]
    assert sorted(r.data.params["data_mode"] for r in trajectories) == ["A", "C"]
    assert {r.data.tags["mlflow.parentRunId"] for r in trajectories} == {trial.info.run_id}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len(by_kind["switch_run"]) == 2 * 2


@pytest.mark.slow
def test_asha_stops_poor_trials_early(tmp_path, ray_local):
    """One flag away: ``scheduler: asha`` compares trials on ``metric`` as their models are
    evaluated and stops the poor ones; their MLflow runs end as KILLED, tagged."""
    space = parse_space({
        **SWEEP, "name": "asha-sweep", "seeds": [0], "codes": ["AC"], "switch_rule": None,
        "switch_points": [1, 2], "kernel": {"enabled": False},
        # Centered phase 2 at lr 1e-9 stays at zero output: chance accuracy.
        "phase2": {"epochs": 1, "batch_size": 16, "lr": {"grid": [0.05, 1e-9, 1e-9]}},
        "sweep": {"scheduler": "asha", "metric": "accuracy", "mode": "max",
                  "max_concurrent_trials": 1, "resources": {"cpus": 1}},
    })
    records = run_sweep(space, tmp_path)
    assert [r["error"] for r in records] == ["", "", ""]
    stopped = [r for r in records if r["stopped_early"]]
    assert stopped and all(r["phase2.lr"] == 1e-9 for r in stopped)
    client = MlflowClient(tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("asha-sweep")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'trial'")
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert len(killed) == len(stopped)
    assert all(r.data.tags["stopped_by"] == "asha" for r in killed)
    assert {r.info.status for r in runs} <= {"KILLED", "FINISHED"}


@pytest.mark.slow
@pytest.mark.skipif(browser.chromium() is None, reason="no Chromium ('make test' installs it)")
def test_mlflow_ui_compares_model_runs_and_charts_a_trajectory(tmp_path, ray_local, monkeypatch):
    """MLflow's own UI in a real browser: the compare view of two model runs lists their
    params (it said "No parameters to display" when everything was a tag), and a trajectory
    run's charts render its kernel measures and training curve."""
    from tests.servers import mlflow_server

    small = {**SWEEP, "name": "ui-sweep", "codes": ["CC", "AC"], "switch_rule": None,
             "switch_points": [0, 1], "seeds": [0], "phase1": {**SWEEP["phase1"], "epochs": 1}}
    with mlflow_server(tmp_path / "server") as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert [r["error"] for r in run_sweep(parse_space(small), tmp_path / "out")] == [""]
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("ui-sweep").experiment_id
        models = client.search_runs([exp], "params.switch_epoch = '1' and "
                                    "params.phase2_mode = 'C'")
        assert sorted(r.info.run_name for r in models) == ["AC t=1 seed 0", "CC t=1 seed 0"]
        page = browser.dom(browser.compare_url(uri, exp, [r.info.run_id for r in models]),
                           ready=lambda page: "phase1.attack.eps" in page)
        assert "No parameters to display" not in page
        for text in ("AC t=1 seed 0", "CC t=1 seed 0", "phase1.attack.eps", "switch_epoch",
                     "phase1_mode", "trajectory_id", "worst_linf"):
            assert text in page, text
        (trajectory,) = client.search_runs([exp], "attributes.run_name = 'trajectory A seed 0'")
        wanted = ("alignment", "effective_rank", "train_loss", "to_init")

        def drawn(page: str) -> bool:  # plotly charts of every wanted metric
            return page.count('class="main-svg"') >= 8 and all(m in page for m in wanted)

        charts = browser.dom(browser.run_charts_url(uri, exp, trajectory.info.run_id),
                             size=(1400, 4000), ready=drawn)  # charts out of view are not drawn
        assert charts.count('class="main-svg"') >= 8
        for metric in wanted:
            assert metric in charts, metric
