"""Programs kept across processes as exported StableHLO (``core/exported.py``)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import exported
from core.dynamics import Anchor


def _program(traces: list[int]):
    """A small program of the shapes and pytrees the evaluators take; counts its traces."""

    def f(anchor: Anchor, x: jax.Array, key: jax.Array) -> jax.Array:
        traces.append(1)
        noise = jax.random.normal(key, (x.shape[0], 2))
        return jnp.tanh(x @ anchor.params["w"] + noise).sum(axis=1)

    return f


ARGS = (Anchor({"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)}, {}),
        np.arange(12, dtype=np.float32).reshape(4, 3) / 10, jax.random.PRNGKey(0))


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(exported, "directory", lambda: tmp_path / "exported")
    return tmp_path / "exported"


def test_a_program_is_exported_once_then_called_without_tracing(store, monkeypatch):
    """The first process exports the program and keeps it; a later one (a new
    ``stored_jit``: nothing of the first kept in memory) calls it untraced, with the bits
    ``jax.jit`` computes. Other arguments' shapes, other ``deps`` and other code are programs
    of their own."""
    traces: list[int] = []
    first = np.asarray(exported.stored_jit(_program(traces), "f", "deps")(*ARGS))
    assert len(traces) == 1 and len(list(store.glob("f-*.jaxexport"))) == 1
    later = exported.stored_jit(_program(traces), "f", "deps")
    assert np.array_equal(later(*ARGS), first) and len(traces) == 1
    assert np.array_equal(jax.jit(_program([]))(*ARGS), first)
    exported.stored_jit(_program(traces), "f", "deps")(ARGS[0], ARGS[1][:2], ARGS[2])
    exported.stored_jit(_program(traces), "f", "other deps")(*ARGS)
    monkeypatch.setattr(exported, "_SOURCE", ["the code changed"])
    exported.stored_jit(_program(traces), "f", "deps")(*ARGS)
    assert len(traces) == 4 and len(list(store.glob("f-*.jaxexport"))) == 4


def test_a_damaged_program_is_exported_again_with_a_warning(store, caplog):
    traces: list[int] = []
    first = np.asarray(exported.stored_jit(_program(traces), "f", "deps")(*ARGS))
    (path,) = store.glob("f-*.jaxexport")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="ntk_sweep"):
        again = exported.stored_jit(_program(traces), "f", "deps")(*ARGS)
    assert f"{path}: damaged exported program" in caplog.text
    assert np.array_equal(again, first) and len(traces) == 2
    exported.stored_jit(_program(traces), "f", "deps")(*ARGS)  # the file was replaced
    assert len(traces) == 2
    path.write_bytes(b"")  # empty: damaged too, not a crash
    exported.stored_jit(_program(traces), "f", "deps")(*ARGS)
    assert len(traces) == 3


def test_without_a_cache_the_program_is_exported_in_memory(monkeypatch, tmp_path):
    monkeypatch.setattr(exported, "directory", lambda: None)
    traces: list[int] = []
    program = exported.stored_jit(_program(traces), "f", "deps")
    assert np.array_equal(program(*ARGS), jax.jit(_program([]))(*ARGS))
    program(*ARGS)
    assert len(traces) == 1 and not list(tmp_path.iterdir())


def test_the_oldest_programs_beyond_the_bound_are_removed(store, monkeypatch):
    import os

    monkeypatch.setattr(exported, "MAX_PROGRAMS", 2)
    seen: set = set()
    for i, deps in enumerate(("a", "b", "c")):
        exported.stored_jit(_program([]), "f", deps)(*ARGS)
        for path in set(store.glob("f-*.jaxexport")) - seen:  # written i seconds apart
            os.utime(path, ns=(i * 10**9, i * 10**9))
            seen.add(path)
    assert len(list(store.glob("f-*.jaxexport"))) == 2
    traces: list[int] = []
    exported.stored_jit(_program(traces), "f", "c")(*ARGS)  # the newest stays
    exported.stored_jit(_program(traces), "f", "a")(*ARGS)  # the oldest went
    assert len(traces) == 1


def test_a_cache_it_cannot_write_to_is_a_warning_not_a_failure(tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "a file"
    blocked.write_text("")
    monkeypatch.setattr(exported, "directory", lambda: blocked / "exported")
    with caplog.at_level(logging.WARNING, logger="ntk_sweep"):
        out = exported.stored_jit(_program([]), "f", "deps")(*ARGS)
    assert np.array_equal(out, jax.jit(_program([]))(*ARGS))
    assert "exported program not kept" in caplog.text
