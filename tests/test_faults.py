"""Fault injection with real processes killed by PID: a trial's Ray worker (in phase 1, then in
phase 2), a Ray node, the MLflow server (down mid-sweep, down at start), and a trial that
diverges. Each test is bounded in time; each asserts that nothing was lost."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from core.checkpoints import CheckpointStore
from sweep.layout import tracking_uri
from sweep.runner import SweepTrackingLost, run_sweep
from sweep.space import parse_space
from tests.helpers import finished_trials, trial_states
from tests.servers import BIN, free_port, mlflow_server, processes_mentioning, ray_cluster

# Long enough per epoch (~0.1-0.3 s) that a test can see an epoch end and strike mid-phase.
SLOW = {
    "name": "fault-sweep",
    "dataset": {"name": "synthetic",
                "synthetic": {"n_train": 1024, "n_test": 64, "num_classes": 3}},
    "model": {"name": "mlp", "widths": [64]},
    "codes": ["AC"],
    "switch_points": [0, 3, 6],
    "fractional_checkpoints": [],
    "seeds": [0],
    "phase1": {"epochs": 6, "lr": 0.05, "batch_size": 16, "lr_decay_epochs": [],
               "attack": {"eps": 0.1, "iters": 5}},
    "phase2": {"epochs": 3, "batch_size": 16, "lr": 0.01, "attack": {"eps": 0.1, "iters": 2}},
    "eval": {"linf": {"eps": 0.1, "iters": 5}, "l2": None, "transfer": False},
    "kernel": {"probe_size": 12},
    "sweep": {"resources": {"cpus": 1}},
}


STARTED: list[subprocess.Popen] = []  # every driver these tests start


def start_driver(path: Path, out: Path, env: dict[str, str]) -> subprocess.Popen:
    """``ntk-sweep run`` in its own process group (killed by ``stop_driver``)."""
    driver = subprocess.Popen([str(BIN / "ntk-sweep"), "run", str(path), "--out", str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    STARTED.append(driver)
    return driver


def stop_driver(driver: subprocess.Popen) -> None:
    """Kills what is left of a driver's process group (a test that failed half-way)."""
    if driver.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(30)


def heartbeats(out: Path) -> dict[str, dict]:
    return {t: state.heartbeat for t, state in trial_states(out).items() if state.heartbeat}


def wait_for(predicate, timeout: float, what: str, poll: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what}: not seen within {timeout} s")


def result_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("trials/*/results.json")):
        rows += [{k: v for k, v in r.items() if k != "seconds"}
                 for r in json.loads(path.read_text())["rows"]]
    return rows


def assert_no_duplicate_steps(client: MlflowClient, runs: list) -> None:
    """No (metric, step) logged twice in any of ``runs``, however often a trial was retried."""
    for run in runs:
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (run.info.run_name, key, steps)


def run_named(runs: list, name: str):
    (run,) = [r for r in runs if r.info.run_name == name]
    return run


