"""The checkpoint format (core/checkpoints.py, core/pack.py): one file a trajectory, exact round
trips, bounded reads, torn and damaged records, clear errors. (Damage and its repair in
experiments: test_reliability.py.)"""

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
from core.pack import MAGIC, MAX_HEADER, encode
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


def test_one_pack_per_trajectory_and_no_directory_listing_per_save(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path / "c.pack")
    state = _state()

    def no_listing(*_):
        raise AssertionError("save listed a directory")

    with monkeypatch.context() as m:
        m.setattr(ckpt.os, "scandir", no_listing)
        for step in (0, 4, 8):
            store.save(step, state, {"epoch": step / 4})
        size = store.path.stat().st_size
        store.save(4, _state(seed=1), {"epoch": 99})  # idempotent: step 4 is kept as it was
    assert store.path.stat().st_size == size
    assert [p.name for p in tmp_path.iterdir()] == ["c.pack"]  # one file, nothing else
    assert store.steps() == [0, 4, 8]
    assert store.meta(4) == {"epoch": 1.0}
    # Another process's checkpoint is found by steps(), and not written again by save().
    other = CheckpointStore(store.path)
    other.save(12, state, {"epoch": 3})
    size = store.path.stat().st_size
    store.save(12, state, {"epoch": 3})
    assert store.path.stat().st_size == size
    assert store.steps() == [0, 4, 8, 12]
    _identical(other.restore(4, state)[0], state)


def test_restore_is_bit_identical_and_keeps_named_tuples(tmp_path):
    store = CheckpointStore(tmp_path / "c.pack")
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
    store = CheckpointStore(tmp_path / "c.pack")
    store.save(0, state, {})
    _identical(store.restore(0, state)[0], state)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    _identical(store.restore(0, abstract)[0], state)


def _forge_length(path, at: int, length: int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, at + len(MAGIC), length)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("length", [2**63, 2**40, MAX_HEADER + 1, 10**6])
def test_a_header_length_beyond_the_file_or_the_bound_is_damage(tmp_path, length, caplog):
    """A forged or flipped length field must not make a reader allocate or read it: the
    record is skipped (with a warning naming the file and bytes where records follow it), and
    its step is missing, to be made again."""
    store = CheckpointStore(tmp_path / "c.pack")
    state = _state()
    for step in (0, 4, 8):
        store.save(step, state, {})
    at = {s: store.pack.entries()[s].offset for s in (0, 4, 8)}
    _forge_length(store.path, at[4], length)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="core.pack"):
        reader = CheckpointStore(store.path)
        assert reader.steps() == [0, 8]
    assert time.perf_counter() - start < 1.0
    (warning,) = [r.getMessage() for r in caplog.records]
    assert (f"{store.path}: bytes {at[4]} to {at[8]} are damaged (ValueError: header length"
            in warning)
    for call in (lambda: reader.restore(4, state), lambda: reader.meta(4)):
        with pytest.raises(DamagedCheckpoint, match="no checkpoint of step 4"):
            call()
    _identical(reader.restore(8, state)[0], state)
    # The last record's length forged: as a record cut short by a crash, not there yet.
    _forge_length(store.path, at[8], length)
    assert CheckpointStore(store.path).steps() == [0]
    assert time.perf_counter() - start < 2.0


def test_a_template_of_another_structure_is_a_clear_error(tmp_path):
    store = CheckpointStore(tmp_path / "c.pack")
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


def test_a_torn_record_is_not_a_step_and_the_next_save_cuts_it_off(tmp_path):
    """A crash in the middle of a save leaves the end of a record: readers do not list it,
    and the next writer cuts it off before appending, so no record follows garbage."""
    store = CheckpointStore(tmp_path / "c.pack")
    state = _state()
    store.save(0, state, {"epoch": 0})
    store.save(4, state, {"epoch": 1})
    whole = store.path.read_bytes()
    start = store.pack.entries()[4].offset
    for cut in (start + 1, start + 40, len(whole) - 1):  # in the prefix, the header, the data
        store.path.write_bytes(whole[:cut])
        reader = CheckpointStore(store.path)
        assert reader.steps() == [0]
        with pytest.raises(DamagedCheckpoint, match="no checkpoint of step 4"):
            reader.restore(4, state)
        reader.save(4, state, {"epoch": 1})
        assert store.path.read_bytes() == whole
    # Bytes after the last record (a record of which only a little was written).
    store.path.write_bytes(whole + b"\0\0")
    assert CheckpointStore(store.path).steps() == [0, 4]
    CheckpointStore(store.path).save(8, state, {})
    assert CheckpointStore(store.path).steps() == [0, 4, 8]
    assert store.path.read_bytes().startswith(whole + MAGIC)


def test_a_damaged_record_is_voided_kept_in_place_and_replaced(tmp_path):
    store = CheckpointStore(tmp_path / "c.pack")
    state = _state()
    for step in (0, 4):
        store.save(step, state, {"epoch": step / 4})
    entry = store.pack.entries()[0]
    data = bytearray(store.path.read_bytes())
    data[entry.data + 5] ^= 0x01
    store.path.write_bytes(bytes(data))
    store = CheckpointStore(store.path)
    with pytest.raises(DamagedCheckpoint, match="digest mismatch"):
        store.restore(0, state)
    where = store.quarantine(0)
    assert where == f"c.pack, bytes {entry.offset}+ (voided, kept in place)"
    assert store.steps() == [4]
    assert CheckpointStore(store.path).steps() == [4]  # another reader sees the void too
    store.save(0, state, {"epoch": 0})
    assert store.steps() == [0, 4]
    _identical(CheckpointStore(store.path).restore(0, state)[0], state)
    assert store.path.read_bytes()[:len(data)] == bytes(data)  # the damaged bytes stay


