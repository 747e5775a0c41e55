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