@pytest.mark.slow
def test_killed_worker_in_phase1_then_phase2_resumes_to_the_same_result(tmp_path, ray_local):  # noqa: F811
    """The first kill lands between a fractional checkpoint (epoch 2.125, step 136) and the
    report of epoch 3: the retry resumes mid-epoch, and epoch 3's loss must still be the mean
    over the whole epoch (issue 11, item 3), as in the uninterrupted run."""
    space = parse_space({**SLOW, "fractional_checkpoints": [2.125]})
    reference = run_sweep(space, tmp_path / "reference")
    assert reference[0]["error"] == ""

    out = tmp_path / "faulty"
    killed: list[tuple[int, str, int]] = []

    def killer():
        def strike(phase: str, min_epoch: int, also=lambda: True):
            def ready():
                for beat in heartbeats(out).values():
                    if (beat["pid"] not in [k[0] for k in killed] and also()
                            and beat["stage"].startswith(phase) and beat["epoch"] >= min_epoch):
                        return beat
                return None

            beat = wait_for(ready, 240, f"a {phase} epoch >= {min_epoch}", poll=0.005)
            os.kill(beat["pid"], signal.SIGKILL)
            (after,) = heartbeats(out).values()  # what the worker reported before it died
            killed.append((beat["pid"], after["stage"], after["epoch"]))

        # The worker dies after the fractional checkpoint, before epoch 3 ends ...
        strike("phase1", 2, lambda: any(136 in CheckpointStore(p).steps()
                                        for p in out.glob("trajectories/*/trajectory.pack")))
        strike("phase2", 1)  # ... and its retry dies mid phase 2

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    records = run_sweep(space, out)
    thread.join(5)
    assert [(k[1].split("/")[0], k[2]) for k in killed][:1] == [("phase1", 2)], killed
    assert [k[1].split("/")[0] for k in killed] == ["phase1", "phase2"], killed
    assert records[0]["error"] == ""
    # The retries continued from the stored checkpoints: of 6 phase-1 epochs of A, the final
    # attempt trained none (the second attempt had finished phase 1 before it was killed).
    assert records[0]["phase1_epochs_trained"] == 0
    assert result_rows(out) == result_rows(tmp_path / "reference")  # bit for bit

    client = MlflowClient(tracking_uri(out))
    exp = client.get_experiment_by_name("fault-sweep")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    (trial,) = [r for r in runs if r.data.tags.get("kind") == "trial"]  # one run, continued
    assert trial.info.status == "FINISHED"
    assert_no_duplicate_steps(client, runs)
    trajectory = run_named(runs, "trajectory A seed 0")
    history = {m.step: m.value for m in
               client.get_metric_history(trajectory.info.run_id, "train_loss")}
    spe = int(min(history))
    assert sorted(history) == [e * spe for e in range(1, 7)]
    # Every epoch's loss, the resumed epoch 3 included, equals the uninterrupted run's.
    ref_client = MlflowClient(tracking_uri(tmp_path / "reference"))
    ref_exp = ref_client.get_experiment_by_name("fault-sweep")
    (ref_trajectory,) = ref_client.search_runs([ref_exp.experiment_id],
                                               "attributes.run_name = 'trajectory A seed 0'")
    assert history == {m.step: m.value for m in ref_client.get_metric_history(
        ref_trajectory.info.run_id, "train_loss")}
    assert len([r for r in runs if r.data.tags.get("kind") == "switch_run"]) == 3


@pytest.mark.slow
def test_worker_killed_between_a_child_run_and_its_metrics_completes_it(tmp_path):
    """The worker dies right after MLflow created an evaluated model's run, before its metrics
    (a failpoint: no outside observer can hit that instant). The retry completes that run;
    none is left RUNNING or empty, none is made twice, and report sees every model."""
    import ray

    from sweep.review import mlflow_rows
    from sweep.tracking import FAILPOINT

    marker = tmp_path / "killed"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={
        "env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3", FAILPOINT: f"child-run-created:{marker}"}})
    try:
        space = parse_space({**SLOW, "name": "child-sweep", "switch_points": [0, 2],
                             "phase1": {**SLOW["phase1"], "epochs": 2}})
        records = run_sweep(space, tmp_path / "out")
    finally:
        ray.shutdown()
    assert marker.exists()  # the worker was killed there, once
    assert records[0]["error"] == ""
    client = MlflowClient(tracking_uri(tmp_path / "out"))
    exp = client.get_experiment_by_name("child-sweep")
    models = [r for r in client.search_runs([exp.experiment_id], max_results=1000)
              if r.data.tags.get("kind") in ("switch_run", "network")]
    names = sorted(r.info.run_name for r in models)
    assert len(names) == len(set(names)) == 4  # AC and A- at switch points 0 and 2
    assert all(r.info.status == "FINISHED" and "accuracy" in r.data.metrics for r in models)
    rows, _, _ = mlflow_rows(tracking_uri(tmp_path / "out"), "child-sweep")
    assert len(rows) == 4


