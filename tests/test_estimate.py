"""What a run computes, counted from its config (``core/workload.py``), against what a real run
did; and the time estimate built on it (``core/estimate.py``, ``validate --estimate``)."""

from __future__ import annotations

from collections import Counter

import pytest
import yaml

from core.estimate import estimate, measure
from core.experiment import Hooks, Stage, run_experiment
from core.workload import Work, experiment_work, sweep_work
from sweep.cli import main
from sweep.space import parse_space
from tests.helpers import SWEEP, tiny_cfg

EVAL = {"linf": {"eps": 0.1, "iters": 2}, "l2": None, "transfer": True, "reference": "A"}


def _counted_run(cfg, out) -> Work:
    """Runs ``cfg`` and counts what it did: steps by phase and data mode (clean or
    adversarial), evaluations from the experiment's own log lines."""
    stage: list[Stage] = []
    steps: Counter[tuple[int, str]] = Counter()
    said: list[str] = []

    def on_step() -> None:
        s = stage[-1]
        mode = s.code[0] if s.phase == 1 else s.code[1]
        steps[(s.phase, mode)] += 1

    run_experiment(cfg, out, Hooks(on_step=on_step, on_stage=stage.append, log=said.append))
    return Work(
        clean1=steps[(1, "C")], adv1=steps[(1, "A")],
        clean2=steps[(2, "C")], adv2=steps[(2, "A")],
        networks=sum("evaluating the network" in m for m in said),
        models=sum(": phase 2 from epoch" in m for m in said),
        references=sum("reference examples" in m for m in said),
    )


@pytest.mark.parametrize("switch_points", [[0, 1, 2], [1, 2]])
def test_counted_work_is_what_a_run_does(tmp_path, switch_points):
    """Every code from every switch point, the reference network's trajectory and its
    examples, switch point 0 computed once per loader data mode: the counts from the config
    equal the steps and evaluations of a real run (no kernels: an experiment has none)."""
    cfg = tiny_cfg(codes=["CC", "AC", "CA", "AA"], switch_points=switch_points, eval=EVAL,
                   seeds=[0])
    counted = experiment_work(cfg, n_train=64)
    assert counted == _counted_run(cfg, tmp_path / "run")
    assert counted.adv1 > 0 and counted.adv2 > 0 and counted.kernels == 0


def test_a_sweep_counts_a_shared_trajectory_once():
    """Trials that differ only in phase 2 share their phase-1 trajectories (and kernels):
    the sweep trains each once, so it is counted once; phase 2 and evaluations per trial."""
    a = tiny_cfg(switch_points=[1, 2], kernel={"probe_size": 12})
    b = tiny_cfg(switch_points=[1, 2], kernel={"probe_size": 12},
                 phase2={"epochs": 1, "batch_size": 16, "lr": 0.5})
    one, trajectories = sweep_work([a], 64)
    both, shared = sweep_work([a, b], 64)
    assert trajectories == shared == 1
    assert (both.clean1, both.kernels) == (one.clean1, one.kernels) and one.kernels > 0
    assert (both.clean2, both.models) == (2 * one.clean2, 2 * one.models)
    other_seed, _ = sweep_work([a, tiny_cfg(switch_points=[1, 2], kernel={"probe_size": 12},
                                            seeds=[1])], 64)
    assert other_seed.clean1 == 2 * one.clean1


def test_measured_unit_times_cover_the_work_the_run_has():
    """Every kind of work the run has gets a positive time; kinds it lacks stay 0; the
    estimate is the counts times the unit times plus compilation."""
    cfg = tiny_cfg(codes=["CC", "CA"], switch_points=[1])  # no adversarial phase 1
    work = experiment_work(cfg, 64)
    units = measure(cfg, work)
    for kind in ("clean1", "clean2", "adv2", "networks", "models"):
        assert getattr(units, kind) > 0, kind
    assert units.adv1 == units.kernels == units.references == 0
    assert units.compile > 0
    est = estimate([cfg], lambda cs: experiment_work(cs[0], 64))
    assert est.work == work and est.trials == 1 and est.shapes == est.timed_shapes == 1
    assert est.total_s == pytest.approx(sum(est.seconds.values()) + est.compile_s)
    assert set(k for k, v in est.seconds.items() if v > 0) == {
        "clean1", "clean2", "adv2", "networks", "models"}


def test_validate_estimates_a_sweep(tmp_path, capsys):
    """``validate --estimate``: the sweep's time on this machine by kind of work, each
    shared trajectory counted once; without ``--estimate`` nothing is timed."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(SWEEP))
    assert main(["validate", str(path)]) == 0
    assert "estimate on this machine" not in capsys.readouterr().out
    assert main(["validate", str(path), "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "estimate on this machine (cpu" in out and "for 2 trials" in out
    # 2 seeds x 2 data modes (CC, AC) = 4 trajectories, each with a kernel per checkpoint
    work, trajectories = sweep_work(parse_space(SWEEP).configs(), 64)
    assert trajectories == 4
    assert f"kernels: {work.kernels:,} x" in out
    assert f"phase-1 adversarial steps: {work.adv1:,} x" in out
