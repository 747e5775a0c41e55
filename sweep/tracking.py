"""MLflow through an explicit client: runs are addressed by id, so Ray workers need no global
MLflow state. The experiment is created by the driver (Ray's ``setup_mlflow`` would not)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from core.timing import timed

PARENT_TAG = "mlflow.parentRunId"


class _TimedClient:
    """``MlflowClient`` whose calls add to the ``mlflow`` wall-time total."""

    def __init__(self, client: MlflowClient):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with timed("mlflow"):
                return attr(*args, **kwargs)

        return call


class Tracker:
    """A thin layer over ``MlflowClient`` for one tracking URI."""

    def __init__(self, tracking_uri: str):
        self.uri = tracking_uri
        self.client = _TimedClient(MlflowClient(tracking_uri=tracking_uri))

    @property
    def local(self) -> bool:
        """Whether the store is a local database (artifacts then go beside it)."""
        return self.uri.startswith(("sqlite:", "file:")) or "://" not in self.uri

    def experiment(self, name: str, artifact_root: Path | None = None) -> str:
        """The id of experiment ``name``, created if missing (artifacts under the root for a
        local store; a tracking server chooses its own artifact store)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if artifact_root is not None and self.local:
            location = artifact_root.absolute().as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def start(self, experiment_id: str, name: str, tags: dict[str, Any],
              parent: str | None = None) -> str:
        """Creates a run (a child of ``parent`` if given) and returns its id."""
        tags = {k: str(v) for k, v in tags.items()}
        if parent is not None:
            tags[PARENT_TAG] = parent
        return self.client.create_run(experiment_id, tags=tags, run_name=name).info.run_id

    def log(self, run_id: str, metrics: dict[str, float], step: int = 0,
            skip: set[tuple[str, int]] | None = None) -> None:
        """Logs metrics at ``step``, leaving out (metric, step) pairs in ``skip``."""
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if skip is None or (k, step) not in skip]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def params(self, run_id: str, params: dict[str, Any]) -> None:
        self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def reopen(self, run_id: str) -> None:
        """Marks a run that a restored trial continues as running again."""
        self.client.update_run(run_id, status="RUNNING")

    def logged(self, run_id: str) -> set[tuple[str, int]]:
        """(metric, step) pairs already in the run, so a resumed trial logs none twice."""
        seen = set()
        for key in self.client.get_run(run_id).data.metrics:
            seen |= {(key, m.step) for m in self.client.get_metric_history(run_id, key)}
        return seen

    def children(self, run_id: str) -> dict[str, str]:
        """{run name: run id} of the run's child runs."""
        runs = self.client.search_runs(
            [self.client.get_run(run_id).info.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{run_id}'", max_results=50_000)
        return {r.info.run_name: r.info.run_id for r in runs}

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)