@pytest.mark.slow
def test_lost_node_its_trials_are_rescheduled(tmp_path):
    space = {**SLOW, "name": "node-sweep", "seeds": [0, 1],
             "phase1": {**SLOW["phase1"], "epochs": 12}, "switch_points": [0, 6, 12]}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    out = tmp_path / "out"
    fast_failover = {"RAY_health_check_period_ms": "1000",
                     "RAY_health_check_failure_threshold": "3"}
    with ray_cluster(nodes=2, cpus=1, extra_env=fast_failover) as env:
        driver = start_driver(path, out, {**env, "MLFLOW_TRACKING_URI": "",
                                          "NTK_SWEEP_STORAGE": ""})
        try:
            # Both trials running, one per node; then every process of the second node dies.
            wait_for(lambda: len({b["node"] for b in heartbeats(out).values()}) == 2, 240,
                     "trials on both nodes", poll=0.1)
            second = env["NTK_TEST_NODES"].split(",")[1]
            victims = processes_with_env("NTK_TEST_NODE", second)
            assert victims
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            stdout, stderr = driver.communicate(timeout=480)
        finally:
            stop_driver(driver)
        assert driver.returncode == 0, stderr[-4000:]
    assert "2 trials, 0 failed" in stdout
    assert len(finished_trials(out)) == 2
    client = MlflowClient(tracking_uri(out))
    exp = client.get_experiment_by_name("node-sweep")
    trials = [r for r in client.search_runs([exp.experiment_id], max_results=1000)
              if r.data.tags.get("kind") == "trial"]
    assert sorted(t.data.params["seed"] for t in trials) == ["0", "1"]
    assert all(t.info.status == "FINISHED" for t in trials)


