"""Faults that must cost nothing but time: damaged checkpoints, concurrent writers, divergence,
bad input. (Killed workers, drivers, nodes and tracking servers: test_faults.py.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from core.checkpoints import CheckpointStore, DamagedCheckpoint
from core.data import load_digits
from core.experiment import Hooks, run_experiment
from core.models import init_model, make_model
from core.train import init_state
from tests.helpers import BASE
from tests.helpers import tiny_cfg as _cfg


def _strip(rows):  # NaN (no L2 attack, no transfer) compares unequal to itself
    return [{k: None if v != v else v for k, v in r.items() if k != "seconds"} for r in rows]


def _flip(store: CheckpointStore, step: int) -> None:
    """Flips a bit in the data of checkpoint ``step``'s record, in place."""
    data = bytearray(store.path.read_bytes())
    data[store.pack.entries()[step].data + 3] ^= 0x01
    store.path.write_bytes(bytes(data))


def _checkpoints(out: Path) -> CheckpointStore:
    return CheckpointStore(_trajectory(out) / "trajectory.pack")


def _trajectory(out: Path) -> Path:
    (traj,) = [p for p in (out / "trajectories").iterdir() if p.is_dir()]
    return traj


@pytest.mark.slow
def test_damaged_checkpoints_are_set_aside_and_remade(tmp_path):
    cfg = _cfg(switch_points=[0, 2], fractional_checkpoints=[])
    clean = run_experiment(cfg, tmp_path / "clean")
    run_experiment(cfg, tmp_path / "run")
    store = _checkpoints(tmp_path / "run")
    assert store.steps() == [0, 4, 8]

    # The damaged checkpoint a switch point needs: set aside, retrained from the one before,
    # and the results are those of the clean run.
    _flip(store, 8)
    kept = store.path.read_bytes()
    messages: list[str] = []
    again = run_experiment(cfg, tmp_path / "run", Hooks(log=messages.append))
    assert _strip(again) == _strip(clean)
    assert any("checkpoint at step 8 is damaged" in m and "voided, kept in place" in m
               for m in messages), messages
    store = CheckpointStore(store.path)
    assert store.steps() == [0, 4, 8]
    assert store.path.read_bytes()[:len(kept)] == kept  # kept for inspection

    # The latest checkpoint, where a longer phase 1 would continue, damaged: it continues from
    # the one before, and matches a longer run made from scratch.
    longer = _cfg(switch_points=[0, 3], fractional_checkpoints=[],
                  phase1={**BASE["phase1"], "epochs": 3})
    _flip(store, 8)
    messages.clear()
    extended = run_experiment(longer, tmp_path / "run", Hooks(log=messages.append))
    assert any("continuing at step 4" in m for m in messages), messages
    assert _strip(extended) == _strip(run_experiment(longer, tmp_path / "clean-longer"))

    # A half-written record at the end (a crash in a save) is not a step.
    store = CheckpointStore(store.path)
    entry = store.pack.entries()[12]
    with open(store.path, "ab") as f:
        f.write(store.path.read_bytes()[entry.offset:entry.data + 10])
    assert CheckpointStore(store.path).steps() == [0, 4, 8, 12]


def test_the_same_step_set_aside_twice_in_a_second_keeps_both(tmp_path):
    """Set-aside names carried the time to the second: a step damaged again within that
    second (a fast remake) collided with the first (OSError: directory not empty)."""
    model = make_model("mlp", 3, widths=(8,))
    params, bs = init_model(model, jax.random.PRNGKey(0), (8, 8, 1))
    state = init_state(params, bs, momentum=0.9, key=jax.random.PRNGKey(1))
    store = CheckpointStore(tmp_path / "trajectory.pack")
    moved = []
    for _ in range(3):
        store.save(0, state, {"history": []})
        moved.append(store.quarantine(0))
    assert len(set(moved)) == 3 and all("voided, kept in place" in m for m in moved)
    assert store.steps() == []


@pytest.mark.slow
def test_two_experiments_sharing_a_trajectory_store(tmp_path):
    """Two processes that need the same trajectory at once: one trains it, the other waits
    for the lock and reuses it; both get the results of a run alone."""
    script = (
        "import sys, json\n"
        "from core.experiment import run_experiment\n"
        "from tests.helpers import tiny_cfg as _cfg\n"
        "rows = run_experiment(_cfg(switch_points=[0, 2], fractional_checkpoints=[]),\n"
        "                      sys.argv[1], store_root=sys.argv[2])\n"
        "print(json.dumps([r['robust_linf'] for r in rows]))\n"
    )
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"out{i}"),
                               str(store)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1]) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    alone = run_experiment(_cfg(switch_points=[0, 2], fractional_checkpoints=[]),
                           tmp_path / "alone")
    expected = [r["robust_linf"] for r in alone]
    import json

    assert [json.loads(o.strip().splitlines()[-1]) for o in outputs] == [expected, expected]
    assert _checkpoints(store).steps() == [0, 4, 8]