def _legacy_record(step, state, meta) -> bytes:
    """A checkpoint as the formats before wrote it: a record of its own magic line, keyed
    by ``"step"`` alone (``checkpoints.pack``, or the whole of a ``<step>.ckpt``)."""
    leaves = ckpt._host_leaves(state)
    return encode(ckpt.LEGACY_MAGIC, {"step": step, "meta": meta,
                                      "digest": ckpt._digest(step, leaves),
                                      "leaves": [p for p, _ in leaves]}, [a for _, a in leaves])


def test_checkpoints_of_the_formats_before_are_read_and_new_ones_go_to_the_pack(tmp_path):
    """Checkpoints of earlier versions, ``<step>.ckpt`` one file each and then
    ``checkpoints.pack``, one pack of checkpoints only, are read; new ones go to the
    trajectory's pack; one of a file is set aside by moving the file, one of the former
    pack by voiding it there (its bytes kept)."""
    legacy = tmp_path / "checkpoints"
    legacy.mkdir()
    state, other = _state(), _state(seed=1)
    (legacy / "0.ckpt").write_bytes(_legacy_record(0, state, {"epoch": 0}))
    (legacy / "4.ckpt").write_bytes(_legacy_record(4, state, {"epoch": 1}))
    former = tmp_path / "checkpoints.pack"
    former.write_bytes(_legacy_record(8, other, {"epoch": 2})
                       + _legacy_record(12, state, {"epoch": 3}))
    store = CheckpointStore(tmp_path / "trajectory.pack", legacy=legacy, legacy_pack=former)
    assert store.steps() == [0, 4, 8, 12]
    _identical(store.restore(4, state)[0], state)
    _identical(store.restore(8, state)[0], other)
    assert store.meta(12) == {"epoch": 3}
    store.save(16, state, {"epoch": 4})
    assert store.steps() == [0, 4, 8, 12, 16] and store.path.is_file()
    assert sorted(p.name for p in legacy.iterdir()) == ["0.ckpt", "4.ckpt"]
    moved = store.quarantine(0)
    assert moved.startswith("damaged-0-") and (legacy / moved).is_file()
    size = former.stat().st_size
    assert store.quarantine(8).startswith("checkpoints.pack, bytes 0+ (voided")
    assert former.stat().st_size > size
    assert CheckpointStore(store.path, legacy=legacy, legacy_pack=former).steps() == [4, 12, 16]


def test_older_orbax_checkpoints_are_not_steps_and_are_kept(tmp_path, caplog):
    for step in ("0", "4"):  # an orbax checkpoint directory, as earlier versions wrote them
        (tmp_path / step / "state").mkdir(parents=True)
        (tmp_path / step / "state" / "manifest.ocdbt").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="core.checkpoints"):
        store = CheckpointStore(tmp_path / "c.pack", legacy=tmp_path)
        assert store.steps() == []
        store.save(0, _state(), {})
        assert store.steps() == [0]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(tmp_path) in warnings[0], warnings
    assert "earlier format" in warnings[0]
    assert (tmp_path / "4" / "state" / "manifest.ocdbt").exists()
    _identical(store.restore(0, _state())[0], _state())


def test_an_intact_record_without_its_key_is_skipped_not_a_crash(tmp_path, caplog):
    """A record whose header checks out but names no step (another tool's record, a forged
    one) is skipped with a warning; the records after it still read."""
    store = CheckpointStore(tmp_path / "c.pack")
    state = _state()
    store.save(0, state, {})
    store.save(4, state, {})
    whole, at = store.path.read_bytes(), store.pack.entries()[4].offset
    keyless = encode(MAGIC, {"kind": "checkpoint", "meta": {}, "digest": "", "leaves": []}, [])
    store.path.write_bytes(whole[:at] + keyless + whole[at:])
    with caplog.at_level(logging.WARNING, logger="core.pack"):
        reader = CheckpointStore(store.path)
        assert reader.steps() == [0, 4]
    assert "KeyError" in caplog.text and "'step'" in caplog.text
    _identical(reader.restore(4, state)[0], state)


def test_an_append_reads_only_its_own_record_back(tmp_path, monkeypatch):
    """The writer knows the pack up to its end: after an append it reads the new record's
    header, not every header of a pack of hundreds of checkpoints and kernels, and it lists
    what a fresh reader lists."""
    import core.pack as pack

    store = CheckpointStore(tmp_path / "c.pack")
    state = _state(widths=(4,))
    for step in range(6):
        store.save(step, state, {})
    reads = []
    real = pack.read_header
    monkeypatch.setattr(pack, "read_header", lambda f, at, *a: reads.append(at) or real(f, at, *a))
    store.save(6, state, {})
    assert reads == [store.pack.entries()[6].offset]
    fresh = CheckpointStore(store.path)
    assert {k: e.offset for k, e in fresh.pack.entries().items()} == {
        k: e.offset for k, e in store.pack.entries().items()}
    assert len(reads) == 1 + 7  # the fresh reader reads every header once
