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
from core.experiment import Hooks, run_experiment
from core.results import row_order, summarize, switch_label
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
    for r in sorted(summary, key=row_order):
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


def print_summary(rows: list[dict[str, Any]], out: Path, subtitle: str = "") -> None:
    """Prints the summary table and where the files are, on stdout; ``subtitle`` names the
    dataset, model and eps on the plot."""
    from sweep.plots import switch_point_plot

    stdout = stdout_console()
    show_summary(stdout, rows)
    plot = switch_point_plot(summarize(rows), out / "switch_point.png", subtitle)
    stdout.print(f"results: {out / 'results.csv'}, {out / 'summary.csv'}, "
                 f"{out / 'summary.md'}, {out / 'results.json'}")
    stdout.print(f"plot: {plot}")
    stdout.print("(code 'X-' is the phase-1 network itself at the switch epoch)")


def run_audit(cfg: ExperimentConfig, run_dir: Path, store_root: Path, ref, seed: int, source,
              recorded: dict[str, Any], run_eval: Any) -> int:
    """``ntk-sweep attack``: rebuilds ``ref`` (``core.audit``) with a progress bar, prints the
    recorded and the audited figures side by side and writes ``audits/<model>-seed<s>.json``.
    Exit 1 if the rebuilt model is not the run's: under the run's own evaluation settings
    (``run_eval``) every figure must equal the recorded row's, under others (on the same test
    images) its clean accuracy."""
    import json
    import sys

    from core.audit import AuditError, audit, differences
    from core.experiment import Hooks, make_context

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task(f"rebuilding {ref} seed {seed} (phase 2 again)", total=None)
        hooks = Hooks(on_step=lambda: progress.advance(task),
                      log=lambda m: progress.update(task, description=m))
        ctx = make_context(cfg, run_dir, hooks, store_root)
        try:
            result = audit(ctx, ref, seed, source)
        except AuditError as e:  # a checkpoint not stored, or stored in an earlier format
            progress.stop()
            print(f"ntk-sweep: error: {e}", file=sys.stderr)
            return 2  # bad input, as the CLI's other refusals
    stdout = stdout_console()
    table = Table(title=f"{ref}, seed {seed}: accuracy (%) as recorded and as audited now")
    for column in ("metric", "recorded", "audit"):
        table.add_column(column, justify="right")
    extra = ("source_linf",) if source is not None else ()
    for k in (*RESULT_METRICS, *extra):
        label = METRIC_LABELS.get(k, f"transfer from {source} L-inf")
        table.add_row(label, _pct(recorded.get(k, math.nan), 0, 1), _pct(result[k], 0, 1))
    stdout.print(table)
    diff = differences(recorded, result)
    same_settings = cfg.eval == run_eval
    if same_settings and source is None:
        problem = bool(diff)
    else:  # other attacks: only the clean accuracy is comparable, on the same images
        problem = "accuracy" in diff and cfg.eval.max_test == run_eval.max_test
    if problem:
        stdout.print(f"[red]the rebuilt model does not reproduce the run's row ({', '.join(diff)} "
                     "differ): the code or the stack changed since the run; these are not the "
                     "figures of the run's model[/red]")
    elif same_settings and source is None:
        stdout.print("rebuilt and evaluated with the run's settings: every figure equals the "
                     "recorded row's")
    if result["masked"]:
        stdout.print("masking: a transfer attack beats the white-box ones on this model",
                     style="yellow")
    out = run_dir / "audits" / f"{ref.code}@{ref.switch:g}-seed{seed}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "model": str(ref), "seed": seed, "source": str(source) if source else None,
        "eval": cfg.eval.model_dump(mode="json"), "reproduces_row": not problem,
        "recorded": {k: recorded.get(k) for k in RESULT_METRICS},
        "audit": {k: result[k] for k in (*RESULT_METRICS, *extra, "masked")}}, indent=1))
    stdout.print(f"audit: {out}")
    return 1 if problem else 0
