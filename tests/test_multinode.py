"""The cluster path on loopback: a real two-node Ray cluster (``ray start`` twice), a real
PostgreSQL server and a real ``mlflow server`` on it; ``ntk-sweep run`` reaches the cluster
through ``RAY_ADDRESS`` and logs through the server, as on Kubernetes."""

from __future__ import annotations

import re
import subprocess

import psycopg2
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.helpers import QUIET, SWEEP
from tests.servers import BIN, mlflow_server, postgres_server, processes_mentioning, ray_cluster


@pytest.mark.slow
def test_sweep_on_two_ray_nodes_logs_to_postgres_backed_mlflow(tmp_path):
    space = {**SWEEP, "name": "cluster-sweep", "switch_rule": None, "codes": ["CC", "AC"],
             "switch_points": [0, 1], "phase1": {**SWEEP["phase1"], "epochs": 1}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    with postgres_server() as database, \
            mlflow_server(tmp_path / "mlflow", backend_uri=database.replace(
                "postgresql://", "postgresql+psycopg2://")) as uri, \
            ray_cluster(nodes=2, cpus=1) as env:
        temp = env["RAY_TMPDIR"]
        assert len(processes_mentioning(f"{temp}/")) > 0  # the cluster is up
        done = subprocess.run(
            [str(BIN / "ntk-sweep"), "run", str(path), "--out", str(tmp_path / "out"),
             "--trials"],
            env={**env, "MLFLOW_TRACKING_URI": uri, "NTK_SWEEP_STORAGE": ""},
            capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        assert "2 trials, 0 failed" in done.stdout
        for noise in QUIET:
            assert noise not in done.stdout + done.stderr, noise
        # --trials: the table at the end has both trials, finished, at 100 %.
        rows = [line.split() for line in done.stderr.splitlines()
                if re.match(r"^[0-9a-f]{5}_0000[01] ", line)]
        assert len(rows) >= 2 and all(r[1] == "terminated" and "100" in r for r in rows[-2:])

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("cluster-sweep")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        trials = [r for r in runs if r.data.tags.get("kind") == "trial"]
        assert len(trials) == 2
        # One CPU per node and one per trial: the two trials ran side by side, one per node.
        assert len({t.data.tags["ray_node"] for t in trials}) == 2
        for t in trials:
            assert t.info.status == "FINISHED"
            assert {"results.csv", "summary.md"} <= {a.path for a in
                                                     client.list_artifacts(t.info.run_id)}
        trajectories = [r for r in runs if r.data.tags.get("kind") == "trajectory"]
        assert len(trajectories) == 2 * 2  # C and A of each trial
        for t in trajectories:
            assert t.info.status == "FINISHED"
            assert len(client.get_metric_history(t.info.run_id, "train_loss")) == 1  # 1 epoch
            assert len(client.get_metric_history(t.info.run_id, "to_init")) == 2
        assert len([r for r in runs if r.data.tags.get("kind") == "switch_run"]) == 2 * 2 * 2

        # ... and all of it is in PostgreSQL, which the server uses as its store.
        with psycopg2.connect(database) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM runs WHERE experiment_id = %s",
                           (int(exp.experiment_id),))
            assert cursor.fetchone()[0] == len(runs)
            cursor.execute("SELECT count(DISTINCT run_uuid) FROM params "
                           "WHERE key = 'data_mode'")
            assert cursor.fetchone()[0] == 4
    assert processes_mentioning(f"{temp}/") == []  # every Ray process it started is gone