DIGITS_TRAIN = len(load_digits().y_train)
SWEEP_FILE = {
    "name": "bad-input",
    "dataset": {"name": "digits"},
    "model": {"name": "mlp", "widths": [8]},
    "codes": ["AC"],
    "switch_points": [0, 1],
    "seeds": [0, 1],
    "phase1": {"epochs": 1, "lr_decay_epochs": []},
    "phase2": {"epochs": 1},
    "kernel": {"probe_size": 20},
    "sweep": {"resources": {"cpus": 1}},
}


@pytest.mark.parametrize("change, message", [
    ({"kernel": {"probe_size": 5000}},
     f"kernel.probe_size: 5000 exceeds the {DIGITS_TRAIN} training images of digits"),
    # [1000, 1000, 10, 10] float32 kernels at 7 checkpoints (epochs 0 and 1, 5 fractional) of
    # one trajectory (A) per trial, 2 trials.
    ({"kernel": {"probe_size": 1000, "output": "full", "storage_budget_gb": 1}},
     f"kernel.storage_budget_gb: the kernel files would take about "
     f"{1000**2 * 10**2 * 4 * 7 * 2 / 1e9:.1f} GB (1000 probe images, output full), "
     "above the budget of 1 GB"),
    ({"dataset": {"name": "cifar10", "data_dir": "/nonexistent/cifar"}}, "/nonexistent/cifar"),
    ({"phase1": {"epochs": 1, "attack": {"eps": -0.1}}},
     "phase1.attack.eps: Input should be greater than 0"),
    ({"switch_points": [0, 5]}, "switch_points: 5.0 is beyond phase1.epochs = 1.0"),
    ({"phase2": {"epochs": 1, "lr": {"grid": [0.1, -1]}}}, "phase2.lr.grid[1] = -1 is invalid"),
    ({"kernel": {"probe_sise": 10}}, "kernel.probe_sise: unknown key (did you mean 'probe_size'?)"),
])
def test_bad_sweeps_exit_2_naming_the_field_before_ray(tmp_path, capsys, change, message):
    import ray
    import yaml

    from sweep.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**SWEEP_FILE, **change}))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


