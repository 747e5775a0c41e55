"""The experiment driver: checkpoint naming, resuming trajectories, switch rules."""

from __future__ import annotations

import json

import pytest

from core.checkpoints import CheckpointStore
from core.config import RESULT_METRICS
from core.experiment import Hooks, checkpoint_steps, run_experiment
from tests.helpers import BASE
from tests.helpers import tiny_cfg as _cfg


def test_trajectory_ids_of_stored_trajectories_do_not_change():
    """Ids as the first release computed them (trajectories stored by it are continued, not
    trained again): a field added since (the attack's ``schedule``) changes them only when set
    to something else than its default."""
    from core.trajectory_store import trajectory_id

    cfg = _cfg(switch_points=[1])
    assert [trajectory_id(cfg, m, s) for m, s in (("A", 0), ("C", 0), ("F", 3))] == \
        ["c2c4de496ac92a8c", "a86a7129d44e19eb", "fc1269afc875cfb1"]
    apgd = _cfg(switch_points=[1], phase1={**BASE["phase1"], "attack": {"schedule": "apgd"}})
    assert trajectory_id(apgd, "A", 0) != "c2c4de496ac92a8c"
    assert trajectory_id(apgd, "C", 0) == "a86a7129d44e19eb"  # C has no attack


def test_whole_epochs_and_switch_points_name_colliding_steps():
    cfg = _cfg(switch_points=[0, 0.5, 2], fractional_checkpoints=[0.125, 0.25, 0.4])
    steps = checkpoint_steps(cfg, steps_per_epoch=2)
    # 0.125 and 0.25 round to step 0 (epoch 0 wins); 0.4 and 0.5 to step 1 (the switch wins).
    assert steps == {0: 0, 1: 0.5, 2: 1, 4: 2}


@pytest.mark.slow
def test_a_new_earlier_switch_point_resumes_from_before_it(tmp_path):
    first = run_experiment(_cfg(switch_points=[0, 2], fractional_checkpoints=[]), tmp_path)
    (traj,) = [p for p in (tmp_path / "trajectories").iterdir() if p.is_dir()]
    assert CheckpointStore(traj / "trajectory.pack").steps() == [0, 4, 8]
    # Step 2 (epoch 0.5) was never stored: phase 1 reruns from step 0, deterministically.
    second = run_experiment(_cfg(switch_points=[0, 0.5, 2], fractional_checkpoints=[]), tmp_path)
    assert CheckpointStore(traj / "trajectory.pack").steps() == [0, 2, 4, 8]
    def strip(rows):  # NaN (no L2 attack, no transfer) compares unequal to itself
        return [{k: None if v != v else v for k, v in r.items() if k != "seconds"} for r in rows]

    same = [r for r in strip(second) if r["switch_epoch"] != 0.5]
    assert same == strip(first)
    assert {r["switch_epoch"] for r in second} == {0, 0.5, 2}


@pytest.mark.slow
def test_switch_rule_triggers_where_the_velocities_say(tmp_path):
    from core.trajectory_kernels import compute_trajectory_kernels, trajectory_measures
    from core.trajectory_store import TrajectoryStore

    common = {"codes": ["AC"], "fractional_checkpoints": [0.5, 1.5, 2.5],
              "phase1": {**BASE["phase1"], "epochs": 4,
                         "attack": {"eps": 0.1, "iters": 2}},
              "kernel": {"probe_size": 12}}
    # The reference: all of phase 1, with the velocities a sweep logs at every checkpoint.
    ref = _cfg(**common, switch_points=[0, 4])
    run_experiment(ref, tmp_path / "ref")
    (info,) = TrajectoryStore(tmp_path / "ref").stored()
    rows = trajectory_measures(compute_trajectory_kernels(info, ref.kernel), 3)
    epochs, vel = [r["epoch"] for r in rows], [r["velocity"] for r in rows]
    # A threshold that two consecutive checkpoints meet before the last one, and the first
    # checkpoint where they do, read plainly from the logged velocities.
    v = min(max(vel[t - 1], vel[t]) for t in range(2, len(vel) - 1)) * (1 + 1e-6)
    expected = next(epochs[t] for t in range(2, len(vel)) if vel[t - 1] < v and vel[t] < v)
    assert expected < 4

    rule = {"measure": "velocity", "below": v, "checkpoints": 2}
    cfg = _cfg(**common, switch_points=[0], switch_rule=rule)
    result = run_experiment(cfg, tmp_path / "rule")
    label = cfg.switch_rule.label()
    ruled = [r for r in result if r["switch_rule"] == label]
    assert {r["code"] for r in ruled} == {"A-", "AC"}
    assert {r["switch_epoch"] for r in ruled} == {expected}
    # Phase 1 stopped at the trigger: nothing was trained past it.
    (traj,) = [p for p in (tmp_path / "rule" / "trajectories").iterdir() if p.is_dir()]
    steps = CheckpointStore(traj / "trajectory.pack").steps()
    assert steps[-1] == round(expected * 4)  # 4 steps per epoch
    assert {r["switch_epoch"] for r in result if not r["switch_rule"]} == {0}


