"""The checkpoint file format (core/checkpoints.py): one file a checkpoint, exact round trips,
bounded reads, clear errors. (Damage and its repair in experiments: test_reliability.py.)"""

from __future__ import annotations

import logging
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import core.checkpoints as ckpt
from core.checkpoints import CheckpointStore, DamagedCheckpoint
from core.models import init_model, make_model
from core.train import TrainState, init_state


def _state(widths=(16, 16), seed=0) -> TrainState:
    model = make_model("mlp", 3, widths=widths)
    params, bs = init_model(model, jax.random.PRNGKey(seed), (8, 8, 1))
    state = init_state(params, bs, 0.9, jax.random.PRNGKey(seed + 1))
    # Non-zero momentum, so that the optimizer state's bytes are checked too.
    return state._replace(opt_state=jax.tree.map(lambda p: p * 0.5, state.opt_state),
                          step=jnp.int32(7))


def _identical(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert (x.dtype, x.shape, x.tobytes()) == (y.dtype, y.shape, y.tobytes())


def test_one_file_per_checkpoint_and_no_directory_listing_per_save(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path / "ckpt")
    state = _state()

    def no_listing(*_):
        raise AssertionError("save listed the directory")

    with monkeypatch.context() as m:
        m.setattr(ckpt.os, "scandir", no_listing)
        for step in (0, 4, 8):
            store.save(step, state, {"epoch": step / 4})
        store.save(4, _state(seed=1), {"epoch": 99})  # idempotent: step 4 is kept as it was
    assert sorted(p.name for p in store.directory.iterdir()) == ["0.ckpt", "4.ckpt", "8.ckpt"]
    assert all(p.is_file() for p in store.directory.iterdir())  # no orbax directories
    assert store.steps() == [0, 4, 8]
    assert store.meta(4) == {"epoch": 1.0}
    # Another process's checkpoint is found by steps(), and not written again by save().
    other = CheckpointStore(store.directory)
    other.save(12, state, {"epoch": 3})
    before = (store.directory / "12.ckpt").stat().st_mtime_ns
    store.save(12, state, {"epoch": 3})
    assert (store.directory / "12.ckpt").stat().st_mtime_ns == before
    assert store.steps() == [0, 4, 8, 12]


def test_restore_is_bit_identical_and_keeps_named_tuples(tmp_path):
    store = CheckpointStore(tmp_path)
    state = _state()
    store.save(8, state, {"epoch": 2, "history": [{"epoch": 1, "loss": 0.1 + 0.2}]})
    template = _state(seed=5)  # other values, same structure
    restored, meta = store.restore(8, template)
    _identical(restored, state)
    assert type(restored) is TrainState and type(restored.opt_state) is type(state.opt_state)
    assert meta == {"epoch": 2, "history": [{"epoch": 1, "loss": 0.1 + 0.2}]}
    assert all(x.committed for x in jax.tree.leaves(restored))  # like orbax's restores

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    _identical(store.restore(8, abstract)[0], state)


def test_typed_keys_scalars_bool_and_bfloat16_round_trip(tmp_path):
    state = {"key": jax.random.key(3), "keys": jax.random.split(jax.random.key(4), 3),
             "half": jnp.arange(5, dtype=jnp.bfloat16) / 3, "flags": jnp.array([True, False]),
             "scalar": jnp.float32(2.5), "empty": jnp.zeros((0, 4)), "ints": jnp.arange(3)}
    store = CheckpointStore(tmp_path)
    store.save(0, state, {})
    _identical(store.restore(0, state)[0], state)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    _identical(store.restore(0, abstract)[0], state)


def _forge_length(path, length: int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, len(ckpt.MAGIC), length)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("length", [2**63, 2**40, ckpt.MAX_HEADER + 1, 10**6])
def test_a_header_length_beyond_the_file_or_the_bound_is_damage(tmp_path, length):
    """A forged or flipped length field must not make restore allocate or read it."""
    store = CheckpointStore(tmp_path)
    state = _state()
    store.save(0, state, {})
    _forge_length(tmp_path / "0.ckpt", length)
    start = time.perf_counter()
    for call in (lambda: store.restore(0, state), lambda: store.meta(0)):
        with pytest.raises(DamagedCheckpoint, match="header length"):
            call()
    assert time.perf_counter() - start < 1.0


def test_a_template_of_another_structure_is_a_clear_error(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(0, _state(widths=(16, 16)), {})
    with pytest.raises(DamagedCheckpoint, match=r"not the template's: array 0 is "
                       r"\.params\['Dense_0'\]\['bias'\] float32 \(16,\) in the file, "
                       r"\.params\['Dense_0'\]\['bias'\] float32 \(8,\) in the template"):
        store.restore(0, _state(widths=(8, 16)))
    with pytest.raises(DamagedCheckpoint, match=r"float32 \(16,\) in the file, .* int32 \(16,\)"):
        store.restore(0, jax.tree.map(lambda x: x.astype(jnp.int32), _state()))
    store.save(1, {"x": jnp.zeros(3), "y": jnp.ones(2)}, {})
    with pytest.raises(DamagedCheckpoint, match=r"array 1 is \['y'\] float32 \(2,\) in the "
                       "file, nothing in the template"):
        store.restore(1, {"x": jnp.zeros(3)})


def test_meta_reads_the_header_alone_and_truncation_is_damage(tmp_path):
    store = CheckpointStore(tmp_path)
    state = _state()
    store.save(4, state, {"epoch": 1})
    path = tmp_path / "4.ckpt"
    path.write_bytes(path.read_bytes()[:-1])
    assert store.meta(4) == {"epoch": 1}
    with pytest.raises(DamagedCheckpoint, match="bytes of data"):
        store.restore(4, state)
    path.write_bytes(path.read_bytes() + b"\0\0")  # one byte too many
    with pytest.raises(DamagedCheckpoint, match="bytes of data"):
        store.restore(4, state)
    with pytest.raises(DamagedCheckpoint, match="FileNotFoundError"):
        store.restore(8, state)


def test_older_orbax_checkpoints_are_not_steps_and_are_kept(tmp_path, caplog):
    for step in ("0", "4"):  # an orbax checkpoint directory, as earlier versions wrote them
        (tmp_path / step / "state").mkdir(parents=True)
        (tmp_path / step / "state" / "manifest.ocdbt").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="core.checkpoints"):
        store = CheckpointStore(tmp_path)
        assert store.steps() == []
        store.save(0, _state(), {})
        assert store.steps() == [0]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(tmp_path) in warnings[0], warnings
    assert "earlier format" in warnings[0]
    assert (tmp_path / "4" / "state" / "manifest.ocdbt").exists()
    _identical(store.restore(0, _state())[0], _state())
