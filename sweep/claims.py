"""``ntk-sweep claims RUN_DIR``: the paper's claims (``core.claims``) checked on a finished run.

A run is an experiment's output (``results.json``) or a sweep's (``sweep.json``: its own
finished trials, one study per variant, i.e. per value of the swept parameters other than the
seed). Claim 3 reads the kernels stored with the phase-1 trajectories (the sweep computes them
when ``kernel.enabled``; for an experiment, ``ntk-sweep kernel RUN_DIR``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from core.claims import (
    CONVERGENCE_FRACTION,
    Claim,
    claims_json,
    claims_markdown,
    evaluate,
    kernel_evidence,
)
from core.config import ConfigError, ExperimentConfig, stored_config
from core.kernel_store import DamagedKernel, KernelTrajectory

SECTION = "## The paper's claims"
VERDICT_STYLE = {"holds": "green", "does not hold": "yellow", "reversed": "red",
                 "not enough data": "dim"}


@dataclass
class Study:
    """Result rows of one configuration (all its seeds) and its trajectories' kernels."""

    variant: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    kernels: dict[tuple[str, int], KernelTrajectory] = field(default_factory=dict)


def _add_trajectories(study: Study, cfg: ExperimentConfig, store_root: Path) -> None:
    """The kernel trajectories of the config's C and A trajectories: those of its kernel
    settings, or the only ones of its output mode that were computed."""
    from core.trajectory_store import TrajectoryStore

    for trajectory in TrajectoryStore(store_root).of(cfg):
        key = (trajectory.mode, trajectory.seed)
        study.kernels[key] = trajectory.kernels(cfg.kernel, any_of_output=True)


def studies(run_dir: Path) -> list[Study]:
    """The studies of an experiment or sweep output directory; ConfigError naming the file
    if it is neither, or damaged."""
    from sweep.layout import StateFileError, read_results

    try:
        if (run_dir / "sweep.json").is_file():
            return _sweep_studies(run_dir)
        path = run_dir / "results.json"
        if not path.is_file():
            raise ConfigError(f"{run_dir}: neither results.json (an experiment's output) nor "
                              "sweep.json (a sweep's)")
        results = read_results(path)
        study = Study("", results["rows"])
        _add_trajectories(study, stored_config(results["config"], str(path)), run_dir)
        return [study]
    except StateFileError as e:
        raise ConfigError(str(e)) from None


def _sweep_studies(out: Path) -> list[Study]:
    from sweep.review import load_sweep, trial_status

    state, _ = load_sweep(out)
    return sweep_studies(out, [r["trial"] for r in trial_status(out, state)
                               if r["status"] == "finished"])


def sweep_studies(out: Path, trials: list[str]) -> list[Study]:
    """One study per variant over the given trials that finished (their results.json)."""
    from sweep.layout import read_results, variant_label

    by_variant: dict[str, Study] = {}
    for trial in sorted(trials):
        directory = out / "trials" / trial
        if not (directory / "results.json").is_file():
            continue
        results = read_results(directory / "results.json")
        variant = variant_label(directory)
        study = by_variant.setdefault(variant, Study(variant))
        study.rows += results["rows"]
        _add_trajectories(study, stored_config(results["config"],
                                                  str(directory / "results.json")), out)
    return [by_variant[v] for v in sorted(by_variant)]


def study_claims(study: Study, metric: str = "worst_linf",
                 fraction: float = CONVERGENCE_FRACTION) -> list[Claim]:
    """Every claim of one study (``fraction``: claim 3's convergence criterion). A damaged
    kernel file leaves claims 3 without data, and their evidence names the file."""
    try:
        curves, pairs = kernel_evidence(study.kernels)
    except DamagedKernel as e:
        return [c if not c.key.startswith("3") else
                Claim(c.key, c.statement, c.verdict, (str(e),))
                for c in evaluate(study.rows, (), {}, metric, fraction)]
    return evaluate(study.rows, curves, pairs, metric, fraction)


def claims_section(results: list[tuple[str, list[Claim]]]) -> str:
    """Markdown for ``summary.md`` and ``claims.md``: a section per study."""
    return "\n".join(claims_markdown(c, SECTION[3:] + (f" ({v})" if v else ""))
                     for v, c in results)


def write_claims(out: Path, results: list[tuple[str, list[Claim]]]) -> list[Path]:
    """``claims.md`` and ``claims.json`` under ``out``, and the claims as the last section of
    its ``summary.md`` (replacing an earlier one: ``ntk-sweep kernel`` adds claim 3's data)."""
    section = claims_section(results)
    (out / "claims.md").write_text(section)
    (out / "claims.json").write_text(json.dumps(
        [{"variant": v, "claims": claims_json(c)} for v, c in results], indent=1))
    summary = out / "summary.md"
    if summary.is_file():
        text = summary.read_text()
        text = text[:text.index(SECTION)].rstrip("\n") if SECTION in text else text.rstrip("\n")
        summary.write_text(f"{text}\n\n{section}")
    return [out / "claims.md", out / "claims.json"]


def show_claims(console: Console, results: list[tuple[str, list[Claim]]]) -> None:
    """A table per study: claim, verdict (coloured), evidence."""
    for variant, claims in results:
        table = Table(title="the paper's claims" + (f" ({variant})" if variant else ""),
                      show_lines=True)
        for column in ("claim", "verdict", "evidence"):
            table.add_column(column)
        for c in claims:
            style = VERDICT_STYLE[c.verdict]
            table.add_row(f"{c.key}: {c.statement}", f"[{style}]{c.verdict}[/{style}]",
                          "\n".join(c.evidence))
        console.print(table)


def read_claims(out: Path) -> list[tuple[str, list[Claim]]]:
    """What ``write_claims`` wrote (``claims.json``), for printing without recomputing;
    StateFileError naming the file if it is not that."""
    from sweep.layout import StateFileError, read_json

    path = out / "claims.json"
    try:
        return [(s["variant"], [Claim(c["key"], c["statement"], c["verdict"],
                                      tuple(c["evidence"]), c["numbers"]) for c in s["claims"]])
                for s in read_json(path, list)]
    except (KeyError, TypeError) as e:
        raise StateFileError(f"{path}: not what ntk-sweep wrote ({type(e).__name__}: {e})"
                             ) from None


def record_claims(out: Path, found: list[Study]) -> list[tuple[str, list[Claim]]]:
    """Evaluates and writes (``write_claims``) the claims of the studies, returns them."""
    results = [(s.variant, study_claims(s)) for s in found]
    write_claims(out, results)
    return results


def claim_tags(results: list[tuple[str, list[Claim]]]) -> dict[str, str]:
    """MLflow tags of the verdicts: ``claim/<key>`` (e.g. ``claim/2_CA``); with several
    studies ``claim/<i>/<key>``, and ``claim/<i>`` names the variant."""
    def key(k: str) -> str:
        return re.sub(r"\W+", "_", k).strip("_")

    if len(results) == 1:
        return {f"claim/{key(c.key)}": c.verdict for c in results[0][1]}
    tags = {}
    for i, (variant, claims) in enumerate(results):
        tags[f"claim/{i}"] = variant
        tags.update({f"claim/{i}/{key(c.key)}": c.verdict for c in claims})
    return tags