def test_unwritable_sweep_output_exits_2(tmp_path, capsys):
    import yaml

    from sweep.cli import main

    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(SWEEP_FILE))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["run", str(path), "--out", str(blocker / "out")]) == 2
    assert f"output directory {blocker / 'out'} is not writable" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_mlflow_database_exits_2_naming_it(tmp_path, capsys, damage):
    """run, resume and report on an output directory whose mlflow.db is not a database MLflow
    can read: exit 2 naming the file, before Ray starts, and the file is left as it was."""
    import json

    import ray
    import yaml

    from sweep.cli import main
    from sweep.tracking import Tracker

    out = tmp_path / "out"
    out.mkdir()
    db = out / "mlflow.db"
    if damage == "garbage":
        db.write_bytes(b"\x00\xff not a database " * 100)
    else:  # a real MLflow database cut in half
        Tracker(f"sqlite:///{db}").check()
        db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    before = db.read_bytes()
    (out / "sweep.json").write_text(json.dumps({
        "name": "s", "space": SWEEP_FILE, "storage": "ray", "tracking_uri": "sqlite:///mlflow.db",
        "experiment_id": "1", "parent_run": "0" * 32, "out": str(out)}))
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(SWEEP_FILE))
    for argv in (["run", str(path), "--out", str(out)], ["resume", str(out)], ["report", str(out)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{db}: " in err and "Traceback" not in err, (argv, err)
    assert db.read_bytes() == before and not ray.is_initialized()


def _equal_states(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_flipped_bytes_and_swapped_states_are_damage_not_other_parameters(tmp_path):
    """orbax's compressed array files carried no checksum: a flipped byte restored without
    error as different parameters, and another step's state/ restored too. Now every byte of
    a checkpoint record is checked: a flip in the prefix or the header fails the header's
    checksum (or its bounds) and the record is not listed, a flip in the raw array bytes fails
    the state's digest."""
    model = make_model("mlp", 10, widths=(32,))
    params, bs = init_model(model, jax.random.PRNGKey(0), (8, 8, 1))
    state = init_state(params, bs, 0.9, jax.random.PRNGKey(0))
    other = state._replace(params=jax.tree.map(lambda p: p + 1.0, params))
    store = CheckpointStore(tmp_path / "c.pack")
    store.save(0, state, {"epoch": 0})
    store.save(4, other, {"epoch": 1})
    assert _equal_states(store.restore(0, state)[0], state)

    path = store.path
    clean = path.read_bytes()
    data, end = store.pack.entries()[0].data, store.pack.entries()[4].offset
    offsets = [*range(data), *range(data, end, (end - data) // 40), end - 1]
    outcomes: dict[str, list[int]] = {"same": [], "digest": [], "unreadable": []}
    for offset in offsets:
        flipped = bytearray(clean)
        flipped[offset] ^= 0x10
        path.write_bytes(bytes(flipped))
        try:
            restored = CheckpointStore(path).restore(0, state)[0]
        except DamagedCheckpoint as e:
            outcomes["digest" if "digest mismatch" in str(e) else "unreadable"].append(offset)
            continue
        assert _equal_states(restored, state), f"byte {offset} flipped: other parameters"
        outcomes["same"].append(offset)
    assert outcomes["same"] == [], outcomes["same"]  # raw bytes: no flip goes unnoticed
    assert outcomes["digest"] == [o for o in offsets if o >= data]
    assert outcomes["unreadable"] == [o for o in offsets if o < data]

    # Step 4's arrays under step 0's header (the state/ swap of orbax checkpoints).
    path.write_bytes(clean[:data] + clean[-(end - data):] + clean[end:])
    with pytest.raises(DamagedCheckpoint, match="digest mismatch"):
        CheckpointStore(path).restore(0, state)


@pytest.mark.slow
def test_a_swapped_switch_point_checkpoint_is_set_aside_and_remade(tmp_path):
    """The experiment's path: a checkpoint holding other arrays is set aside and remade, never
    trained on (it used to surface as 'training diverged')."""
    cfg = _cfg(switch_points=[0, 2], fractional_checkpoints=[])
    clean = run_experiment(cfg, tmp_path / "clean")
    run_experiment(cfg, tmp_path / "run")
    store = _checkpoints(tmp_path / "run")
    four, eight = store.pack.entries()[4], store.pack.entries()[8]
    data = bytearray(store.path.read_bytes())
    data[eight.data:eight.data + eight.nbytes] = data[four.data:four.data + four.nbytes]
    store.path.write_bytes(bytes(data))
    messages: list[str] = []
    again = run_experiment(cfg, tmp_path / "run", Hooks(log=messages.append))
    assert _strip(again) == _strip(clean)
    assert any("checkpoint at step 8 is damaged" in m and "digest mismatch" in m
               and f"bytes {eight.offset}+" in m for m in messages), messages
    assert CheckpointStore(store.path).steps() == [0, 4, 8]


@pytest.mark.slow
def test_resume_from_a_fractional_checkpoint_reports_whole_epochs(tmp_path):
    """A trial killed after a fractional checkpoint and before the epoch's end resumes there:
    the epoch's loss and accuracy must still be the mean over all its minibatches, not over
    those after the resume (which is what was logged before checkpoints kept them)."""
    cfg = _cfg(switch_points=[0, 2], fractional_checkpoints=[0.25, 1.5])
    run_experiment(cfg, tmp_path / "clean")
    clean = _checkpoints(tmp_path / "clean")
    assert clean.steps() == [0, 1, 4, 6, 8]  # 4 minibatches an epoch
    # The kill: everything after the checkpoint at epoch 1.5 is lost.
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "clean", run)
    store = _checkpoints(run)
    with open(store.path, "r+b") as f:
        f.truncate(store.pack.entries()[8].offset)
    messages: list[str] = []
    run_experiment(cfg, run, Hooks(log=messages.append))
    assert any("continuing at step 6" in m for m in messages), messages
    assert CheckpointStore(store.path).meta(8)["history"] == clean.meta(8)["history"]


@pytest.mark.slow
def test_a_damaged_kernel_record_is_voided_and_computed_again(tmp_path, caplog):
    """A flipped bit in a stored kernel: the next kernel computation of the trajectory (under
    its lock) voids the record and computes it again, bit for bit the kernel it was."""
    import logging

    import core.kernel_store as ks
    from core.trajectory_kernels import compute_trajectory_kernels
    from core.trajectory_store import TrajectoryStore

    cfg = _cfg(codes=["CC"], switch_points=[0, 1], fractional_checkpoints=[])
    run_experiment(cfg, tmp_path)
    (trajectory,) = TrajectoryStore(tmp_path).stored()
    spec = cfg.kernel.model_copy(update={"probe_size": 12})
    kernels = compute_trajectory_kernels(trajectory, spec)
    clean = kernels.stack()
    entry = kernels.pack.entries()[1.0]
    data = bytearray(kernels.path.read_bytes())
    data[entry.data + 2] ^= 0x01
    kernels.path.write_bytes(bytes(data))
    ks.clear_cache()
    with pytest.raises(ks.DamagedKernel,
                       match=r"kernel of epoch 1 \(bytes .*damaged \(digest mismatch"):
        ks.KernelTrajectory(kernels.path, kernels.setting).load(1.0)
    with caplog.at_level(logging.WARNING, logger="core.trajectory_kernels"):
        again = compute_trajectory_kernels(trajectory, spec)
    assert any("kernel of epoch 1 " in r.getMessage() and "computed again" in r.getMessage()
               for r in caplog.records)
    ks.clear_cache()
    epochs, stack = ks.KernelTrajectory(again.path, again.setting).stack()
    assert epochs.tolist() == clean[0].tolist() and np.array_equal(stack, clean[1])
