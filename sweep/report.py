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

from core.config import METRIC_LABELS, RESULT_METRICS, ExperimentConfig
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
    """Every result metric (%) per code and switch epoch (``METRIC_LABELS``), and the seeds
    whose model the masking alarm flagged."""
    table = Table(title="results (mean ± std over seeds, %)")
    summary = summarize(rows)
    variants = any(r["variant"] for r in summary)
    for col in ("variant",) * variants + ("code", "switch", "seeds", *METRIC_LABELS.values(),
                                          "masking"):
        table.add_column(col, justify="right")
    for r in sorted(summary, key=lambda r: (r["variant"], r["code"], r["switch_rule"],
                                            r["switch_epoch"])):
        n = r["seeds"]
        table.add_row(
            *(r["variant"],) * variants, r["code"], switch_label(r), str(n),
            *(_pct(r[f"{k}_mean"], r[f"{k}_std"], n)
              for k in RESULT_METRICS),
            f"[red]masked {r['masked']}/{n}[/red]" if r.get("masked") else "",
        )
    return table


def masking_warning(rows: list[dict[str, Any]]) -> str | None:
    """A warning naming the models the masking alarm flagged, or None."""
    flagged = [r for r in rows if r.get("masked")]
    if not flagged:
        return None
    names = ", ".join(f"{r['code']} t={r['switch_epoch']:g} seed {r['seed']}"
                      + (f" ({r['variant']})" if r.get("variant") else "") for r in flagged)
    return (f"masking: {len(flagged)} model(s) score higher under white-box PGD than under the "
            f"transfer attack ({names}): their PGD figures are not robustness figures; "
            "worst L-inf counts every attack")


def show_summary(console, rows: list[dict[str, Any]]) -> None:
    """Prints ``summary_table(rows)`` and, under it, the masking warning if there is one."""
    console.print(summary_table(rows))
    if warning := masking_warning(rows):
        console.print(warning, style="yellow", highlight=False)


def print_summary(rows: list[dict[str, Any]], out: Path) -> None:
    """Prints the summary table and where the files are, on stdout."""
    from sweep.plots import switch_point_plot

    stdout = stdout_console()
    show_summary(stdout, rows)
    plot = switch_point_plot(summarize(rows), out / "switch_point.png")
    stdout.print(f"results: {out / 'results.csv'}, {out / 'summary.csv'}, "
                 f"{out / 'summary.md'}, {out / 'results.json'}")
    stdout.print(f"plot: {plot}")
    stdout.print("(code 'X-' is the phase-1 network itself at the switch epoch)")
