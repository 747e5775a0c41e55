"""The sweep commands end to end, as a user runs them: ``run`` killed mid-sweep (SIGKILL of
the driver's process group), then ``status``, ``resume``, ``report`` and ``compare``."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.helpers import QUIET, SWEEP, finished_trials, trial_states
from tests.servers import BIN, processes_mentioning, processes_with_environment

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "RAY_ADDRESS": "",
       "MLFLOW_TRACKING_URI": "", "NTK_SWEEP_STORAGE": ""}


def ntk_sweep(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ntk-sweep"), *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


@pytest.mark.slow
def test_killed_driver_then_status_resume_report_compare(tmp_path):
    space = {**SWEEP, "name": "cli-sweep", "seeds": [0, 1, 2], "switch_rule": None,
             "sweep": {"resources": {"cpus": 1}, "max_concurrent_trials": 1}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    out = tmp_path / "out"
    # The killed driver's Ray session lives here (short: Ray's socket paths are limited).
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    env = {**ENV, "RAY_TMPDIR": str(ray_tmp)}
    driver = subprocess.Popen([str(BIN / "ntk-sweep"), "run", str(path), "--out", str(out)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not finished_trials(out):  # a trial has finished
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in 300 s"
            time.sleep(0.5)
        time.sleep(1.0)  # let the finished trial's last report reach the driver
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(30)
    # The dead driver's Ray daemons and workers, if any (a worker may otherwise finish the
    # trial it runs after the snapshot below: a reused worker runs a tiny trial in seconds).
    for pid in {*processes_mentioning(str(ray_tmp)), *processes_with_environment(str(ray_tmp))}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    finished_before = {t: (out / "trials" / t / "results.json").stat().st_mtime_ns
                       for t in finished_trials(out)}
    assert 1 <= len(finished_before) < 3

    status = ntk_sweep("status", str(out))
    assert status.returncode == 0, status.stderr
    for noise in QUIET:  # Tune's warning that its (disabled) result files are missing
        assert noise not in status.stdout + status.stderr, noise
    # What the trial files say, not Tune's state as the killed driver last saved it.
    assert f"cli-sweep: 3 trials: {len(finished_before)} finished" in status.stdout or \
        re.search(rf"cli-sweep: 3 trials: .*\b{len(finished_before)} finished", status.stdout), \
        status.stdout

    resumed = ntk_sweep("resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "3 trials, 0 failed" in resumed.stdout
    for noise in QUIET:  # the driver says what it does, not what its libraries do
        assert noise not in resumed.stdout + resumed.stderr, noise
    # Trial workers ran at nice 0 (sweep.worker_niceness), not at Ray's default of +15.
    beats = [state.heartbeat for state in trial_states(out).values()]
    assert beats and {b["nice"] for b in beats} == {0}
    # One trial at a time: the trials the resumed driver ran shared one worker process
    # (reuse_actors), so fewer worker processes than trials.
    assert len({b["pid"] for b in beats}) < len(beats) == 3
    # Finished trials were not run again; every trial has its results now.
    for trial, mtime in finished_before.items():
        assert (out / "trials" / trial / "results.json").stat().st_mtime_ns == mtime
    assert len(list(out.glob("trials/*/results.json"))) == 3

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cli-sweep")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    trials = [r for r in runs if r.data.tags.get("kind") == "trial"]
    assert sorted(r.data.params["seed"] for r in trials) == ["0", "1", "2"]  # one per trial
    assert all(r.info.status == "FINISHED" for r in trials)
    for r in runs:  # no metric step logged twice, interrupted or not
        for key in r.data.metrics:
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert len(steps) == len(set(steps)), (r.info.run_name, key, steps)
    switch_runs = [r for r in runs if r.data.tags.get("kind") == "switch_run"]
    assert len(switch_runs) == 3 * 2 * 3  # seeds x codes x switch points, none twice

    # The report rebuilt from MLflow alone equals the one written from the trial files.
    report = ntk_sweep("report", str(out))
    assert report.returncode == 0, report.stderr
    assert (out / "report" / "summary.md").read_text() == (out / "summary.md").read_text()
    assert (out / "report" / "kernel_distances.png").stat().st_size > 0
    # The claims too (section of both summaries): from MLflow's metrics as from the files.
    assert "## The paper's claims" in (out / "summary.md").read_text()
    claims = ntk_sweep("claims", str(out))
    assert claims.returncode == 0, claims.stderr
    assert "the paper's claims" in claims.stdout
    assert (out / "claims.md").read_text() == (out / "report" / "claims.md").read_text()

    # A moved output directory reads its own files (paths in sweep.json are relative to it);
    # resume refuses to continue it away from where it ran, and touches nothing.
    moved = tmp_path / "moved"
    out.rename(moved)
    status = ntk_sweep("status", str(moved))
    assert status.returncode == 0 and "3 trials: 3 finished" in status.stdout, status.stderr
    report = ntk_sweep("report", str(moved), "--to", str(tmp_path / "moved-report"))
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "moved-report" / "summary.md").read_text() == \
        (moved / "summary.md").read_text()
    refused = ntk_sweep("resume", str(moved))
    assert refused.returncode == 2 and f"this sweep ran in {out}" in refused.stderr, \
        refused.stderr[-2000:]
    assert not out.exists()
    moved.rename(out)

    # compare: trajectories named by trial run id and data mode, as MLflow shows them.
    by_seed = {r.data.params["seed"]: r.info.run_id for r in trials}
    compared = ntk_sweep("compare", f"{by_seed['0']}/C", f"{by_seed['1']}/C", "--store",
                         str(out), "--to", str(tmp_path / "cmp"))
    assert compared.returncode == 0, compared.stderr
    with (tmp_path / "cmp" / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["epoch"]) for r in rows] == [0, 1, 2]
    parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    history = client.get_metric_history(parent.info.run_id, "kernel/cross/C0-C1/distance")
    assert [round(float(r["distance"]), 5) for r in rows] == \
        [round(m.value, 5) for m in sorted(history, key=lambda m: m.step)]

    # Tune's state as a driver killed within a second of starting the next trials saved it
    # (it happened: a reused worker finished a tiny trial in that second): the one trial it
    # knew of. Status counts the others from their files, named by the experiment's prefix.
    for state_file in (out / "ray" / "cli-sweep").glob("experiment_state-*.json"):
        saved = json.loads(state_file.read_text())
        saved["trial_data"] = saved["trial_data"][:1]
        state_file.write_text(json.dumps(saved))
    (out / "trials" / "other_00000").mkdir()  # another experiment's prefix: not this sweep's
    status = ntk_sweep("status", str(out))
    assert status.returncode == 0 and "3 trials: 3 finished" in status.stdout, status.stdout


@pytest.mark.slow
def test_sweep_commands_name_what_is_missing(tmp_path):
    for command in ("status", "resume", "report"):
        result = ntk_sweep(command, str(tmp_path))
        assert result.returncode == 2
        assert f"{tmp_path}/sweep.json: not found" in result.stderr
    result = ntk_sweep("compare", "abc123", "def456", "--store", str(tmp_path))
    assert result.returncode == 2 and "abc123: no trajectory with this id" in result.stderr
    assert sys.executable  # the commands ran from this environment's bin


def test_report_against_an_unreachable_server_exits_2_at_once(tmp_path):
    """It used to retry for minutes (MLflow's HTTP retries) and end in a traceback."""
    from tests.servers import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    result = ntk_sweep("report", "--tracking-uri", uri, "--experiment", "x",
                       "--to", str(tmp_path / "report"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--tracking-uri: the MLflow tracking server at {uri} does not answer" in result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - t0 < 60


GOOD_STATE = {"name": "s", "space": {"seeds": [0]}, "storage": "/nonexistent/ray",
              "tracking_uri": "sqlite:////nonexistent/mlflow.db", "experiment_id": "1",
              "parent_run": "abc"}


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\xff", "not text"),
    (b"[1, 2]", "a JSON list, not the dict"),
    (b"{}", "name: missing"),
    (b'{"name": "s"', "not valid JSON"),
    (json.dumps({**GOOD_STATE, "parent_run": 5}).encode(), "parent_run: a int, not a str"),
    (json.dumps({k: v for k, v in GOOD_STATE.items() if k != "storage"}).encode(),
     "storage: missing"),
    (json.dumps({**GOOD_STATE, "space": {"seeds": "zero"}}).encode(), "space"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
])
def test_damaged_sweep_state_exits_2_naming_the_file(tmp_path, capsys, content, message):
    from sweep.cli import main

    (tmp_path / "sweep.json").write_bytes(content)
    for command in ("status", "resume", "report"):
        assert main([command, str(tmp_path)]) == 2, command
        err = capsys.readouterr().err
        assert f"{tmp_path}/sweep.json" in err and message in err, (command, err)


def test_trial_rows_show_each_trial_state_values_stage_and_progress():
    """``run --trials``: a table of the trials, as Tune's reporter shows it, from what the
    trials reported: state, swept values, seed, stage (kernels while it computes them),
    progress and the running metric; a trial that has not reported shows dashes."""
    from ray.tune.experiment import Trial
    from rich.console import Console

    from sweep.layout import CONTEXT_KEY
    from sweep.progress import SweepProgress

    context = {CONTEXT_KEY: {"base": {"seeds": [0]}}}
    trials = [Trial("trial", config={"phase2.lr": lr, **context}, stub=True)
              for lr in (0.01, 0.1)]
    progress = SweepProgress(trials=2, models=4, metric="robust_linf", mode="max", rows=True)
    progress.on_trial_result(0, trials, trials[0], {
        "stage": "phase2/AC/s0/t=1", "progress": 0.5, "robust_linf": 0.25})
    progress.on_trial_result(0, trials, trials[1], {"computing_kernels": 1, "progress": 0.9})
    console = Console(width=200, record=True)
    console.print(progress.table(trials))
    lines = console.export_text().splitlines()
    first = next(line for line in lines if line.startswith(trials[0].trial_id)).split()
    assert first == [trials[0].trial_id, "pending", "phase2.lr=0.01", "0", "phase2/AC/s0/t=1",
                     "50", "%", "0.2500"]
    second = next(line for line in lines if line.startswith(trials[1].trial_id)).split()
    assert second[3:] == ["0", "kernels", "90", "%", "-"]
