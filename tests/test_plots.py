"""Plots: every figure as PNG and vector PDF, titles that say what was run."""

from __future__ import annotations

import numpy as np

from sweep.plots import describe, figure_files, heatmap_plot, switch_point_plot


def _summary(code: str, epoch: float, value: float) -> dict:
    return {"variant": "", "code": code, "switch_epoch": epoch, "switch_rule": "", "seeds": 2,
            **{f"{k}_{s}": value if s == "mean" else 0.01
               for k in ("worst_linf", "accuracy") for s in ("mean", "std")}}


def test_figures_come_as_png_and_pdf(tmp_path):
    summary = [_summary(c, e, 0.1 * i) for i, (c, e) in enumerate(
        [("AC", 0), ("AC", 2), ("AC", 10), ("A-", 0), ("A-", 2), ("A-", 10)])]
    png = switch_point_plot(summary, tmp_path / "switch_point.png", "digits, cnn")
    assert figure_files(png) == [png, tmp_path / "switch_point.pdf"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "switch_point.pdf").read_bytes()[:5] == b"%PDF-"
    heat = heatmap_plot([0, 1, 2, 10, 30], np.random.default_rng(0).random((5, 5)), "t",
                        tmp_path / "heat.png")
    assert len(figure_files(heat)) == 2
    table = tmp_path / "summary.csv"
    table.write_text("x\n")
    assert figure_files(table) == [table]  # not a figure: no twin


def test_describe_names_what_was_run_but_not_what_a_sweep_varies():
    params = {"dataset.name": "digits", "model.name": "cnn", "model.width": "32",
              "phase1.attack.eps": "0.3"}
    assert describe(params) == "digits, cnn width 32, phase-1 L-inf eps 0.3"
    assert describe(params, {"phase1.attack.eps"}) == "digits, cnn width 32"
    assert describe({**params, "model.width": "null"}, {"dataset.name"}) == \
        "cnn, phase-1 L-inf eps 0.3"


def test_rows_come_in_one_order_in_every_table(tmp_path):
    """The terminal table, summary.md and summary.csv list codes and switch points in the
    same order (``core.results.row_order``): C before A, X- before its loaders."""
    import csv
    import random

    from core.config import RESULT_METRICS
    from core.results import summarize, write_summary
    from sweep.terminal import summary_table

    rows = [{"seed": s, "code": c, "dynamics": "centered", "switch_epoch": e, "switch_rule": "",
             "masked": False, **dict.fromkeys(RESULT_METRICS, 0.5)}
            for s in (0, 1) for c in ("AA", "CC", "A-", "AC", "C-", "CA") for e in (10, 2, 0)]
    random.Random(0).shuffle(rows)
    want = [(c, e) for c in ("C-", "CA", "CC", "A-", "AA", "AC") for e in (0, 2, 10)]
    write_summary(tmp_path, summarize(rows))
    markdown = [line.split("|")[1:3] for line in (tmp_path / "summary.md").read_text()
                .splitlines()[2:]]
    assert [(c.strip(), float(e)) for c, e in markdown] == want
    with (tmp_path / "summary.csv").open() as f:
        assert [(r["code"], float(r["switch_epoch"])) for r in csv.DictReader(f)] == want
    table = summary_table(rows)
    codes = list(table.columns[0]._cells)
    epochs = [float(e) for e in table.columns[1]._cells]
    assert list(zip(codes, epochs, strict=True)) == want
