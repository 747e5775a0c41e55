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
    save_reference,
)
from core.pack import Pack


def _correct(rng, n):
    return {"linf": rng.random(n) < 0.5, "margin": rng.random(n) < 0.3}


def test_stored_evaluations_come_back_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    stored = NetworkEvaluations(tmp_path / "t.pack", "k")
    assert stored.get(0) is None
    made = {step: _correct(rng, n) for step, n in [(0, 13), (11, 8), (22, 1000)]}
    for step, correct in made.items():
        stored.put(step, correct)
    assert not stored.pending
    reader = NetworkEvaluations(tmp_path / "t.pack", "k")  # from the file, not the writer
    for step, correct in made.items():
        back = reader.get(step)
        assert back.keys() == correct.keys()
        for name in correct:
            assert back[name].dtype == bool and np.array_equal(back[name], correct[name])
    assert reader.get(5) is None
    assert NetworkEvaluations(tmp_path / "t.pack", "other").get(0) is None  # other settings
    with pytest.raises(ValueError, match="unequal length"):
        stored.put(1, {"linf": np.ones(3, bool), "l2": np.ones(4, bool)})


def test_a_damaged_record_is_skipped_with_a_warning_never_read(tmp_path, caplog):
    """A flipped bit in a record's data, a torn record at the end: the record is skipped
    (the network is then evaluated again), the file is named, the other records still
    read, and the network's new record wins."""
    rng = np.random.default_rng(1)
    path = tmp_path / "t.pack"
    writer = NetworkEvaluations(path, "k")
    first, second = _correct(rng, 40), _correct(rng, 40)
    writer.put(0, first)
    writer.put(11, second)
    entry = Pack(path).entries()[("evaluation", "k", 0)]
    data = bytearray(path.read_bytes())
    data[entry.data + 2] ^= 0x04  # one flip in the first record's data
    path.write_bytes(bytes(data) + bytes(data[entry.offset:entry.offset + 60]))  # torn tail
    stored = NetworkEvaluations(path, "k")
    with caplog.at_level(logging.WARNING, logger="ntk_sweep"):
        assert stored.get(0) is None
    assert f"{path}: damaged evaluation record of step 0" in caplog.text
    assert np.array_equal(stored.get(11)["margin"], second["margin"])
    stored.put(0, first)  # evaluated again: the new record wins, the torn tail cut off
    assert np.array_equal(NetworkEvaluations(path, "k").get(0)["linf"], first["linf"])


def test_evaluations_wait_for_the_lock_and_are_kept_meanwhile(tmp_path):
    """Another process holds the trajectory's lock (training it further, computing its
    kernels): an evaluation is kept, served to this process, and appended once the lock is
    free, never while another process may be appending."""
    import fcntl

    from core.trajectory_store import TrajectoryStore, flush_evaluations
    from tests.helpers import tiny_cfg

    trajectory = TrajectoryStore(tmp_path).get(tiny_cfg(switch_points=[0, 2]), "C", 0)
    correct = _correct(np.random.default_rng(3), 30)
    trajectory.lock_path.parent.mkdir(parents=True)
    with open(trajectory.lock_path, "w") as other:
        fcntl.flock(other, fcntl.LOCK_EX)  # a second open file: as another process would
        evaluations = trajectory.evaluations("k")
        evaluations.put(4, correct)
        assert not trajectory.pack_path.exists()
        assert np.array_equal(evaluations.get(4)["linf"], correct["linf"])
        flush_evaluations()
        assert not trajectory.pack_path.exists() and evaluations.pending
        fcntl.flock(other, fcntl.LOCK_UN)
    with trajectory.lock():  # this process takes the lock: it appends what it kept
        pass
    assert not evaluations.pending
    assert np.array_equal(NetworkEvaluations(trajectory.pack_path, "k").get(4)["margin"],
                          correct["margin"])
    with trajectory.lock():  # held by this process: appended at once, the lock entered again
        evaluations.put(8, correct)
        assert not evaluations.pending


def _legacy_line(step, correct):
    """A line of the format before (``evaluations-<key>.jsonl``), as it was written."""
    import base64
    import hashlib

    record = {"step": step, "n": len(next(iter(correct.values()))), "correct": {
        name: base64.b64encode(np.packbits(v)).decode() for name, v in sorted(correct.items())}}
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return json.dumps({**record, "sha256": digest}) + "\n"


