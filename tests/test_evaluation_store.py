"""Evaluations kept with a trajectory: what is stored comes back bit for bit, damage is never
read as a number, other settings never share a file, and runs sharing a trajectory evaluate
its networks and craft its reference examples once."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from core.config import EvalSpec
from core.evaluation_store import (
    NETWORK_FIELDS,
    REFERENCE_FIELDS,
    NetworkEvaluations,
    evaluation_key,
    load_reference,
    network_evaluations,
    save_reference,
)


def _correct(rng, n):
    return {"linf": rng.random(n) < 0.5, "margin": rng.random(n) < 0.3}


def test_stored_evaluations_come_back_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    stored = NetworkEvaluations(tmp_path / "e.jsonl")
    assert stored.get(0) is None
    made = {step: _correct(rng, n) for step, n in [(0, 13), (11, 8), (22, 1000)]}
    for step, correct in made.items():
        stored.put(step, correct)
    for step, correct in made.items():
        back = stored.get(step)
        assert back.keys() == correct.keys()
        for name in correct:
            assert back[name].dtype == bool and np.array_equal(back[name], correct[name])
    assert stored.get(5) is None
    with pytest.raises(ValueError, match="unequal length"):
        stored.put(1, {"linf": np.ones(3, bool), "l2": np.ones(4, bool)})


def test_a_damaged_line_is_skipped_with_a_warning_never_read(tmp_path, caplog):
    """A flipped character, a torn last line: the record is skipped (the network is then
    evaluated again), the file and line are named, and the other records still read."""
    rng = np.random.default_rng(1)
    path = tmp_path / "e.jsonl"
    stored = NetworkEvaluations(path)
    first, second = _correct(rng, 40), _correct(rng, 40)
    stored.put(0, first)
    stored.put(11, second)
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    data = record["correct"]["linf"]
    record["correct"]["linf"] = ("B" if data[0] != "B" else "C") + data[1:]  # one flip
    path.write_text(json.dumps(record) + "\n" + lines[1] + "\n" + lines[1][:30])  # torn tail
    with caplog.at_level(logging.WARNING, logger="ntk_sweep"):
        assert stored.get(0) is None
    assert f"{path}:1: damaged evaluation record" in caplog.text
    assert f"{path}:3: damaged evaluation record" in caplog.text
    assert np.array_equal(stored.get(11)["margin"], second["margin"])
    stored.put(0, first)  # evaluated again: the new line wins
    assert np.array_equal(stored.get(0)["linf"], first["linf"])


def test_keys_change_with_what_changes_the_numbers():
    spec = EvalSpec()
    key = evaluation_key(spec, NETWORK_FIELDS, "jax 1 cpu")
    assert key == evaluation_key(spec, NETWORK_FIELDS, "jax 1 cpu")
    assert key != evaluation_key(spec, NETWORK_FIELDS, "jax 1 gpu")
    assert key != evaluation_key(spec.model_copy(update={"batch_size": 7}), NETWORK_FIELDS,
                                 "jax 1 cpu")
    assert key != evaluation_key(spec.model_copy(update={"margin_restarts": 0}),
                                 NETWORK_FIELDS, "jax 1 cpu")
    # What a network's white-box results do not depend on leaves the key alone.
    for change in ({"masking_threshold": 0.5}, {"reference": "A"}, {"transfer": False}):
        assert key == evaluation_key(spec.model_copy(update=change), NETWORK_FIELDS,
                                     "jax 1 cpu")
    ref = evaluation_key(spec, REFERENCE_FIELDS, "jax 1 cpu")
    assert ref == evaluation_key(spec.model_copy(update={"margin_restarts": 0}),
                                 REFERENCE_FIELDS, "jax 1 cpu")


def test_damaged_reference_examples_are_crafted_again(tmp_path, caplog):
    path = tmp_path / "reference-k-3.npz"
    assert load_reference(path) is None
    x = np.random.default_rng(2).random((5, 8, 8, 1)).astype(np.float32)
    save_reference(path, x)
    assert np.array_equal(load_reference(path), x)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="ntk_sweep"):
        assert load_reference(path) is None
    assert str(path) in caplog.text and "crafting them again" in caplog.text


@pytest.mark.slow
def test_runs_sharing_a_trajectory_evaluate_its_networks_once(tmp_path):
    """A second run over the same trajectories (a sweep's CA trial after its CC trial)
    evaluates no network and crafts no reference examples again, and its network rows are
    the first run's; a run with other evaluation settings evaluates its own."""
    from core.experiment import run_experiment
    from tests.helpers import BASE, tiny_cfg

    ev = {**BASE["eval"], "reference": "A"}
    attack = {**BASE["phase1"], "attack": {"eps": 0.1, "iters": 2}}
    first = run_experiment(tiny_cfg(codes=["CC"], switch_points=[0, 2], eval=ev,
                                    phase1=attack), tmp_path)
    stored = sorted((tmp_path / "trajectories").glob("*/evaluations-*.jsonl"))
    references = sorted((tmp_path / "trajectories").glob("*/reference-*.npz"))
    assert len(stored) == 1 and len(references) == 1  # C's networks; A's examples
    before = {p: p.stat().st_mtime_ns for p in stored + references}
    assert len(stored[0].read_text().splitlines()) == 2  # epochs 0 and 2
    # computed afresh in a store of its own: what a cached row must equal
    second = run_experiment(tiny_cfg(codes=["CA"], switch_points=[0, 2], eval=ev,
                                     phase1=attack), tmp_path / "ca")
    again = run_experiment(tiny_cfg(codes=["CA"], switch_points=[0, 2], eval=ev,
                                    phase1=attack), tmp_path / "again",
                           store_root=tmp_path)
    assert {p: p.stat().st_mtime_ns for p in stored + references} == before

    def networks(rows):
        return [json.dumps({k: v for k, v in r.items() if k != "seconds"}) for r in rows
                if r["code"].endswith("-")]
    assert networks(again) == networks(first) == networks(second)
    other = run_experiment(tiny_cfg(codes=["CC"], switch_points=[0, 2], phase1=attack,
                                    eval={**ev, "margin_restarts": 0}), tmp_path / "x",
                           store_root=tmp_path)
    assert len(sorted((tmp_path / "trajectories").glob("*/evaluations-*.jsonl"))) == 2
    assert networks(other) != networks(first)


def test_an_evaluations_file_over_its_bound_is_refused_unread(tmp_path):
    from core.evaluation_store import MAX_EVALUATIONS_BYTES
    from core.kernel_store import DamagedFile

    path = tmp_path / "e.jsonl"
    with open(path, "wb") as f:  # sparse: no bytes written
        f.truncate(MAX_EVALUATIONS_BYTES + 1)
    with pytest.raises(DamagedFile, match=f"{path}: {MAX_EVALUATIONS_BYTES + 1} bytes"):
        NetworkEvaluations(path).get(0)


def test_a_line_with_bytes_that_are_not_text_is_skipped(tmp_path, caplog):
    stored = NetworkEvaluations(tmp_path / "e.jsonl")
    stored.put(0, {"linf": np.ones(5, bool)})
    data = bytearray(stored.path.read_bytes())
    data[20] = 0xFF  # not UTF-8
    stored.path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="ntk_sweep"):
        assert stored.get(0) is None
    assert "damaged evaluation record" in caplog.text


