"""Result rows of evaluated models, their summary over seeds, and the files holding them.

A row (``RESULT_FIELDS``) is one evaluated model: seed, loader code (``AC``; ``A-`` for the
phase-1 network itself), dynamics, switch epoch (and the switch rule that chose it), every
``RESULT_METRICS`` accuracy (a fraction of the test set), the masking flag, the last phase's
training loss and accuracy, and seconds. The summary has mean and standard deviation over
seeds per (variant, code, switch epoch).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.config import (
    BLACK_BOX,
    METRIC_LABELS,
    MODES,
    RESULT_METRICS,
    WHITE_BOX,
    WORST_LINF,
    ExperimentConfig,
)
from core.evaluate import accuracies, masked, worst_case

RESULT_FIELDS = ("seed", "code", "dynamics", "switch_epoch", "switch_rule", *RESULT_METRICS,
                 "masked", "train_loss", "train_accuracy", "seconds")


def result_metrics(correct: dict[str, np.ndarray], threshold: float) -> dict[str, Any]:
    """The ``RESULT_METRICS`` of one model (NaN for attacks not run) from its per-example
    correctness, ``worst_linf`` (the per-example worst case over ``WORST_LINF``) and
    ``masked`` (transfer below white-box by more than ``threshold``)."""
    correct = {**correct, "worst_linf": worst_case(correct, WORST_LINF)}
    acc = accuracies(correct)
    return {**{k: acc.get(k, float("nan")) for k in RESULT_METRICS},
            "masked": masked(acc, WHITE_BOX, BLACK_BOX, threshold)}


def result_row(seed, code, dynamics, switch, metrics, train, t0) -> dict[str, Any]:
    """One result row (the fields of ``RESULT_FIELDS``); ``metrics``: ``result_metrics``."""
    return {
        "seed": seed, "code": code, "dynamics": dynamics, "switch_epoch": switch,
        "switch_rule": "", **metrics,
        "train_loss": train.get("loss", float("nan")),
        "train_accuracy": train.get("accuracy", float("nan")),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds for each (variant, code, switch epoch), and for
    each (variant, code, switch rule), whose ``switch_epoch`` is the mean epoch the rule chose.
    A row's ``variant`` (sweeps: the trial's sampled values other than the seed, e.g.
    ``phase1.attack.eps=0.1``) is empty for a single experiment."""
    groups: dict[tuple[str, str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        rule = r.get("switch_rule", "")
        key = (r.get("variant", ""), r["code"], rule, 0.0 if rule else r["switch_epoch"])
        groups.setdefault(key, []).append(r)
    out = []
    for (variant, code, rule, switch), rs in groups.items():
        epochs = [r["switch_epoch"] for r in rs]
        row: dict[str, Any] = {
            "variant": variant, "code": code,
            "switch_epoch": statistics.fmean(epochs) if rule else switch,
            "switch_epoch_std": statistics.pstdev(epochs), "switch_rule": rule, "seeds": len(rs),
            "masked": sum(bool(r.get("masked")) for r in rs)}
        for k in RESULT_METRICS:
            vals = [r[k] for r in rs if not math.isnan(r[k])]
            row[f"{k}_mean"] = statistics.fmean(vals) if vals else float("nan")
            row[f"{k}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        out.append(row)
    return out


def switch_label(row: dict[str, Any]) -> str:
    """``2`` for a listed switch point; ``velocity<0.05x3 → 2.4`` for a switch rule."""
    rule = row.get("switch_rule", "")
    return f"{rule} → {row['switch_epoch']:.3g}" if rule else f"{row['switch_epoch']:g}"


def row_order(r: dict[str, Any]) -> tuple:
    """The one order of rows in every table, CSV and legend: variant, phase-1 data mode
    (C, A, F), code (its phase-1 network X- first), switch rule, switch epoch."""
    return (r.get("variant", ""), MODES.index(r["code"][0]), r["code"],
            r.get("switch_rule", ""), r["switch_epoch"])


def summary_markdown(summary: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table: clean and PGD accuracy (%), mean ± std over seeds
    (with a first column naming the variant when the rows come from a sweep that varies one)."""
    variants = any(r.get("variant") for r in summary)
    lines = ["| code | switch epoch | seeds | " + " | ".join(METRIC_LABELS.values())
             + " | masking |", "|---|---:|---:|" + "---:|" * len(METRIC_LABELS) + "---|"]
    if variants:
        lines = ["| variant " + lines[0], "|---" + lines[1]]
    for r in sorted(summary, key=row_order):
        cells = []
        for k in RESULT_METRICS:
            mean, std = r[f"{k}_mean"], r[f"{k}_std"]
            cells.append("-" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}")
        flag = f"masked ({r['masked']} of {r['seeds']} seeds)" if r.get("masked") else ""
        lines.append((f"| {r['variant']} " if variants else "")
                     + f"| {r['code']} | {switch_label(r)} | {r['seeds']} | "
                     + " | ".join(cells) + f" | {flag} |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, table: list[dict[str, Any]], fields) -> None:
    """Writes ``table`` (one dict per row) as CSV with columns ``fields``."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table)


def write_summary(out: Path, summary: list[dict[str, Any]], notes: str = "") -> list[Path]:
    """Writes ``summary.csv`` and ``summary.md`` (the table, then ``notes``) under ``out``."""
    (out / "summary.md").write_text(summary_markdown(summary) + notes)
    write_csv(out / "summary.csv", sorted(summary, key=row_order),
               list(summary[0]) if summary else ["code", "switch_epoch", "seeds"])
    return [out / "summary.csv", out / "summary.md"]


def write_results(out: Path, cfg: ExperimentConfig, rows: list[dict[str, Any]]) -> dict[str, Path]:
    """Writes results.csv, summary.csv, summary.md and results.json under ``out``."""
    paths = {"results": out / "results.csv", "summary": out / "summary.csv",
             "markdown": out / "summary.md", "json": out / "results.json"}
    summary = summarize(rows)
    write_summary(out, summary)
    write_csv(paths["results"], rows, RESULT_FIELDS)
    paths["json"].write_text(json.dumps(
        {"config": cfg.model_dump(mode="json"), "rows": rows, "summary": summary}, indent=1
    ))
    return paths