def processes_with_env(name: str, value: str) -> list[int]:
    """PIDs of processes whose environment has ``name=value``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{name}={value}".encode() in environ:
            found.append(int(proc.name))
    return found


@pytest.mark.slow
def test_tracking_server_down_mid_sweep_loses_nothing(tmp_path):
    path = tmp_path / "space.yaml"
    space = {**SLOW, "name": "outage-sweep", "phase1": {**SLOW["phase1"], "epochs": 20},
             "switch_points": [0, 10, 20]}
    path.write_text(yaml.safe_dump(space))
    out = tmp_path / "out"
    port = free_port()
    with mlflow_server(tmp_path / "server", port=port) as uri:
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "NTK_SWEEP_STORAGE": "",
               "RAY_ADDRESS": ""}
        driver = start_driver(path, out, env)
        try:
            wait_for(lambda: any(b["stage"].startswith("phase1") and b["epoch"] >= 1
                                 for b in heartbeats(out).values()), 240, "phase 1 under way")
            (server,) = [p for p in processes_mentioning(f"--port {port}")
                         if os.getpgid(p) == p]
            os.killpg(server, signal.SIGKILL)  # the server dies at once, mid-sweep
        except BaseException:
            stop_driver(driver)
            raise
    try:
        # The server is down: training goes on, writes queue up. Each epoch queues at least
        # one write: three queued writes and a later epoch mean the trial trained on while
        # nothing reached the server.
        (at_outage,) = [(b["stage"], b["epoch"]) for b in heartbeats(out).values()]
        wait_for(lambda: any(b["pending_writes"] >= 3 and (b["stage"], b["epoch"]) != at_outage
                             for b in heartbeats(out).values()), 240,
                 "epochs trained while the server is down", poll=0.1)
        with mlflow_server(tmp_path / "server", port=port) as uri:  # back, same store
            stdout, stderr = driver.communicate(timeout=480)
            assert driver.returncode == 0, stderr[-4000:]
            assert "1 trials, 0 failed" in stdout
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name("outage-sweep")
            runs = client.search_runs([exp.experiment_id], max_results=1000)
            (trial,) = [r for r in runs if r.data.tags.get("kind") == "trial"]
            assert trial.info.status == "FINISHED"
            trajectory = run_named(runs, "trajectory A seed 0").info.run_id
            history = client.get_metric_history(trajectory, "train_loss")
            assert sorted(m.step for m in history) == [64 * e for e in range(1, 21)]  # all
            for t in (0, 10, 20):  # 64 steps per epoch
                model = run_named(runs, f"AC t={t} seed 0").info.run_id
                curve = client.get_metric_history(model, "train_loss")
                assert sorted(m.step for m in curve) == [64, 128, 192]
            assert_no_duplicate_steps(client, runs)
            assert len([r for r in runs if r.data.tags.get("kind") == "switch_run"]) == 3
            assert len(client.get_metric_history(trajectory, "to_init")) == 21
    finally:
        stop_driver(driver)
    assert not list(out.glob("trials/*/pending_mlflow_writes.json"))


@pytest.mark.slow
def test_local_mlflow_database_deleted_mid_sweep_fails_fast_with_the_summary(tmp_path, ray_local):  # noqa: F811
    """A local store's loss is not an outage to wait out: the next trial fails at once naming
    the file, no fresh empty database is made, and the summary is written from the trial
    files (the command prints it, then the error; exit code 1)."""
    space = parse_space({**SLOW, "name": "lost-db", "seeds": [0, 1], "switch_points": [0, 2],
                         "phase1": {**SLOW["phase1"], "epochs": 2},
                         "sweep": {**SLOW["sweep"], "max_concurrent_trials": 1}})
    out = tmp_path / "out"
    db = out / "mlflow.db"
    deleted: list[float] = []

    def delete_after_the_first_trial():
        wait_for(lambda: finished_trials(out), 240, "a finished trial")
        db.unlink()
        deleted.append(time.monotonic())

    thread = threading.Thread(target=delete_after_the_first_trial, daemon=True)
    thread.start()
    with pytest.raises(SweepTrackingLost) as caught:
        run_sweep(space, out)
    thread.join(5)
    assert time.monotonic() - deleted[0] < 120, "waited for the database as for a server"
    assert str(caught.value).startswith(f"{db}: the sweep's MLflow database was deleted")
    assert not db.exists()  # no new, empty database
    records = caught.value.records
    assert len(records) == 2 and [bool(r["error"]) for r in records].count(True) == 1
    assert str(db) in next(r["error"] for r in records if r["error"])
    summary = (out / "summary.md").read_text()
    assert "| AC " in summary and str(db) in summary, summary  # the finished trial's rows


@pytest.mark.slow
def test_tracking_server_down_at_start_is_refused_before_ray(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SLOW))
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = subprocess.run([str(BIN / "ntk-sweep"), "run", str(path), "--out",
                           str(tmp_path / "out")],
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_ADDRESS": ""},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"MLFLOW_TRACKING_URI: the MLflow tracking server at {uri} does not answer" \
        in done.stderr
    assert not (tmp_path / "out").exists()  # nothing started, nothing written
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_a_diverging_trial_fails_alone_and_is_listed(tmp_path, ray_local):  # noqa: F811
    space = parse_space({**SLOW, "name": "nan-sweep", "codes": ["CC"],
                         "phase1": {**SLOW["phase1"], "epochs": 2, "lr": {"grid": [0.05, 1e30]}},
                         "switch_points": [0, 2]})
    records = run_sweep(space, tmp_path)
    by_lr = {r["phase1.lr"]: r for r in records}
    assert by_lr[0.05]["error"] == "" and by_lr[0.05]["robust_linf"] >= 0
    assert "TrialFailed" in by_lr[1e30]["error"]
    ((failed, error),) = [(t, s.error) for t, s in trial_states(tmp_path).items() if s.error]
    assert error.startswith("phase 1 (data mode C, seed 0, lr 1e+30): loss is ")
    assert "in epoch 1 (step 64): training diverged" in error
    summary = (tmp_path / "summary.md").read_text()
    assert f"trial {failed} (phase1.lr=1e+30): {error}" in summary
    client = MlflowClient(tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("nan-sweep")
    statuses = sorted(r.info.status for r in client.search_runs(
        [exp.experiment_id], "tags.kind = 'trial'"))
    assert statuses == ["FAILED", "FINISHED"]


def test_no_driver_of_this_module_is_left_running():
    assert [d.pid for d in STARTED if d.poll() is None] == []
