"""MLflow through an explicit client: runs are addressed by id, so Ray workers need no global
MLflow state. The experiment is created by the driver (Ray's ``setup_mlflow`` would not)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"


class Tracker:
    """A thin layer over ``MlflowClient`` for one tracking URI."""

    def __init__(self, tracking_uri: str):
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)

    def experiment(self, name: str, artifact_root: Path | None = None) -> str:
        """The id of experiment ``name``, created if missing (artifacts under the root)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = artifact_root.absolute().as_uri() if artifact_root is not None else None
        return self.client.create_experiment(name, artifact_location=location)

    def start(self, experiment_id: str, name: str, tags: dict[str, Any],
              parent: str | None = None) -> str:
        """Creates a run (a child of ``parent`` if given) and returns its id."""
        tags = {k: str(v) for k, v in tags.items()}
        if parent is not None:
            tags[PARENT_TAG] = parent
        return self.client.create_run(experiment_id, tags=tags, run_name=name).info.run_id

    def log(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(run_id, metrics=batch)

    def params(self, run_id: str, params: dict[str, Any]) -> None:
        self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def artifact(self, run_id: str, path: Path) -> None:
        self.client.log_artifact(run_id, str(path))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)
