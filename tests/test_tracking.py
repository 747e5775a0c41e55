"""sweep.tracking against a real MLflow store (SQLite): what a retried trial finds and does."""

from __future__ import annotations

from pathlib import Path

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


def _bulk_sweep(uri: str, trials: int, children: int) -> tuple[str, str]:
    """A sweep's runs written straight into MLflow's SQLite tables (seconds, where the client
    would take an hour): a parent, ``trials`` finished trial runs, and under each ``children``
    evaluated models (seed = trial, code CC, switch epochs 0..children-1) with their
    ``accuracy`` and ``worst_linf``. Returns (experiment id, parent run id)."""
    import uuid

    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlRun, SqlTag
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    client = MlflowClient(uri)
    exp = client.create_experiment("big")
    parent = client.create_run(exp, run_name="sweep", tags={"kind": "sweep"}).info.run_id
    runs, tags, metrics = [], [], []

    def run(name: str, parent_id: str, run_tags: dict[str, str]) -> str:
        rid = uuid.uuid4().hex
        runs.append(dict(run_uuid=rid, name=name, source_type="LOCAL", source_name="",
                         entry_point_name="", user_id="test", status="FINISHED",
                         start_time=len(runs), end_time=len(runs), source_version="",
                         lifecycle_stage="active", artifact_uri="", experiment_id=int(exp)))
        tags.extend(dict(key=k, value=v, run_uuid=rid)
                    for k, v in {PARENT_TAG: parent_id, **run_tags}.items())
        return rid

    for t in range(trials):
        trial = run(f"trial {t}", parent, {"kind": "trial"})
        for c in range(children):
            rid = run(f"CC t={c}", trial, {"kind": "switch_run", "seed": str(t), "code": "CC",
                                           "dynamics": "centered", "switch_epoch": str(c)})
            metrics.extend(dict(key=k, value=v, timestamp=0, step=0, is_nan=False,
                                run_uuid=rid) for k, v in (("accuracy", 0.5),
                                                           ("worst_linf", c / children)))
    store = SqlAlchemyStore(uri, str(Path(uri.removeprefix("sqlite:///")).parent / "art"))
    with store.ManagedSessionMaker() as session:
        session.bulk_insert_mappings(SqlRun, runs)
        session.bulk_insert_mappings(SqlTag, tags)
        session.bulk_insert_mappings(SqlLatestMetric, metrics)
    return exp, parent


def test_a_report_reads_every_run_past_any_page_or_cap(tmp_path):
    """51,001 runs: more than one MLflow search answers (50,000), so a capped read truncates
    the report silently. Every evaluated model must come back, each once."""
    from sweep.inspect import mlflow_rows

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, parent = _bulk_sweep(uri, trials=1000, children=50)
    rows, trials = mlflow_rows(uri, "big", parent)
    assert len(trials) == 1000
    assert len(rows) == 50_000
    assert len({(r["seed"], r["switch_epoch"]) for r in rows}) == 50_000


def test_children_are_read_page_by_page(tmp_path, monkeypatch):
    import sweep.tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp, parent = _bulk_sweep(uri, trials=1, children=23)
    trial = next(r.info.run_id for r in MlflowClient(uri).search_runs(
        [exp], "tags.kind = 'trial'"))
    monkeypatch.setattr(sweep.tracking, "PAGE", 5)  # 23 children: five requests
    done, broken = Tracker(uri, existing=True).children(trial)
    assert len(done) == 23 and not broken
