"""Sweep definitions: distributions, their validation before Ray starts, Tune param spaces."""

from __future__ import annotations

import pytest
import yaml

from core.config import ConfigError
from sweep.cli import main
from sweep.space import parse_space, to_param_space

BASE = {
    "dataset": {"name": "digits"},
    "model": {"name": "cnn", "width": 4},
    "codes": ["CC", "AC"],
    "switch_points": [0, 1],
    "phase1": {"epochs": 1},
    "phase2": {"epochs": 1, "lr": {"loguniform": [0.001, 0.1]}},
    "seeds": [0, 1, 2],
    "eval": {"linf": {"iters": {"grid": [5, 10]}}},
    "sweep": {"num_samples": 2, "scheduler": "asha", "resources": {"cpus": 1}},
}


def test_parse_a_sweep():
    space = parse_space(BASE)
    assert set(space.distributions) == {"phase2.lr", "eval.linf.iters", "seeds"}
    assert space.distributions["seeds"].args == ([0], [1], [2])  # one seed per trial
    assert space.trial_count() == 2 * 3 * 2  # grids: iters x seeds, times num_samples
    cfg = space.config({"phase2.lr": 0.01, "eval.linf.iters": 10, "seeds": [1]})
    assert cfg.phase2.lr == 0.01 and cfg.eval.linf.iters == 10 and cfg.seeds == (1,)
    assert cfg.phase1.epochs == 1  # fixed values pass through


@pytest.mark.parametrize(
    "change, message",
    [
        ({"phase2": {"lr": {"gird": [0.1]}}}, "phase2.lr: unknown distribution 'gird' "
                                             "(did you mean 'grid'?)"),
        ({"phase2": {"lr": {"loguniform": [0, 1]}}}, "phase2.lr.loguniform: low must be > 0"),
        ({"phase2": {"lr": {"uniform": [1, 0.5]}}}, "low 1 must be below high 0.5"),
        ({"phase2": {"epochs": {"randint": [1.5, 3]}}}, "phase2.epochs.randint: expected integers"),
        ({"phase2": {"lr": {"choice": []}}}, "phase2.lr.choice: expected a non-empty list"),
        ({"phase2": {"lr": {"grid": [0.1, -1]}}}, "phase2.lr.grid[1] = -1 is invalid"),
        ({"phase1": {"attack": {"eps": {"uniform": [-0.1, 0.2]}}}},
         "phase1.attack.eps.uniform low = -0.1 is invalid"),
        ({"sweep": {"shceduler": "asha"}},
         "sweep.shceduler: unknown key (did you mean 'scheduler'?)"),
        ({"sweep": {"resources": {"gpus": -1}}}, "sweep.resources.gpus"),
        ({"phase_2": {}}, "phase_2: unknown key (did you mean 'phase2'?)"),
    ],
)
def test_bad_sweeps_name_the_field(change, message):
    with pytest.raises(ConfigError) as err:
        parse_space({**BASE, **change})
    assert message in str(err.value)


def test_validate_command_on_a_sweep_file(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert main(["validate", str(path)]) == 0
    assert "valid sweep, 12 trials" in capsys.readouterr().out
    assert main(["validate", str(path), "--set", "phase2.lr.loguniform=[0, 1]"]) == 2
    assert "phase2.lr.loguniform: low must be > 0" in capsys.readouterr().err


def test_tune_param_space():
    from ray import tune

    params = to_param_space(parse_space(BASE))
    assert params["eval.linf.iters"] == tune.grid_search([5, 10])
    assert params["seeds"] == tune.grid_search([[0], [1], [2]])
    lr = params["phase2.lr"]
    assert lr.lower == 0.001 and lr.upper == 0.1 and type(lr).__name__ == "Float"


def test_a_distribution_at_the_top_level_is_refused():
    """Found by the property test: ``{sweep: null, grid: [null]}`` raised AttributeError."""
    import pytest

    from core.config import ConfigError

    with pytest.raises(ConfigError, match=r"\(top level\): 'grid' is a distribution"):
        parse_space({"sweep": None, "grid": [None]})
