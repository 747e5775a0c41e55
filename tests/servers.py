"""Real servers started by tests on loopback, and stopped (with every child) afterwards."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Waits until ``url`` answers 200; fails with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL after 15 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(15)


@contextlib.contextmanager
def mlflow_server(directory: Path, backend_uri: str | None = None,
                  port: int | None = None, workers: int = 1) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 (SQLite backend in ``directory`` unless given), serving
    artifacts from ``directory/artifacts`` with ``workers`` server processes; yields its
    tracking URI. Started again with the same directory and port, it is the same server after
    a restart."""
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    backend_uri = backend_uri or f"sqlite:///{directory / 'mlflow.db'}"
    log = directory / "mlflow-server.log"
    with log.open("a") as out:
        process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", backend_uri, "--serve-artifacts",
             "--artifacts-destination", str(directory / "artifacts"), "--workers", str(workers)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=directory,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


def _postgres_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, else the newest Debian install."""
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install PostgreSQL ('make test' does)")
    return found


@contextlib.contextmanager
def postgres_server(database: str = "mlflow") -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust authentication, loopback only) with
    an empty ``database``; yields its libpq URI (SQLAlchemy, as MLflow's backend store:
    ``postgresql+psycopg2://...``). As root, the server runs as the
    ``postgres`` user (PostgreSQL refuses root)."""
    directory = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))  # short: socket paths
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(directory, "postgres")
    port = free_port()
    data = directory / "data"
    pg_ctl = [*as_user, _postgres_bin("pg_ctl"), "-D", str(data)]
    subprocess.run([*as_user, _postgres_bin("initdb"), "-D", str(data), "-U", "ntk",
                    "--auth=trust", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={directory}"
    started = False
    try:
        subprocess.run([*pg_ctl, "-o", options, "-l", str(directory / "log"), "-w", "start"],
                       check=True, capture_output=True, timeout=120)
        started = True
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=port, user="ntk", dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {database}")
        connection.close()
        yield f"postgresql://ntk@127.0.0.1:{port}/{database}"
    finally:
        if started:
            subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True,
                           timeout=60)
        shutil.rmtree(directory, ignore_errors=True)


def processes_mentioning(text: str) -> list[int]:
    """PIDs of processes whose command line contains ``text``."""
    out = subprocess.run(["pgrep", "-f", "--", text], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def processes_with_environment(text: str) -> list[int]:
    """PIDs of processes whose environment contains ``text`` (Ray's workers, say, which
    inherit the session's ``RAY_TMPDIR`` but do not name it on their command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


@contextlib.contextmanager
def ray_cluster(nodes: int = 2, cpus: int = 1,
                extra_env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """A real Ray cluster on this machine, started with ``ray start``: a head and
    ``nodes - 1`` more nodes of ``cpus`` CPUs each, token-authenticated. Yields the
    environment a driver needs (``RAY_ADDRESS``, the token); each node's processes carry
    ``NTK_TEST_NODE=<i>`` in their environment (listed in ``NTK_TEST_NODES``), so a test can
    kill one node. Every Ray process it started is killed at the end."""
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are limited
    env = {**os.environ, "RAY_TMPDIR": temp, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "TF_CPP_MIN_LOG_LEVEL": "3",
           "NTK_TEST_NODES": ",".join(f"{temp}-{i}" for i in range(nodes)),
           **(extra_env or {})}
    port = free_port()
    common = ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--disable-usage-stats"]
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}",
                        "--include-dashboard=false", f"--temp-dir={temp}", *common],
                       env={**env, "NTK_TEST_NODE": f"{temp}-0"}, check=True,
                       capture_output=True, timeout=180)
        for i in range(1, nodes):
            subprocess.run([str(BIN / "ray"), "start", f"--address=127.0.0.1:{port}", *common],
                           env={**env, "NTK_TEST_NODE": f"{temp}-{i}"}, check=True,
                           capture_output=True, timeout=180)
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        for _ in range(3):
            pids = processes_mentioning(temp)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not pids:
                break
            time.sleep(1)
        shutil.rmtree(temp, ignore_errors=True)
