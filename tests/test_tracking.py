"""sweep.tracking against a real MLflow store (SQLite): what a retried trial finds and does."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from sweep.tracking import PARENT_TAG, Tracker
from tests.helpers import bulk_sweep


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


@pytest.mark.slow
def test_a_report_reads_every_run_past_any_page_or_cap(tmp_path):
    """51,001 runs: more than one MLflow search answers (50,000), so a capped read truncates
    the report silently. Every evaluated model must come back, each once."""
    from sweep.review import mlflow_rows

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, parent = bulk_sweep(uri, trials=1000, children=50)
    rows, trials, _ = mlflow_rows(uri, "big", parent)
    assert len(trials) == 1000
    assert len(rows) == 50_000
    assert len({(r["seed"], r["switch_epoch"]) for r in rows}) == 50_000


def test_children_are_read_page_by_page(tmp_path, monkeypatch):
    import sweep.tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp, parent = bulk_sweep(uri, trials=1, children=23)
    trial = next(r.info.run_id for r in MlflowClient(uri).search_runs(
        [exp], "tags.kind = 'trial'"))
    monkeypatch.setattr(sweep.tracking, "PAGE", 5)  # 23 children: five requests
    done, broken = Tracker(uri, existing=True).children(trial)
    assert len(done) == 23 and not broken


class FakeMlflow:
    """Enough of MLflow's REST API (``/api/2.0/mlflow/...``) for a Tracker's writes, served by
    the standard library on 127.0.0.1: runs/create, runs/log-batch, runs/update, runs/get.

    ``applied`` lists (endpoint, request body) of every request it carried out, in order;
    ``refused`` counts the requests it answered with 503 because their endpoint is in
    ``fail`` (``"*"``: every endpoint); ``stop()`` closes the port (connection refused) and
    ``start()`` opens it again on the same port.
    """

    PREFIX = "/api/2.0/mlflow/"

    def __init__(self):
        self.applied: list[tuple[str, dict]] = []
        self.refused = 0
        self.fail: set[str] = set()
        self.runs: dict[str, dict] = {}
        self.port = 0
        self._server = None
        self.start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import http.server
        import threading

        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, body: dict) -> None:
                path, _, query = self.path.partition("?")
                endpoint = path.removeprefix(fake.PREFIX)
                if endpoint in fake.fail or "*" in fake.fail:
                    fake.refused += 1
                    self._answer(503, {"error_code": "TEMPORARILY_UNAVAILABLE",
                                       "message": "fake server told to fail"})
                    return
                code, answer = fake.apply(endpoint, body, query)
                self._answer(code, answer)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                self._handle(json.loads(self.rfile.read(length) or b"{}"))

            def do_GET(self):
                self._handle({})

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def apply(self, endpoint: str, body: dict, query: str) -> tuple[int, dict]:
        import uuid
        from urllib.parse import parse_qs

        if endpoint == "runs/get":
            body = {k: v[0] for k, v in parse_qs(query).items()}
        if endpoint == "runs/create":
            run_id = uuid.uuid4().hex
            self.runs[run_id] = {
                "info": {"run_id": run_id, "run_uuid": run_id, "run_name": body.get("run_name"),
                         "experiment_id": body["experiment_id"], "status": "RUNNING",
                         "start_time": body.get("start_time", 0), "lifecycle_stage": "active",
                         "artifact_uri": f"mlflow-artifacts:/{run_id}", "user_id": "test"},
                "data": {"tags": body.get("tags", [])}}
            self.applied.append((endpoint, {**body, "run_id": run_id}))
            return 200, {"run": self.runs[run_id]}
        if body.get("run_id") not in self.runs:
            return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": endpoint}
        run = self.runs[body["run_id"]]
        if endpoint == "runs/get":
            return 200, {"run": run}
        if endpoint == "runs/log-batch":
            self.applied.append((endpoint, body))
            return 200, {}
        if endpoint == "runs/update":
            run["info"]["status"] = body["status"]
            run["info"]["end_time"] = body.get("end_time")
            self.applied.append((endpoint, body))
            return 200, {"run_info": run["info"]}
        return 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": endpoint}

    def calls(self) -> list[tuple]:
        """The applied requests in short: (endpoint, run name or id, what they wrote)."""
        names = {r: v["info"]["run_name"] for r, v in self.runs.items()}
        out = []
        for endpoint, body in self.applied:
            run = names[body["run_id"]]
            if endpoint == "runs/log-batch":
                out.append((endpoint, run, *[(m["key"], m["value"], int(m.get("step", 0)))
                                             for m in body.get("metrics", [])],
                            *[(p["key"], p["value"]) for p in body.get("params", [])],
                            *[(t["key"], t["value"]) for t in body.get("tags", [])]))
            else:
                out.append((endpoint, run, body.get("status", "")))
        return out


@pytest.fixture
def fake_mlflow(monkeypatch):
    # One request per call (the Tracker retries, not MLflow's client) and no long waits.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    server = FakeMlflow()
    yield server
    server.stop()


def test_buffered_writes_queue_while_the_server_is_down_and_arrive_once_in_order(
        fake_mlflow, tmp_path):
    """The write queue of a buffered Tracker against a fake MLflow server: writes made while
    the server refuses connections or answers 503 are queued in order, survive
    save_pending/load_pending (a retried attempt), and are delivered once each, in order,
    when it is back; a child run created before a failure is not created again."""
    server = fake_mlflow
    tracker = Tracker(server.uri, buffered=True)
    trial = tracker.start("0", "trial", {"kind": "trial"})
    tracker.log(trial, {"loss": 1.0}, step=1)
    assert tracker.pending == [] and len(server.applied) == 2  # sent at once while up

    server.stop()  # connection refused
    tracker.log(trial, {"loss": 0.5}, step=2)
    tracker.params(trial, {"lr": 0.01})
    tracker.child("0", "CC-s0", {"kind": "switch_run"}, trial, {"accuracy": 0.75})
    assert [op["kind"] for op in tracker.pending] == ["batch", "batch", "child"]
    assert len(server.applied) == 2

    # The attempt ends here: what it could not send is saved for the next one.
    pending = tmp_path / "pending.json"
    tracker.save_pending(pending)
    retry = Tracker(server.uri, buffered=True)
    retry.tags(trial, {"attempt": "2"})  # refused as well: queued behind what is loaded
    retry.end(trial)
    assert retry.load_pending(pending) == 3
    assert retry.pending == [*tracker.pending,
                             {"kind": "batch", "run": trial, "tags": [["attempt", "2"]]},
                             {"kind": "end", "run": trial, "status": "FINISHED"}]

    server.start()  # up again on the same port, but answering 503 to everything
    server.fail = {"*"}
    assert not retry.flush(0.0)
    assert server.refused >= 1 and len(server.applied) == 2 and len(retry.pending) == 5

    # Ending runs fails: the queue stops at the child run, created and logged but not ended.
    server.fail = {"runs/update"}
    assert not retry.flush(0.0)
    assert [op["kind"] for op in retry.pending] == ["child", "batch", "end"]
    assert retry.pending[0]["run"] in server.runs and retry.pending[0]["metrics"] == []

    server.fail = set()
    assert retry.flush(10.0) and retry.pending == []
    retry.save_pending(pending)
    assert not pending.exists() and Tracker(server.uri).load_pending(pending) == 0
    assert server.calls() == [
        ("runs/create", "trial", ""),
        ("runs/log-batch", "trial", ("loss", 1.0, 1)),
        ("runs/log-batch", "trial", ("loss", 0.5, 2)),
        ("runs/log-batch", "trial", ("lr", "0.01")),
        ("runs/create", "CC-s0", ""),
        ("runs/log-batch", "CC-s0", ("accuracy", 0.75, 0)),
        ("runs/update", "CC-s0", "FINISHED"),
        ("runs/log-batch", "trial", ("attempt", "2")),
        ("runs/update", "trial", "FINISHED"),
    ]
    child = next(b for e, b in server.applied if e == "runs/create" and b["run_name"] == "CC-s0")
    assert {"key": PARENT_TAG, "value": trial} in child["tags"]
    assert server.runs[trial]["info"]["status"] == "FINISHED"


def test_a_batch_beyond_mlflow_limits_resumes_where_a_failure_stopped_it(fake_mlflow):
    """A write larger than one MLflow request (1,500 metrics, 150 params) goes in requests
    within MLflow's limits; when one of them fails, the retry sends what was not delivered,
    not the whole write again: every metric and param arrives once."""
    from sweep.tracking import BATCH_LIMITS

    server = fake_mlflow
    tracker = Tracker(server.uri, buffered=True)
    run = tracker.start("0", "trial", {"kind": "trial"})
    apply, batches = server.apply, [0]

    def second_batch_fails_once(endpoint: str, body: dict, query: str) -> tuple[int, dict]:
        if endpoint == "runs/log-batch":
            batches[0] += 1
            if batches[0] == 4:  # two of params went, then one chunk of metrics
                return 503, {"error_code": "TEMPORARILY_UNAVAILABLE", "message": "once"}
        return apply(endpoint, body, query)

    server.apply = second_batch_fails_once
    tracker.params(run, {f"p{i}": i for i in range(150)})
    tracker.log(run, {f"m{i}": float(i) for i in range(1500)}, step=3)
    assert tracker.flush(10.0) and batches[0] > 4
    bodies = [b for e, b in server.applied if e == "runs/log-batch"]
    metrics = [m["key"] for b in bodies for m in b.get("metrics", [])]
    params = [p["key"] for b in bodies for p in b.get("params", [])]
    assert sorted(metrics) == sorted(f"m{i}" for i in range(1500))  # each once
    assert sorted(params) == sorted(f"p{i}" for i in range(150))
    assert all(len(b.get("metrics", [])) <= BATCH_LIMITS["metrics"]
               and len(b.get("params", [])) <= BATCH_LIMITS["params"] for b in bodies)


def test_a_child_run_is_three_requests_its_params_and_metrics_in_one_batch(fake_mlflow):
    """A finished child run (an evaluated model) is create, one log-batch with its params and
    metrics together, and end: a sweep makes one per evaluated model, so each request more is
    paid thousands of times."""
    from sweep.tracking import MAX_BATCH_ENTITIES

    server = fake_mlflow
    tracker = Tracker(server.uri, buffered=True)
    trial = tracker.start("0", "trial", {"kind": "trial"})
    tracker.child("0", "CC-s0", {"kind": "switch_run"}, trial,
                  {"accuracy": 0.75, "robust_linf": 0.5}, params={"code": "CC", "seed": 0},
                  curves=[["loss", 1.0, 0, 1], ["loss", 0.5, 0, 2]])
    tracker.child("0", "big", {"kind": "switch_run"}, trial,
                  {f"m{i}": float(i) for i in range(950)}, params={f"p{i}": i for i in range(99)})
    assert tracker.flush(10.0)
    endpoints = [e for e, _ in server.applied]
    assert endpoints == ["runs/create", "runs/create", "runs/log-batch", "runs/update",
                         "runs/create", "runs/log-batch", "runs/log-batch", "runs/update"]
    first = [b for e, b in server.applied if e == "runs/log-batch"][0]
    assert len(first["params"]) == 2 and len(first["metrics"]) == 4
    bodies = [b for e, b in server.applied if e == "runs/log-batch"][1:]
    assert all(len(b.get("params", [])) + len(b.get("metrics", [])) <= MAX_BATCH_ENTITIES
               for b in bodies)
    assert sum(len(b.get("metrics", [])) for b in bodies) == 950
    assert sum(len(b.get("params", [])) for b in bodies) == 99


def test_a_report_of_runs_logged_before_the_params_layout_names_the_run(tmp_path):
    """Model runs an earlier version logged with tags instead of params: the report stops with
    an error naming the run and what it lacks, not a KeyError."""
    from core.config import ConfigError
    from sweep.review import mlflow_rows

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("old")
    parent = client.create_run(exp, run_name="old sweep", tags={"kind": "sweep"}).info.run_id
    trial = client.create_run(exp, run_name="t", tags={"kind": "trial", PARENT_TAG: parent})
    client.set_terminated(trial.info.run_id)
    old = client.create_run(exp, run_name="CC t=1 seed 0", tags={
        "kind": "switch_run", PARENT_TAG: trial.info.run_id, "code": "CC", "seed": "0",
        "dynamics": "centered", "switch_epoch": "1"})
    with pytest.raises(ConfigError, match=f"MLflow run {old.info.run_id} \\(CC t=1 seed 0\\) "
                       "of experiment 'old' has no param seed, code, dynamics, switch_epoch"):
        mlflow_rows(uri, "old", parent)


def test_a_sweeps_cross_trajectory_distances_grow_linearly_in_pairs_and_requests(
        fake_mlflow, tmp_path):
    """The end of a sweep compared every two trajectories of a phase-1 configuration and
    logged each distance at each checkpoint as a request of its own: 20 seeds of C and A
    made 780 pairs and 2,340 requests (a sweep of 10,000 seeds, 2e8 pairs). Now every pair up
    to 16 trajectories, O(n) pairs beyond, and one write."""
    import numpy as np

    from core.kernel_store import KernelRecord, KernelTrajectory
    from core.kernels import ALL_PAIRS_UP_TO, trajectory_pairs
    from sweep.kernel_logging import log_family
    from sweep.tracking import BATCH_LIMITS

    rng = np.random.default_rng(0)
    stores = {}
    for seed in range(20):
        for mode in "CA":
            store = stores[mode, seed] = KernelTrajectory(tmp_path / f"{mode}{seed}.pack")
            for step, epoch in enumerate((0.0, 1.0, 2.0)):
                k = rng.normal(size=(2, 4, 4))
                store.save(KernelRecord((k @ k.transpose(0, 2, 1)).astype(np.float32),
                                        np.arange(4), np.arange(4) % 2,
                                        {"epoch": epoch, "step": 5 * step,
                                         "output": "classwise"}))
    server = fake_mlflow
    tracker = Tracker(server.uri, buffered=True)
    parent = tracker.start("0", "sweep", {"kind": "sweep"})
    plot = log_family(tracker, parent, stores, "", "", tmp_path / "cross.png")
    assert tracker.flush(10.0)
    assert plot.read_bytes()[:4] == b"\x89PNG"

    batches = [b for e, b in server.applied if e == "runs/log-batch"]
    points = [(m["key"], int(m["step"])) for b in batches for m in b["metrics"]]
    names = {key for key, _ in points}
    pairs = trajectory_pairs(stores)
    # Every pair among the first 8 seeds (16 trajectories); then, per seed, C against A and
    # each mode against its previous seed: 120 + 12 x 3 pairs, not 780.
    assert len(pairs) == 120 + 12 * 3 and len(names) == len(pairs)
    assert len(points) == len(set(points)) == 3 * len(pairs)  # each checkpoint once
    assert len(batches) == -(-len(points) // BATCH_LIMITS["metrics"])  # 1,000 a request
    for seed in range(20):  # what claim 3 reads: mode against mode at one seed ...
        assert f"kernel/cross/A{seed}-C{seed}/distance" in names
    for seed in range(1, 20):  # ... and seed against seed in one mode
        for mode in "CA":
            a, b = sorted((f"{mode}{seed - 1}", f"{mode}{seed}"))
            assert f"kernel/cross/{a}-{b}/distance" in names
    head = {k: v for k, v in stores.items() if k[1] < ALL_PAIRS_UP_TO // 2}
    assert len(trajectory_pairs(head)) == 16 * 15 // 2  # a sweep of 8 seeds: every pair
    # Linear, whatever the size: 100,000 seeds of two modes.
    many = trajectory_pairs((m, s) for s in range(100_000) for m in "CA")
    assert len(many) == 120 + (100_000 - 8) * 3


def test_trials_sharing_trajectories_draw_their_kernel_figure_once_a_process(
        tmp_path, monkeypatch):
    """Trials that share their trajectories (a sweep over phase-2 settings) ran one after
    another in a reused worker and each drew the same kernel figure (0.6 CPU-s of a tiny
    trial). Now a process keeps the figure by what it shows: the trajectories and the
    fingerprints of their stored kernels."""
    import sweep.plots
    from core.experiment import run_experiment
    from core.trajectory_store import TrajectoryStore
    from sweep import kernel_logging
    from tests.helpers import tiny_cfg

    cfg = tiny_cfg(codes=["CC", "AC"], switch_points=[0, 1, 2], fractional_checkpoints=[],
                   kernel={"probe_size": 12},
                   phase1={"epochs": 2, "lr": 0.05, "batch_size": 16, "lr_decay_epochs": [],
                           "attack": {"eps": 0.1, "iters": 2}})
    run_experiment(cfg, tmp_path / "run", store_root=tmp_path)
    trajectories = TrajectoryStore(tmp_path).of(cfg)
    drawn = []
    draw = sweep.plots.kernel_overview
    monkeypatch.setattr(sweep.plots, "kernel_overview",
                        lambda *a, **k: drawn.append(a[2]) or draw(*a, **k))
    kernel_logging._FIGURES.clear()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    experiment = tracker.experiment("figures", tmp_path / "artifacts")
    pngs = []
    for trial in ("t1", "t2"):
        run = tracker.start(experiment, trial, {"kind": "trial"})
        runs = {t.mode: tracker.start(experiment, t.mode, {"kind": "trajectory"}, parent=run)
                for t in trajectories}
        directory = tmp_path / "trials" / trial
        directory.mkdir(parents=True)
        (png,) = kernel_logging.log_kernels(tracker, run, runs, cfg, trajectories, directory, {})
        pngs.append(png.read_bytes())
    assert len(drawn) == 1 and pngs[0] == pngs[1] and pngs[0][:4] == b"\x89PNG"
    # The key is what is stored: a record set aside changes it; made again, the same bits
    # (the NTK is deterministic) give the same fingerprint, and the figure is still valid.
    store = trajectories[0].kernels(cfg.kernel)
    before = store.fingerprint()
    store.pack.void(store.pack.entries()[max(store.epochs())])
    assert store.fingerprint() != before
    kernel_logging.log_kernels(tracker, run, runs, cfg, trajectories, directory, {})
    assert store.fingerprint() == before and len(drawn) == 1
    # Another trajectory set is another figure.
    other = tiny_cfg(**{**cfg.model_dump(mode="json"), "seeds": [1]})
    run_experiment(other, tmp_path / "run1", store_root=tmp_path)
    directory = tmp_path / "trials" / "t3"
    directory.mkdir()
    others = TrajectoryStore(tmp_path).of(other)
    kernel_logging.log_kernels(tracker, run, {t.mode: runs[t.mode] for t in others}, other,
                               others, directory, {})
    assert len(drawn) == 2