@pytest.mark.slow
def test_switch_rule_that_never_triggers_runs_phase1_to_its_end(tmp_path):
    cfg = _cfg(switch_points=[], fractional_checkpoints=[],
               switch_rule={"measure": "to_previous", "below": 1e-12, "checkpoints": 1},
               kernel={"probe_size": 12})
    messages = []
    assert run_experiment(cfg, tmp_path, Hooks(log=messages.append)) == []
    assert any("did not trigger within 2 epochs" in m for m in messages)
    (traj,) = [p for p in (tmp_path / "trajectories").iterdir() if p.is_dir()]
    assert CheckpointStore(traj / "trajectory.pack").steps() == [0, 4, 8]


def test_switch_rule_schema_errors():
    from core.config import ConfigError

    cases = {
        "phase1.epochs: required with switch_rule": {
            "phase1": {"lr": 0.05}, "switch_rule": {"below": 0.1}},
        "switch_points: give at least one switch point or a switch_rule": {
            "switch_points": []},
        "switch_rule.below: Input should be greater than 0": {"switch_rule": {"below": -1}},
        "switch_rule.measure: Input should be 'velocity' or 'to_previous'": {
            "switch_rule": {"below": 0.1, "measure": "speed"}},
        "switch_rule.checkpoint: unknown key (did you mean 'checkpoints'?)": {
            "switch_rule": {"below": 0.1, "checkpoint": 2}},
    }
    for message, changes in cases.items():
        with pytest.raises(ConfigError) as error:
            _cfg(**changes)
        assert message in str(error.value)


def test_summary_keeps_sweep_variants_apart():
    from core.results import summarize, summary_markdown

    def row(variant, seed, robust):
        return {"variant": variant, "seed": seed, "code": "AC", "switch_epoch": 2.0,
                "switch_rule": "", **dict.fromkeys(RESULT_METRICS, float("nan")),
                "accuracy": 0.9, "robust_linf": robust}

    rows = [row("phase1.attack.eps=0.1", 0, 0.1), row("phase1.attack.eps=0.1", 1, 0.3),
            row("phase1.attack.eps=0.3", 0, 0.5)]
    summary = sorted(summarize(rows), key=lambda r: r["variant"])
    assert [(r["variant"], r["seeds"]) for r in summary] == [("phase1.attack.eps=0.1", 2),
                                                             ("phase1.attack.eps=0.3", 1)]
    assert summary[0]["robust_linf_mean"] == pytest.approx(0.2)
    table = summary_markdown(summary)
    assert table.splitlines()[0].startswith("| variant | code |")
    # clean, then worst L-inf (not evaluated here), then PGD L-inf
    assert "| phase1.attack.eps=0.3 | AC | 2 | 1 | 90.0 ± 0.0 | - | 50.0 ± 0.0 |" in table


