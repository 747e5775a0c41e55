"""sweep.tracking against a real MLflow store (SQLite): what a retried trial finds and does."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from sweep.tracking import PARENT_TAG, Tracker


def test_a_child_run_an_attempt_left_empty_is_completed_not_skipped(tmp_path):
    """A worker killed between creating an evaluated model's run and logging its metrics left
    it RUNNING and empty for good: the retry found it by name and skipped it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, buffered=True)
    experiment = tracker.experiment("sweep", tmp_path / "artifacts")
    parent = tracker.start(experiment, "trial", {"kind": "trial"})
    client = MlflowClient(uri)
    # What the killed attempts left: one child created, nothing logged; one with one metric.
    empty = client.create_run(experiment, tags={PARENT_TAG: parent}, run_name="CC-s0-t2")
    half = client.create_run(experiment, tags={PARENT_TAG: parent}, run_name="AC-s0-t2")
    client.log_metric(half.info.run_id, "accuracy", 0.5, step=0)
    done = client.create_run(experiment, tags={PARENT_TAG: parent}, run_name="CC-s0-t0")
    client.set_terminated(done.info.run_id, "FINISHED")

    # The retry (sweep.runner.trial): finished children are skipped, the others completed.
    finished, unfinished = tracker.children(parent)
    assert set(finished) == {"CC-s0-t0"} and set(unfinished) == {"CC-s0-t2", "AC-s0-t2"}
    for name in ("CC-s0-t2", "AC-s0-t2"):
        tracker.child(experiment, name, {"kind": "switch_run"}, parent,
                      {"accuracy": 0.5, "robust_linf": 0.25}, existing=unfinished[name])
    assert tracker.flush(10.0)

    runs = client.search_runs([experiment], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
    assert sorted(r.info.run_name for r in runs) == ["AC-s0-t2", "CC-s0-t0", "CC-s0-t2"]
    for run_id in (empty.info.run_id, half.info.run_id):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.metrics == {"accuracy": 0.5, "robust_linf": 0.25}
        assert len(client.get_metric_history(run_id, "accuracy")) == 1  # not logged twice