def test_evaluations_of_the_format_before_are_read(tmp_path, caplog):
    """A store upgraded in place keeps its evaluations: the lines of the former file are
    read (a damaged one skipped with a warning naming file and line), new ones go to the
    pack, and the pack's record of a step wins."""
    rng = np.random.default_rng(4)
    legacy = tmp_path / "evaluations-k.jsonl"
    first, second, third = _correct(rng, 25), _correct(rng, 25), _correct(rng, 25)
    damaged = _legacy_line(8, third).replace('"step": 8', '"step": 9')
    not_text = bytearray(_legacy_line(12, third).encode())
    not_text[20] = 0xFF  # not UTF-8
    legacy.write_bytes((_legacy_line(0, first) + _legacy_line(4, second) + damaged).encode()
                       + bytes(not_text))
    stored = NetworkEvaluations(tmp_path / "t.pack", "k", legacy=legacy)
    with caplog.at_level(logging.WARNING, logger="ntk_sweep"):
        assert np.array_equal(stored.get(0)["linf"], first["linf"])
        assert stored.get(9) is None and stored.get(12) is None
    assert f"{legacy}:3: damaged evaluation record" in caplog.text
    assert f"{legacy}:4: damaged evaluation record" in caplog.text
    stored.put(4, third)
    again = NetworkEvaluations(tmp_path / "t.pack", "k", legacy=legacy)
    assert np.array_equal(again.get(4)["linf"], third["linf"])
    assert np.array_equal(again.get(0)["margin"], first["margin"])


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
    evaluates no network and crafts no reference examples again (it writes nothing to the
    trajectories but its own model of switch step 0, CA@0), and its network rows are the first
    run's; a run with other evaluation settings evaluates its own."""
    from core.experiment import run_experiment
    from tests.helpers import BASE, tiny_cfg

    def evaluated():
        return sorted(k for p in (tmp_path / "trajectories").glob("*/trajectory.pack")
                      for k in Pack(p).entries() if k[0] == "evaluation")

    ev = {**BASE["eval"], "reference": "A"}
    attack = {**BASE["phase1"], "attack": {"eps": 0.1, "iters": 2}}
    first = run_experiment(tiny_cfg(codes=["CC"], switch_points=[0, 2], eval=ev,
                                    phase1=attack), tmp_path)
    packs = sorted((tmp_path / "trajectories").glob("*/trajectory.pack"))
    references = sorted((tmp_path / "trajectories").glob("*/reference-*.npz"))
    assert len(packs) == 2 and len(references) == 1  # C and A; A's examples
    before = {p: p.stat().st_mtime_ns for p in references}
    records = {p: set(Pack(p).entries()) for p in packs}
    assert [k[2] for k in evaluated()] == [0, 8]  # C's networks at epochs 0 and 2
    # computed afresh in a store of its own: what a cached row must equal
    second = run_experiment(tiny_cfg(codes=["CA"], switch_points=[0, 2], eval=ev,
                                     phase1=attack), tmp_path / "ca")
    again = run_experiment(tiny_cfg(codes=["CA"], switch_points=[0, 2], eval=ev,
                                    phase1=attack), tmp_path / "again",
                           store_root=tmp_path)
    assert {p: p.stat().st_mtime_ns for p in references} == before
    added = {p: set(Pack(p).entries()) - records[p] for p in packs}
    assert sorted(len(a) for a in added.values()) == [0, 1]  # in C's pack: CA@0
    assert all(k[0] == "initial" for a in added.values() for k in a)

    def networks(rows):
        return [json.dumps({k: v for k, v in r.items() if k != "seconds"}) for r in rows
                if r["code"].endswith("-")]
    assert networks(again) == networks(first) == networks(second)
    other = run_experiment(tiny_cfg(codes=["CC"], switch_points=[0, 2], phase1=attack,
                                    eval={**ev, "margin_restarts": 0}), tmp_path / "x",
                           store_root=tmp_path)
    assert len({k[1] for k in evaluated()}) == 2
    assert networks(other) != networks(first)


def test_an_evaluations_file_of_the_format_before_over_its_bound_is_refused_unread(tmp_path):
    from core.evaluation_store import MAX_EVALUATIONS_BYTES
    from core.kernel_store import DamagedFile

    path = tmp_path / "e.jsonl"
    with open(path, "wb") as f:  # sparse: no bytes written
        f.truncate(MAX_EVALUATIONS_BYTES + 1)
    with pytest.raises(DamagedFile, match=f"{path}: {MAX_EVALUATIONS_BYTES + 1} bytes"):
        NetworkEvaluations(tmp_path / "t.pack", "k", legacy=path).get(0)


def test_the_pack_is_read_once_per_version_and_damage_reported_once(tmp_path, caplog):
    """A run looks up each of a trajectory's networks: the pack is scanned once while it is
    unchanged and each record read once (a damaged one warned about once), and the pack is
    scanned again once it grows."""
    rng = np.random.default_rng(2)
    path = tmp_path / "t.pack"
    made = {step: _correct(rng, 20) for step in (0, 4, 8, 12)}
    writer = NetworkEvaluations(path, "k")
    for step, correct in made.items():
        writer.put(step, correct)
    entry = Pack(path).entries()[("evaluation", "k", 12)]
    data = bytearray(path.read_bytes())
    data[entry.data] ^= 0x01
    path.write_bytes(bytes(data))
    stored = NetworkEvaluations(path, "k")
    pack = stored.section.pack
    stored.get(0)
    scans = pack.scans
    with caplog.at_level(logging.WARNING, logger="ntk_sweep"):
        for _ in range(3):
            for step in (0, 4, 8):
                assert np.array_equal(stored.get(step)["linf"], made[step]["linf"])
            assert stored.get(12) is None
    assert pack.scans == scans
    assert caplog.text.count("damaged evaluation record") == 1
    writer.put(12, made[0])  # another process evaluated it again: the pack is read again
    assert np.array_equal(stored.get(12)["margin"], made[0]["margin"])
    assert pack.scans == scans + 1
