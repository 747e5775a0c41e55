"""Terminal presentation of an experiment: a progress bar while it runs, a table when it ends."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from core.config import RESULT_METRICS, ExperimentConfig
from core.experiment import Hooks, run_experiment, summarize, switch_label
from sweep.console import stdout_console

console = Console(stderr=True)


def run_with_progress(cfg: ExperimentConfig, out: Path, quiet: bool = False) -> list[dict]:
    """Runs the experiment with a step progress bar (steps of phase 1 and phase 2) on stderr."""
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=quiet, transient=False) as progress:
        task = progress.add_task("training steps", total=None)

        def log(message: str) -> None:
            progress.update(task, description=message)
            if not console.is_terminal and not quiet:  # a log file: one line per stage
                done, total = progress.tasks[0].completed, progress.tasks[0].total
                console.print(f"[{done:.0f}/{total} steps] {message}", highlight=False)

        hooks = Hooks(
            on_step=lambda: progress.advance(task),
            log=log,
            planned_steps=lambda n: progress.update(task, total=n),
        )
        return run_experiment(cfg, out, hooks)


def _pct(mean: float, std: float, seeds: int) -> str:
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if seeds > 1 else "")


def summary_table(rows: list[dict[str, Any]]) -> Table:
    """Clean, PGD L-inf, PGD L2 and transfer accuracy (%) per code and switch epoch."""
    table = Table(title="results (mean ± std over seeds, %)")
    summary = summarize(rows)
    variants = any(r["variant"] for r in summary)
    for col in ("variant",) * variants + ("code", "switch", "seeds", "clean", "PGD linf",
                                          "PGD l2", "transfer linf"):
        table.add_column(col, justify="right")
    for r in sorted(summary, key=lambda r: (r["variant"], r["code"], r["switch_rule"],
                                            r["switch_epoch"])):
        n = r["seeds"]
        table.add_row(
            *(r["variant"],) * variants, r["code"], switch_label(r), str(n),
            *(_pct(r[f"{k}_mean"], r[f"{k}_std"], n)
              for k in RESULT_METRICS),
        )
    return table


def print_summary(rows: list[dict[str, Any]], out: Path) -> None:
    """Prints the summary table and where the files are, on stdout."""
    from sweep.plots import switch_point_plot

    stdout = stdout_console()
    stdout.print(summary_table(rows))
    plot = switch_point_plot(summarize(rows), out / "switch_point.png")
    stdout.print(f"results: {out / 'results.csv'}, {out / 'summary.csv'}, "
                 f"{out / 'summary.md'}, {out / 'results.json'}")
    stdout.print(f"plot: {plot}")
    stdout.print("(code 'X-' is the phase-1 network itself at the switch epoch)")