@pytest.mark.slow
def test_trials_sharing_a_trajectory_compute_its_kernels_once(tmp_path):
    """Two workers (threads here; trials in a sweep) asking for one trajectory's kernels at
    once: the trajectory's lock makes the second find them stored."""
    import threading

    from core.trajectory_kernels import compute_trajectory_kernels
    from core.trajectory_store import TrajectoryStore

    cfg = _cfg(switch_points=[0, 2], fractional_checkpoints=[0.5], kernel={"probe_size": 12})
    run_experiment(cfg, tmp_path)
    (info,) = TrajectoryStore(tmp_path).stored()
    computed: list[float] = []
    workers = [threading.Thread(target=compute_trajectory_kernels,
                                args=(info, cfg.kernel, computed.append)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stored = compute_trajectory_kernels(info, cfg.kernel).epochs()
    assert sorted(computed) == stored == [0.0, 0.5, 1.0, 2.0]  # each once


def test_run_experiment_checks_its_config_against_the_data_before_work(tmp_path):
    """The checks the command line made (core.preflight) hold for run_experiment itself:
    a batch larger than the training set is refused naming the field, nothing trained."""
    from core.config import ConfigError

    cfg = _cfg(switch_points=[1], phase1={**BASE["phase1"], "batch_size": 65})  # 64 images
    with pytest.raises(ConfigError, match="phase1.batch_size: 65 exceeds the 64 training"):
        run_experiment(cfg, tmp_path)
    assert not (tmp_path / "trajectories").exists()


@pytest.mark.slow
def test_the_training_steps_compile_once_across_switch_points(tmp_path):
    """Each training step (phase, clean or adversarial) is traced and compiled once per
    experiment, not once per switch point or per phase-2 run: counted from jax's own
    monitoring events (trace, lowering to MLIR, which a persistent compilation cache does not
    skip), each attributed to the stage whose first epoch follows it."""
    import collections

    from jax import monitoring

    events: list[str] = []
    counts: collections.Counter = collections.Counter()

    def listener(event: str, duration: float, **kwargs) -> None:
        if kwargs.get("fun_name") in ("step", "jit(step)"):  # core.train.make_step's step
            events.append(event.rsplit("/", 1)[-1])

    def on_epoch(stage, epoch, metrics) -> None:  # (phase, data mode) of the events so far
        for event in events:
            counts[(stage.phase, stage.code[-1], event)] += 1
        events.clear()

    import core.experiment

    cfg = _cfg(codes=["CA", "AC"], switch_points=[0, 1, 2], fractional_checkpoints=[])
    core.experiment._PROGRAMS.clear()  # as a fresh process: an earlier test built these
    monitoring.register_event_duration_secs_listener(listener)
    try:
        rows = run_experiment(cfg, tmp_path, Hooks(on_epoch=on_epoch))
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert len([r for r in rows if not r["code"].endswith("-")]) == 6  # 6 phase-2 runs
    assert not events  # nothing traced after the last epoch
    stages = [(1, "C"), (1, "A"), (2, "A"), (2, "C")]  # CA: phase 2 on A, AC: on C
    for what in ("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration"):
        assert {s: counts[(*s, what)] for s in stages} == dict.fromkeys(stages, 1), what
    assert sum(counts.values()) == sum(counts[(*s, w)] for s in stages for w in (
        "jaxpr_trace_duration", "jaxpr_to_mlir_module_duration", "backend_compile_duration"))


@pytest.mark.slow
def test_switch_point_zero_is_computed_once(tmp_path):
    """At switch epoch 0 every data mode's network is the initial one, so A-@0, AC@0 and
    AA@0 are C-@0, CC@0 and CA@0 bit for bit: they are computed once (phase 2 trains 6 runs,
    not 8), their rows copied and their phase-2 epoch curves replayed under their own codes.
    From epoch 1 on the trajectories differ and so do the rows."""
    steps, curves = [0], {}
    hooks = Hooks(on_step=lambda: steps.__setitem__(0, steps[0] + 1),
                  on_epoch=lambda stage, epoch, m: curves.setdefault(stage, []).append(
                      (epoch, m)))
    cfg = _cfg(codes=["CC", "AC", "CA", "AA"], switch_points=[0, 1],
                   phase1={**BASE["phase1"], "attack": {"eps": 0.1, "iters": 2}})
    rows = run_experiment(cfg, tmp_path, hooks)
    spe = 64 // 16
    assert steps[0] == 2 * 2 * spe + (4 * 2 - 2) * 1 * spe  # phase 1 (C, A) + 6 phase-2 runs

    def same(a: str, b: str, epoch: float) -> bool:
        by = {(r["code"], r["switch_epoch"]): r for r in rows}
        strip = [json.dumps({k: v for k, v in by[c, epoch].items() if k not in ("code", "seconds")},
                            sort_keys=True) for c in (a, b)]
        return strip[0] == strip[1]

    assert same("A-", "C-", 0) and same("AC", "CC", 0) and same("AA", "CA", 0)
    assert not same("A-", "C-", 1) and not same("AC", "CC", 1)
    phase2 = {(s.code, s.switch_step): c for s, c in curves.items() if s.phase == 2}
    assert phase2["AC", 0] == phase2["CC", 0] and phase2["AA", 0] == phase2["CA", 0]
    assert len(rows) == 2 * (2 + 4)


def test_the_models_of_switch_step_0_are_keyed_by_what_they_read(tmp_path):
    """A model of step 0 is shared by the configs that differ only in what it never reads
    (codes, switch points, phase 1), and never by configs that differ in what it reads:
    phase 2 (not for the network), the evaluation, and with a reference network everything
    that decides where phase 1 ends (here the switch points, phase 1 having no length)."""
    from core.experiment import _InitialRuns, make_context

    def key(loader: str = "C", seed: int = 0, **changes) -> str:
        cfg = _cfg(**{"switch_points": [0, 1], **changes})
        return _InitialRuns(make_context(cfg, tmp_path), seed).key(loader)

    base = key()
    assert key(switch_points=[0, 2]) == key(codes=["AC", "CA"]) == base
    assert key(phase1={**BASE["phase1"], "lr": 0.1}) == base
    lr = {**BASE["phase2"], "lr": 0.02}
    assert key(phase2=lr) != base and key("-", phase2=lr) == key("-")
    assert len({base, key("A"), key("-"), key(seed=1),
                key(eval={**BASE["eval"], "max_test": 8})}) == 5
    ref = {**BASE["eval"], "reference": "A"}
    open_ended = {**BASE["phase1"], "epochs": None}
    assert key(eval=ref, phase1=open_ended) != key(eval=ref, phase1=open_ended,
                                                     switch_points=[0, 2])


@pytest.mark.slow
def test_switch_point_zero_is_computed_once_per_store(tmp_path, caplog):
    """The models of switch step 0 are kept with the trajectory that computed them, so runs
    of the seed's other trajectories sharing the store (a sweep's AC trial after its CC
    trial) copy them: their rows bit for bit, their phase-2 curves replayed. A run of a
    trajectory other than C does step 0 last unless they are kept (so that the C trial can
    compute them meanwhile), and its rows still come in switch order. A damaged record is
    computed again, with a warning naming the pack."""
    import logging

    from core import trajectory_store
    from core.pack import Pack
    from core.trajectory_store import TrajectoryStore

    store = tmp_path / "store"
    phase1 = {**BASE["phase1"], "attack": {"eps": 0.1, "iters": 2}}

    def run(codes: list[str]) -> tuple[list[dict], int, list[str], dict]:
        steps, logs, curves = [0], [], {}
        hooks = Hooks(on_step=lambda: steps.__setitem__(0, steps[0] + 1), log=logs.append,
                      on_epoch=lambda stage, epoch, m: curves.setdefault(
                          (stage.code, stage.switch_step), []).append((epoch, m)))
        cfg = _cfg(codes=codes, switch_points=[0, 1], phase1=phase1)
        rows = run_experiment(cfg, tmp_path / "-".join(codes) / str(len(caplog.records)),
                              hooks, store_root=store)
        return rows, steps[0], logs, curves

    def row(rows: list[dict], code: str, epoch: float) -> str:
        (found,) = [r for r in rows if r["code"] == code and r["switch_epoch"] == epoch]
        return json.dumps({k: v for k, v in found.items() if k not in ("code", "seconds")},
                          sort_keys=True)

    def initial(mode: str) -> int:
        trajectory = TrajectoryStore(store).get(_cfg(switch_points=[1], phase1=phase1), mode, 0)
        return sum(k[0] == "initial" for k in Pack(trajectory.pack_path).entries())

    spe = 64 // 16
    cc, steps, _, cc_curves = run(["CC"])
    assert steps == 2 * spe + 2 * spe and initial("C") == 2  # C-@0 and CC@0
    ac, steps, _, ac_curves = run(["AC"])
    assert steps == 2 * spe + 1 * spe  # phase 1 of A, phase 2 from epoch 1 only
    assert row(ac, "A-", 0) == row(cc, "C-", 0) and row(ac, "AC", 0) == row(cc, "CC", 0)
    assert row(ac, "AC", 1) != row(cc, "CC", 1)
    assert ac_curves["AC", 0] == cc_curves["CC", 0] and initial("A") == 0
    aa, steps, logs, _ = run(["AA"])  # nothing of loader A is kept: AA@0 comes last
    assert steps == 2 * spe and initial("A") == 1
    phase2 = [m for m in logs if m.startswith("seed 0 AA: phase 2")]
    assert phase2 == ["seed 0 AA: phase 2 from epoch 1.0", "seed 0 AA: phase 2 from epoch 0.0"]
    assert [(r["code"], r["switch_epoch"]) for r in aa] == [
        ("A-", 0), ("AA", 0), ("A-", 1), ("AA", 1)]
    ca, steps, _, _ = run(["CA"])  # copies AA@0 from A's pack
    assert steps == 1 * spe and row(ca, "CA", 0) == row(aa, "AA", 0)

    pack = TrajectoryStore(store).get(_cfg(switch_points=[1], phase1=phase1), "C", 0).pack_path
    entry = max((e for k, e in Pack(pack).entries().items() if k[0] == "initial"),
                key=lambda e: e.offset)  # CC@0, kept after C-@0
    data = bytearray(pack.read_bytes())
    data[entry.data] ^= 0x01
    pack.write_bytes(bytes(data))
    trajectory_store._EVALUATIONS.clear()  # as another process: this one read it intact
    with caplog.at_level(logging.WARNING, logger="ntk_sweep"):
        again, steps, _, _ = run(["AC"])
    assert f"{pack}: damaged initial record of step 0" in caplog.text
    assert steps == 2 * spe and row(again, "AC", 0) == row(cc, "CC", 0)


def test_programs_are_traced_once_per_process_and_give_the_same_results(tmp_path):
    """A second experiment with the programs of the first (a reused Ray worker's next trial,
    say) lowers none of them again (``jax.monitoring``'s lowering events, one per program
    built for compilation) and gets the results of a process that built them afresh; so does
    an experiment of another phase-2 learning rate or length (a sweep over either)."""
    import jax

    import core.experiment

    def strip(rows):  # NaN (no L2 attack, no transfer) compares unequal to itself
        return [{k: None if v != v else v for k, v in r.items() if k != "seconds"}
                for r in rows]

    traces: list[str] = []

    def listen(event: str, seconds: float, **kwargs) -> None:
        if event.endswith("jaxpr_to_mlir_module_duration"):
            traces.append(event)

    cfg = _cfg(codes=["CC", "AC"], switch_points=[0, 1])
    programs = getattr(core.experiment, "_PROGRAMS", {})  # the process's programs
    programs.clear()
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        first = run_experiment(cfg, tmp_path / "a")
        traced_first = len(traces)
        again = run_experiment(cfg, tmp_path / "b")  # new trajectories: trains all again
        assert traced_first > 0 and len(traces) == traced_first, traces[traced_first:]
        assert strip(again) == strip(first)
        other = _cfg(codes=["CC", "AC"], switch_points=[0, 1],
                     phase2={**BASE["phase2"], "lr": 0.5})
        changed = run_experiment(other, tmp_path / "c")
        # Nothing is new: the learning rate is an argument of the phase steps, and phase 1,
        # the evaluations, the crafting and the transfer attack read no phase-2 rate.
        assert len(traces) == traced_first, traces[traced_first:]
        # Nor for a longer phase 2 (a sweep over phase2.epochs): no program reads its length.
        run_experiment(_cfg(codes=["CC", "AC"], switch_points=[0, 1],
                            phase2={**BASE["phase2"], "epochs": 2}), tmp_path / "e")
        assert len(traces) == traced_first, traces[traced_first:]
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    programs.clear()
    assert strip(run_experiment(other, tmp_path / "d")) == strip(changed)


_LOWER_EVERYTHING = """
import sys
from core.compat import use_compilation_cache
use_compilation_cache(sys.argv[1])
from core.experiment import run_experiment
from core.trajectory_kernels import compute_trajectory_kernels
from core.trajectory_store import TrajectoryStore
from tests.helpers import tiny_cfg
cfg = tiny_cfg(switch_points=[0, 1], model={"name": "mlp", "widths": [8, 8]})
cfg = cfg.model_copy(update={"kernel": cfg.kernel.model_copy(update={"probe_size": 12})})
run_experiment(cfg, sys.argv[2])
for trajectory in TrajectoryStore(sys.argv[2]).of(cfg):
    compute_trajectory_kernels(trajectory, cfg.kernel)
"""


@pytest.mark.slow
def test_every_program_is_the_same_in_every_process(tmp_path):
    """A sweep's workers share one persistent compilation cache: a program whose lowering
    depends on the process (a set iterated in its hash order, which PYTHONHASHSEED changes
    from process to process) is compiled again by every worker. The NTK's factor program
    was (its dense layers were a frozenset): a second process added a cache entry."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cache = tmp_path / "cache"
    entries = []
    for seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", _LOWER_EVERYTHING, str(cache), str(tmp_path / seed)],
            cwd=root, env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)},
            capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        entries.append(sorted(p.name for p in cache.iterdir() if p.name.endswith("-cache")))
    assert any(name.startswith("jit_factors-") for name in entries[0])
    assert entries[1] == entries[0], sorted(set(entries[1]) - set(entries[0]))