def test_the_file_is_parsed_once_per_version_and_damage_reported_once(tmp_path, caplog,
                                                                      monkeypatch):
    """A run looks up each of a trajectory's networks: the file is read once while it is
    unchanged (it used to be read and parsed at every lookup, and a damaged line warned at
    every lookup), and again once it grows."""
    from pathlib import Path

    rng = np.random.default_rng(2)
    path = tmp_path / "e.jsonl"
    made = {step: _correct(rng, 20) for step in (0, 4, 8)}
    writer = NetworkEvaluations(path)
    for step, correct in made.items():
        writer.put(step, correct)
    with open(path, "a") as f:
        f.write('{"step": 12, "n": 1, "correct": {}, "sha256": "0"}\n')  # damaged
    reads = []
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text",
                        lambda self, *a, **k: reads.append(self) or real(self, *a, **k))
    stored = NetworkEvaluations(path)
    with caplog.at_level(logging.WARNING, logger="ntk_sweep"):
        for _ in range(3):
            for step, correct in made.items():
                assert np.array_equal(stored.get(step)["linf"], correct["linf"])
            assert stored.get(12) is None
    assert reads == [path]
    assert caplog.text.count("damaged evaluation record") == 1
    writer.put(12, made[0])  # another process evaluated it: read again
    assert np.array_equal(stored.get(12)["margin"], made[0]["margin"])
    assert reads == [path, path]
    # A run's lookups share the process's reader of each file.
    assert network_evaluations(path) is network_evaluations(tmp_path / "." / "e.jsonl")
