"""The trajectory store: ids, layout, and its lock's report of a wait."""

from __future__ import annotations

import threading

from core.trajectory_store import TrajectoryStore, is_trajectory, trajectory_id
from tests.helpers import BASE, tiny_cfg


def test_the_store_alone_derives_ids_and_directories(tmp_path):
    cfg = tiny_cfg(codes=["CC", "AC"], seeds=[0, 1], switch_points=[1],
                   phase1={**BASE["phase1"], "attack": {"eps": 0.1, "iters": 2}})
    store = TrajectoryStore(tmp_path)
    found = store.of(cfg)
    assert [(t.mode, t.seed) for t in found] == [("C", 0), ("A", 0), ("C", 1), ("A", 1)]
    for t in found:
        assert t.id == trajectory_id(cfg, t.mode, t.seed)
        assert t.directory == tmp_path / "trajectories" / t.id and not t.exists()
    found[1].write_record()
    assert is_trajectory(found[1].directory) and store.ids() == [found[1].id]
    (back,) = store.stored()
    assert (back.id, back.mode, back.seed, back.config) == (found[1].id, "A", 0, cfg)
    assert store.at(found[1].directory) == back


def test_a_lock_held_elsewhere_is_reported_before_waiting(tmp_path):
    """A trial that must wait for another's trajectory says so (``on_wait``) once, then
    waits; an uncontended lock reports nothing."""
    (t,) = TrajectoryStore(tmp_path).of(tiny_cfg(switch_points=[1]))
    waits: list[str] = []
    with t.lock(on_wait=lambda: waits.append("free?")):
        pass
    assert waits == []
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with t.lock():
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)

    def on_wait() -> None:
        waits.append("waiting")
        release.set()  # the holder lets go only once the wait was reported

    with t.lock(on_wait=on_wait):
        waits.append("got it")
    thread.join(10)
    assert waits == ["waiting", "got it"]


def test_a_damaged_record_of_the_format_before_is_written_again_not_a_crash(tmp_path, caplog):
    """``trajectory.json`` of an earlier version, truncated or not a record: the trajectory
    counts as not started (a warning names the file), and its next phase 1 appends its
    record to the pack, which is read from then on."""
    import json
    import logging

    (t,) = TrajectoryStore(tmp_path).of(tiny_cfg(switch_points=[1]))
    t.directory.mkdir(parents=True)
    from core.trajectory_store import MAX_RECORD_BYTES

    for damaged in ('{"id": "', "[1, 2]", '{"id": "x"}', " " * (MAX_RECORD_BYTES + 1)):
        (t.directory / "trajectory.json").write_text(damaged)
        with caplog.at_level(logging.WARNING, logger="core.trajectory_store"):
            assert not t.exists() and TrajectoryStore(tmp_path).stored() == []
        assert f"{t.directory / 'trajectory.json'}: damaged" in caplog.text
    assert f"damaged (over {MAX_RECORD_BYTES} bytes)" in caplog.text  # refused, not parsed
    t.write_record()
    assert t.exists() and TrajectoryStore(tmp_path).stored()[0].config == t.config
    # An intact record of the format before is read, and not written again.
    record = {"id": t.id, "mode": t.mode, "seed": t.seed, "config": t.config.model_dump(
        mode="json")}
    (u,) = TrajectoryStore(tmp_path / "u").of(tiny_cfg(switch_points=[1]))
    u.directory.mkdir(parents=True)
    (u.directory / "trajectory.json").write_text(json.dumps(record))
    assert u.exists()
    u.write_record()
    assert not u.pack_path.exists()


def test_a_record_is_appended_only_when_what_decides_the_checkpoints_changes(tmp_path):
    """Every config that uses a trajectory writes its record at phase 1; a sweep's 10,000
    trials over phase-2 settings must not append 10,000 records to its pack."""
    from core.pack import Pack

    cfg = tiny_cfg(switch_points=[1])
    (t,) = TrajectoryStore(tmp_path).of(cfg)
    t.write_record()
    size = t.pack_path.stat().st_size
    for change in ({"phase2": {**BASE["phase2"], "lr": 0.123}}, {"codes": ["CA"]},
                   {"name": "other"}):
        (same,) = TrajectoryStore(tmp_path).of(tiny_cfg(switch_points=[1], **change))
        assert same.id == t.id
        same.write_record()
    assert t.pack_path.stat().st_size == size
    (longer,) = TrajectoryStore(tmp_path).of(tiny_cfg(switch_points=[1, 2]))
    assert longer.id == t.id
    longer.write_record()  # continued to another checkpoint: the record says so
    assert TrajectoryStore(tmp_path).at(t.directory).config.switch_points == (1, 2)
    assert sum(k[0] == "record" for k in Pack(t.pack_path).entries()) == 1  # the last wins
