"""A real browser on MLflow's UI: headless Chromium (Debian's ``chromium`` package, which
``make test`` installs) renders a page, runs its JavaScript against the MLflow server and
returns the DOM it built, or a screenshot. No driver library: Chromium's own ``--dump-dom`` and
``--screenshot``, with a virtual-time budget that lets the single-page app fetch and draw.

    python -m tests.browser screenshot OUT.png     # the README's compare-view screenshot
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# Without the background-networking flags Chromium dials Google's hosts, which a closed
# network refuses many times over; a fresh profile keeps runs independent.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]
BUDGETS_MS = (60_000, 180_000, 600_000)  # virtual time for the page's scripts, per attempt
MAX_DOM_BYTES = 32 * 2**20


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(url: str, output: list[str], size: tuple[int, int], budget_ms: int) -> str:
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("chromium not found: 'make test' installs Debian's chromium")
    with tempfile.TemporaryDirectory(prefix="ntk-sweep-chromium-") as profile:
        done = subprocess.run(
            [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
             f"--virtual-time-budget={budget_ms}", *output, url], capture_output=True,
            text=True, timeout=180)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout[:MAX_DOM_BYTES]


def dom(url: str, size: tuple[int, int] = (1400, 1000),
        ready: Callable[[str], bool] = lambda page: True) -> str:
    """The page's DOM (HTML) after its scripts ran; loaded again with more virtual time
    (``BUDGETS_MS``) until ``ready(page)``: how far a single-page app gets within a budget
    depends on how fast its server answers. The last page is returned either way."""
    for budget in BUDGETS_MS:
        page = _run(url, ["--dump-dom"], size, budget)
        if ready(page):
            break
    return page


def screenshot(url: str, path: Path, size: tuple[int, int] = (1400, 1000)) -> Path:
    _run(url, [f"--screenshot={Path(path).absolute()}"], size, BUDGETS_MS[1])
    return Path(path)


def compare_url(server: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's compare view of ``run_ids``."""
    return (f"{server}/#/compare-runs?runs={json.dumps(run_ids, separators=(',', ':'))}"
            f"&experiments={json.dumps([experiment_id])}")


def run_charts_url(server: str, experiment_id: str, run_id: str) -> str:
    """A run's metric charts (MLflow 3's "Model metrics" tab)."""
    return f"{server}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics"


def _screenshot_of_a_sweep(out: Path) -> None:
    """Runs the tests' tiny sweep, serves its MLflow store and photographs the compare view
    of AC against CC at switch epoch 2 (seed 0)."""
    import ray
    from mlflow.tracking import MlflowClient

    from sweep.runner import run_sweep
    from sweep.space import parse_space
    from tests.helpers import SWEEP
    from tests.servers import mlflow_server

    with tempfile.TemporaryDirectory(prefix="ntk-sweep-screenshot-") as tmp:
        root = Path(tmp)
        with mlflow_server(root / "server") as uri:
            import os

            os.environ["MLFLOW_TRACKING_URI"] = uri
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            try:
                run_sweep(parse_space(SWEEP), root / "out")
            finally:
                ray.shutdown()
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name(SWEEP["name"]).experiment_id
            runs = client.search_runs([exp], "params.switch_epoch = '2' and params.seed = '0' "
                                      "and params.phase2_mode = 'C'")
            ids = [r.info.run_id for r in sorted(runs, key=lambda r: r.info.run_name)]
            screenshot(compare_url(uri, exp, ids), out, size=(1400, 2200))
    print(out)


if __name__ == "__main__":
    if sys.argv[1:2] != ["screenshot"] or len(sys.argv) != 3:
        sys.exit("usage: python -m tests.browser screenshot OUT.png")
    _screenshot_of_a_sweep(Path(sys.argv[2]))
