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
