"""The experiment driver: checkpoint naming, resuming trajectories, reproducibility."""

from __future__ import annotations

from core.checkpoints import CheckpointStore
from core.config import config_from_dict
from core.experiment import checkpoint_steps, run_experiment

BASE = {
    "dataset": {"name": "synthetic", "synthetic": {"n_train": 64, "n_test": 16, "num_classes": 3}},
    "model": {"name": "mlp", "widths": [8]},
    "codes": ["CC"],
    "phase1": {"epochs": 2, "lr": 0.05, "batch_size": 16, "lr_decay_epochs": []},
    "phase2": {"epochs": 1, "batch_size": 16},
    "eval": {"linf": {"eps": 0.1, "iters": 2}, "l2": None, "transfer": False},
}


def _cfg(**changes):
    return config_from_dict({**BASE, **changes})


def test_whole_epochs_and_switch_points_name_colliding_steps():
    cfg = _cfg(switch_points=[0, 0.5, 2], fractional_checkpoints=[0.125, 0.25, 0.4])
    steps = checkpoint_steps(cfg, steps_per_epoch=2)
    # 0.125 and 0.25 round to step 0 (epoch 0 wins); 0.4 and 0.5 to step 1 (the switch wins).
    assert steps == {0: 0, 1: 0.5, 2: 1, 4: 2}


def test_a_new_earlier_switch_point_resumes_from_before_it(tmp_path):
    first = run_experiment(_cfg(switch_points=[0, 2], fractional_checkpoints=[]), tmp_path)
    (traj,) = [p for p in (tmp_path / "trajectories").iterdir() if p.is_dir()]
    assert CheckpointStore(traj / "checkpoints").steps() == [0, 4, 8]
    # Step 2 (epoch 0.5) was never stored: phase 1 reruns from step 0, deterministically.
    second = run_experiment(_cfg(switch_points=[0, 0.5, 2], fractional_checkpoints=[]), tmp_path)
    assert CheckpointStore(traj / "checkpoints").steps() == [0, 2, 4, 8]
    def strip(rows):  # NaN (no L2 attack, no transfer) compares unequal to itself
        return [{k: None if v != v else v for k, v in r.items() if k != "seconds"} for r in rows]

    same = [r for r in strip(second) if r["switch_epoch"] != 0.5]
    assert same == strip(first)
    assert {r["switch_epoch"] for r in second} == {0, 0.5, 2}
