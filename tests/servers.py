"""Real servers started by tests on loopback, and stopped (with every child) afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
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
def mlflow_server(directory: Path, backend_uri: str | None = None) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 (SQLite backend in ``directory`` unless given), serving
    artifacts from ``directory/artifacts``; yields its tracking URI."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    backend_uri = backend_uri or f"sqlite:///{directory / 'mlflow.db'}"
    log = directory / "mlflow-server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", backend_uri, "--serve-artifacts",
             "--artifacts-destination", str(directory / "artifacts"), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=directory,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)
