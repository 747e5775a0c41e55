"""MLflow through an explicit client: runs are addressed by id, so Ray workers need no global
MLflow state. The experiment is created by the driver (Ray's ``setup_mlflow`` would not)."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from core.timing import timed
from sweep.layout import read_json, write_json
from sweep.mlflow_runs import EXPERIMENT_KIND, PARENT_TAG

PAGE = 10_000  # runs per MLflow search request; every search pages through all of them


def search_all(client: Any, experiment_ids: list[str], filter_string: str = "") -> list[Any]:
    """Every run that matches, page by page (``PAGE`` a request): no cap on how many, so a
    sweep's report and resume never see a truncated list (MLflow answers at most 50,000 runs
    a request)."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=PAGE,
                                  page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs
LOG = logging.getLogger("ntk_sweep")


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


FAILPOINT = "NTK_SWEEP_FAILPOINT"  # <name>:<marker file>, for the fault-injection tests


def failpoint(name: str) -> None:
    """SIGKILLs this process at the named point, once (the marker file records it), when
    ``NTK_SWEEP_FAILPOINT`` is ``<name>:<marker file>``: a test can kill a worker at an
    instant no outside observer can hit (e.g. between creating a run and logging to it)."""
    wanted, _, marker = os.environ.get(FAILPOINT, "").partition(":")
    if wanted == name and marker:
        try:
            with open(marker, "x"):
                pass
        except FileExistsError:
            return
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class TrackingStoreLost(RuntimeError):
    """The sweep's local MLflow database was deleted, replaced or cannot be written. Unlike an
    unreachable server it does not come back by waiting: never retried, never queued for
    later (MLflow would otherwise write into a new, empty database); names the file."""


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI, else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def transient(error: BaseException) -> bool:
    """Whether an MLflow call failed because the server could not be reached or answered
    with a server error (worth retrying), rather than because the request was wrong."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, requests.exceptions.RequestException | ConnectionError | TimeoutError):
        return True
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        text = str(error)
        return status >= 500 or "API request to" in text or "Connection" in text
    return False


WAIT_S = float(os.environ.get("NTK_SWEEP_TRACKING_WAIT_S", "900"))
RETRY_EVERY_S = 5.0
MAX_BACKOFF_S = 30.0  # the longest wait between two tries of an MLflow request
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value (longer ones are cut)
MAX_TAG_CHARS = 5000  # what a tag keeps of an error message (MLflow allows 8000)
BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's per log_batch request
MAX_BATCH_ENTITIES = 1000  # and all three together


class Tracker:
    """A thin layer over ``MlflowClient`` for one tracking URI.

    With ``buffered=True`` (trials), writes that fail because the server is unreachable are
    queued in order and retried at the next write (at most every 5 s) and by ``flush``, so
    training goes on while the server is down and nothing logged is lost; reads and run
    creation retry for up to ``NTK_SWEEP_TRACKING_WAIT_S`` seconds (default 900).
    """

    def __init__(self, tracking_uri: str, buffered: bool = False, existing: bool = False):
        """``existing``: the store is a sweep's that must be there already (trials, resume);
        a local database that is missing raises TrackingStoreLost instead of being made anew."""
        self.uri = tracking_uri
        self.database = sqlite_file(tracking_uri)
        self._database_id: tuple[int, int] | None = None
        if existing:  # before the client: MLflow creates a missing database when it connects
            self._guard(must_exist=True)
        self.client = _TimedClient(MlflowClient(tracking_uri=tracking_uri))
        self.buffered = buffered
        self.pending: list[dict[str, Any]] = []
        self._last_failure = -math.inf

    def _guard(self, must_exist: bool = False) -> None:
        """For a local database: TrackingStoreLost if the file this tracker has used (or, with
        ``must_exist``, any file) is not at its path any more, or another file is."""
        if self.database is None:
            return
        try:
            st = self.database.stat()
        except FileNotFoundError:
            if self._database_id is None and not must_exist:
                return  # first use: MLflow creates it
            raise TrackingStoreLost(f"{self.database}: the sweep's MLflow database was deleted "
                                    "or moved while the sweep ran") from None
        ident = (st.st_dev, st.st_ino)
        if self._database_id is None:
            self._database_id = ident
        elif ident != self._database_id:
            raise TrackingStoreLost(f"{self.database}: the sweep's MLflow database was replaced "
                                    "by another file while the sweep ran")

    def _lost(self, error: BaseException) -> TrackingStoreLost | None:
        """A local store's failure as TrackingStoreLost (None for a remote store, and for a
        write MLflow refused for itself, such as a changed param)."""
        from mlflow.exceptions import MlflowException

        if isinstance(error, TrackingStoreLost):
            return error
        if self.database is None or (isinstance(error, MlflowException)
                                     and error.get_http_status_code() < 500):
            return None
        lines = str(error).splitlines() or [""]
        detail = next((line for line in lines if "sqlite3." in line), lines[0])
        return TrackingStoreLost(f"{self.database}: MLflow cannot use the sweep's database "
                                 f"({type(error).__name__}: {detail[:300]})")

    # --- writes: queued when the server is unreachable (buffered trackers) ---------------

    def _do(self, op: dict[str, Any]) -> None:
        """Performs one queued write. Ops are plain JSON data (see ``save_pending``): metrics
        as [key, value, timestamp, step], params and tags as [key, value]."""
        kind, c = op["kind"], self.client
        self._guard()
        if kind == "batch":
            self._deliver(op, ("params", "tags", "metrics"))
        elif kind == "artifact":
            c.log_artifact(op["run"], op["path"], op["artifact_path"])
            if op.get("move"):
                Path(op["path"]).unlink(missing_ok=True)
        elif kind == "end":
            c.set_terminated(op["run"], op["status"])
        elif kind == "child":  # create, log, end; a retry goes on from where it failed
            if "run" not in op:
                op["run"] = c.create_run(op["experiment"], tags=op["tags"],
                                         run_name=op["name"]).info.run_id
                failpoint("child-run-created")
            self._deliver(op, ("params", "metrics"))  # its tags went with create_run
            c.set_terminated(op["run"], "FINISHED")

    def _deliver(self, op: dict[str, Any], keys: Sequence[str]) -> None:
        """Sends the op's ``keys`` lists to its run in as few ``log_batch`` requests as MLflow's
        limits allow (``BATCH_LIMITS``), removing each part from the op once the server has it: a
        retry after a failed request sends only the rest (and so does an attempt that loads
        the op from ``save_pending``), so no metric point is logged twice."""
        entity = {"params": Param, "tags": RunTag, "metrics": Metric}
        while any(op.get(key) for key in keys):
            # One request takes what fits of every list (a child run's params and metrics
            # together): each list within its limit, all within MAX_BATCH_ENTITIES.
            taken, room = {}, MAX_BATCH_ENTITIES
            for key in keys:
                taken[key] = min(len(op.get(key) or []), BATCH_LIMITS[key], room)
                room -= taken[key]
            self.client.log_batch(op["run"], **{
                key: [entity[key](*item) for item in op[key][:n]]
                for key, n in taken.items() if n})
            for key, n in taken.items():
                if n:
                    del op[key][:n]

    def _submit(self, op: dict[str, Any]) -> None:
        if not self.buffered:
            self._do(op)
            return
        self.pending.append(op)
        if time.monotonic() - self._last_failure >= RETRY_EVERY_S:
            self.flush(0.0)

    def flush(self, wait_s: float = WAIT_S) -> bool:
        """Sends queued writes in order, retrying for up to ``wait_s`` seconds; True once the
        queue is empty. A write the server refuses for itself (not for being unreachable) is
        dropped with a warning, so one bad write cannot hold back the others."""
        deadline, delay = time.monotonic() + wait_s, 1.0
        while self.pending:
            try:
                self._do(self.pending[0])
            except Exception as e:
                if (lost := self._lost(e)) is not None:
                    raise lost from e
                if not transient(e):  # refused for itself: set aside, the rest goes on
                    op = self.pending.pop(0)
                    LOG.warning("MLflow refused a %s write (%s: %s); it is dropped",
                                op["kind"], type(e).__name__, str(e)[:300])
                    continue
                self._last_failure = time.monotonic()
                if time.monotonic() + delay > deadline:
                    return False
                time.sleep(delay)
                delay = min(2 * delay, MAX_BACKOFF_S)
                continue
            self.pending.pop(0)
        return True

    def save_pending(self, path: Path) -> None:
        """Writes the queued writes to ``path`` (JSON, atomically), or removes it if none."""
        if not self.pending:
            path.unlink(missing_ok=True)
            return
        write_json(path, self.pending)

    def load_pending(self, path: Path) -> int:
        """Queues the writes a previous attempt saved with ``save_pending``; returns how many."""
        if not path.is_file():
            return 0
        ops = read_json(path, list)
        self.pending = ops + self.pending
        return len(ops)

    def _retrying(self, fn, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args)``, retried while the server is unreachable, for up to ``WAIT_S``."""
        deadline, delay = time.monotonic() + (WAIT_S if self.buffered else 0), 1.0
        while True:
            try:
                self._guard()
                return fn(*args, **kwargs)
            except Exception as e:
                if (lost := self._lost(e)) is not None:
                    raise lost from e
                if not transient(e) or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, MAX_BACKOFF_S)

    @property
    def local(self) -> bool:
        """Whether the store is a local database (artifacts then go beside it)."""
        return self.uri.startswith(("sqlite:", "file:")) or "://" not in self.uri

    def check(self) -> None:
        """Raises (the client's error) unless the store answers a simple query."""
        self.client.search_experiments(max_results=1)

    def experiment(self, name: str, artifact_root: Path | None = None) -> str:
        """The id of experiment ``name``, created if missing (artifacts under the root for a
        local store; a tracking server chooses its own artifact store)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if artifact_root is not None and self.local:
            location = artifact_root.absolute().as_uri()
        return self.client.create_experiment(name, artifact_location=location,
                                             tags=EXPERIMENT_KIND)

    def start(self, experiment_id: str, name: str, tags: dict[str, Any],
              parent: str | None = None) -> str:
        """Creates a run (a child of ``parent`` if given) and returns its id."""
        tags = {k: str(v) for k, v in tags.items()}
        if parent is not None:
            tags[PARENT_TAG] = parent
        return self._retrying(self.client.create_run, experiment_id, tags=tags,
                              run_name=name).info.run_id

    def child(self, experiment_id: str, name: str, tags: dict[str, Any], parent: str,
              metrics: dict[str, float],
              existing: tuple[str, Collection[str]] | None = None,
              params: dict[str, Any] | None = None,
              curves: Sequence[Sequence[Any]] = ()) -> None:
        """A finished child run of ``parent`` holding ``params``, ``metrics`` (at step 0)
        and ``curves`` ([key, value, timestamp, step] each), queued when buffered; with
        ``existing`` (run id, metric keys it has) that unfinished run is completed: the
        metrics it lacks are logged and it is ended."""
        now = int(time.time() * 1000)
        has = set(existing[1]) if existing else set()
        points = [*([k, float(v), now, 0] for k, v in metrics.items()), *map(list, curves)]
        op = {"kind": "child", "experiment": experiment_id, "name": name,
              "tags": {**{k: str(v) for k, v in tags.items()}, PARENT_TAG: parent},
              "metrics": [m for m in points if m[0] not in has],
              "params": [[k, str(v)[:MAX_PARAM_CHARS]] for k, v in (params or {}).items()]}
        if existing:
            op["run"] = existing[0]
        self._submit(op)

    def log(self, run_id: str, metrics: dict[str, float], step: int = 0,
            skip: set[tuple[str, int]] | None = None) -> None:
        """Logs metrics at ``step``, leaving out (metric, step) pairs in ``skip`` (and adding
        the ones logged to it)."""
        self.log_steps(run_id, [(step, metrics)], skip)

    def log_steps(self, run_id: str, points: Iterable[tuple[int, dict[str, float]]],
                  skip: set[tuple[str, int]] | None = None) -> None:
        """Logs metrics at several steps ((step, metrics) each) as one write: as few
        ``log_batch`` requests as MLflow's limits allow (1,000 points each), not one a step;
        ``skip`` as for ``log``."""
        now = int(time.time() * 1000)
        batch = [[k, float(v), now, step] for step, metrics in points
                 for k, v in metrics.items() if skip is None or (k, step) not in skip]
        if skip is not None:  # what is logged now is never logged again through ``skip``
            skip |= {(m[0], m[3]) for m in batch}
        if batch:
            self._submit({"kind": "batch", "run": run_id, "metrics": batch})

    def params(self, run_id: str, params: dict[str, Any]) -> None:
        self._submit({"kind": "batch", "run": run_id,
                      "params": [[k, str(v)[:MAX_PARAM_CHARS]] for k, v in params.items()]})

    def tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self._submit({"kind": "batch", "run": run_id,
                      "tags": [[k, str(v)] for k, v in tags.items()]})

    def artifact(self, run_id: str, path: Path, artifact_path: str | None = None,
                 move: bool = False) -> None:
        """Logs the file ``path``; ``move``: deletes it once MLflow has it (a file made only
        for MLflow: it stays on disk while the write is queued, and a resumed trial's queue
        still finds it)."""
        self._submit({"kind": "artifact", "run": run_id, "path": str(path),
                      "artifact_path": artifact_path, "move": move})

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self._submit({"kind": "end", "run": run_id, "status": status})

    # --- reads and state changes a caller waits for ----------------------------------------

    def status(self, run_id: str) -> str:
        """The run's status (RUNNING, FINISHED, FAILED, KILLED)."""
        return self._retrying(self.client.get_run, run_id).info.status

    def reopen(self, run_id: str) -> None:
        """Marks a run that a restored trial continues as running again."""
        self._retrying(self.client.update_run, run_id, status="RUNNING")

    def logged(self, run_id: str) -> set[tuple[str, int]]:
        """(metric, step) pairs already in the run, so a resumed trial logs none twice."""
        def read() -> set[tuple[str, int]]:
            seen = set()
            for key in self.client.get_run(run_id).data.metrics:
                seen |= {(key, m.step) for m in self.client.get_metric_history(run_id, key)}
            return seen

        return self._retrying(read)

    def children(self, run_id: str) -> tuple[dict[str, str], dict[str, tuple[str, list[str]]]]:
        """The run's child runs: ({name: run id} of the FINISHED ones, {name: (run id, metric
        keys it has)} of the others). An unfinished child is one an attempt created and died
        before it logged its metrics or ended it: the next attempt completes it
        (``child(..., existing=...)``), it does not skip it."""
        def read() -> tuple[dict[str, str], dict[str, tuple[str, list[str]]]]:
            runs = search_all(self.client, [self.client.get_run(run_id).info.experiment_id],
                              f"tags.`{PARENT_TAG}` = '{run_id}'")
            done = {r.info.run_name: r.info.run_id for r in runs if r.info.status == "FINISHED"}
            broken = {r.info.run_name: (r.info.run_id, sorted(r.data.metrics)) for r in runs
                      if r.info.status != "FINISHED"}
            return done, broken

        return self._retrying(read)

    def find(self, experiment_id: str, tags: dict[str, str]) -> list[Any]:
        """The runs of the experiment carrying every one of ``tags`` (read page by page)."""
        where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        return self._retrying(lambda: search_all(self.client, [experiment_id], where))

    def resume(self, run_id: str, pending: Path, others: Collection[str] = ()) -> ResumedRun:
        """Continues a trial's run (and its runs ``others``, e.g. its trajectories') after a
        retry or restore: marks them running, delivers the writes an earlier attempt saved in
        ``pending`` (and saves back what is still left, so no later attempt sends it twice),
        and returns what the runs already have, so the attempt logs no (metric, step) and
        creates no child run twice.

        A child an earlier attempt created is not created again; one it created but did not
        finish (died between creating and ending it) is completed with the metrics it lacks.
        """
        seen = {}
        for run in (run_id, *others):
            self.reopen(run)
            seen[run] = self.logged(run)
        children, unfinished = self.children(run_id)
        self.load_pending(pending)
        self.pending = [op for op in self.pending
                        if not (op["kind"] == "child" and "run" not in op
                                and op["name"] in children)]
        for op in self.pending:
            if op["kind"] == "child" and "run" not in op and op["name"] in unfinished:
                op["run"], has = unfinished[op["name"]]
                op["metrics"] = [m for m in op["metrics"] if m[0] not in has]
            if op.get("run") in seen:
                seen[op["run"]] |= {(m[0], m[3]) for m in op.get("metrics", ())}
            if op["kind"] == "child":
                children[op["name"]] = op.get("run", "pending")
        self.flush(0.0)
        self.save_pending(pending)
        return ResumedRun(seen, children, unfinished)


class ResumedRun(NamedTuple):
    """What continued runs already have: (metric, step) pairs logged, by run id; child runs
    by name (finished or queued), and unfinished children by name (run id, metric keys)."""

    seen: dict[str, set[tuple[str, int]]]
    children: dict[str, str]
    unfinished: dict[str, tuple[str, list[str]]]
