"""Checkpoints of a training state: a trajectory's checkpoints are records of its pack
(``core/pack.py``) of kind ``"checkpoint"``, keyed by their minibatch step.

Each checkpoint holds the whole ``TrainState`` (params, BatchNorm statistics, optimizer state,
step and key) plus a small JSON record (epoch, phase, ...). Its header::

    {"kind": "checkpoint", "step": int, "meta": {...}, "digest": state_digest(step, state),
     "leaves": [{"path": jax keystr, "dtype": numpy name, "shape": [...],
                 "offset": int, "nbytes": int}, ...]}   (tree order)

A typed PRNG key leaf is stored as its ``key_data`` and wrapped again at restore. No pickle:
restoring reads only JSON and raw numbers.

Every byte is covered by a check. A flip in a record's prefix or header fails its SHA-256 (or
the magic, the length bounds): the pack's scan skips it with a warning, and the step is
missing, so it is trained again; a flip in the data fails ``digest``, the SHA-256 of the step
and of every array of the state, at restore: a ``DamagedCheckpoint``, which the experiment
sets aside (``quarantine``) and remakes; so is a record whose arrays (paths, dtypes, shapes)
are not those of the template state given to ``restore``, the message naming the first that
differs.

The formats before are read, and new checkpoints go to the trajectory's pack: a pack of
checkpoints only (``checkpoints.pack``, magic line ``LEGACY_MAGIC``, the same records without
``"kind"``), and before it one file per checkpoint (``<legacy>/<step>.ckpt``: the same bytes as
such a record). Orbax directories ``<step>/`` of still earlier versions are not read: they are
not steps, a warning names their directory, and the trajectory is retrained (identical
results). One pack per trajectory replaced a file per checkpoint, which replaced orbax's 16
(issue 15: fewer small files; about 1 ms a save instead of 100).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np

from core.pack import Entry, Pack, Section, decode, field, scan
from core.timing import timed

State = TypeVar("State")

LOG = logging.getLogger(__name__)

LEGACY_MAGIC = b"ntk-sweep checkpoint 1\n"  # checkpoints.pack and <step>.ckpt files
SUFFIX = ".ckpt"
_NAME = re.compile(r"(0|[1-9][0-9]*)\.ckpt")
_WARNED: set[Path] = set()  # directories whose older-format checkpoints were reported


class DamagedCheckpoint(RuntimeError):
    """A stored checkpoint cannot be read back as the state saved at its step."""

    def __init__(self, step: int, cause: BaseException):
        super().__init__(f"checkpoint at step {step} is damaged ({type(cause).__name__}: "
                         f"{str(cause).splitlines()[0][:200] if str(cause) else ''})")
        self.step = step


def _is_key(leaf: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key)


def _digest(step: int, leaves: list[tuple[str, np.ndarray]]) -> str:
    h = hashlib.sha256(f"step {int(step)}\n".encode())
    for path, a in leaves:
        h.update(f"{path} {a.dtype} {a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _host_leaves(state: Any) -> list[tuple[str, np.ndarray]]:
    """(keystr, C-contiguous array) of every leaf in tree order; keys as their key data."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if _is_key(leaf):
            leaf = jax.random.key_data(leaf)
        a = np.asarray(leaf)  # (np.ascontiguousarray would make a scalar [1])
        out.append((jax.tree_util.keystr(path), a if a.flags.c_contiguous else a.copy("C")))
    return out


def state_digest(step: int, state: Any) -> str:
    """SHA-256 over the step and, in tree order, every leaf's path, dtype, shape and bytes."""
    return _digest(step, _host_leaves(state))


def _stored_as(leaf: Any) -> tuple[np.dtype, tuple[int, ...]]:
    """The dtype and shape a leaf of a template is stored with (a key as its key data)."""
    if _is_key(leaf):
        leaf = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return np.dtype(leaf.dtype), tuple(leaf.shape)


def _check_structure(specs: list[dict[str, Any]], like_leaves: list[Any]) -> None:
    """ValueError naming the first array of the file that ``like`` does not have as stored."""
    stored = [(s["path"], s["dtype"], tuple(s["shape"])) for s in specs]
    wanted = [(jax.tree_util.keystr(path), _stored_as(leaf)[0].name, _stored_as(leaf)[1])
              for path, leaf in like_leaves]
    if stored != wanted:
        i = next((i for i, (a, b) in enumerate(zip(stored, wanted, strict=False)) if a != b),
                 min(len(stored), len(wanted)))

        def show(leaves: list[tuple[str, str, tuple[int, ...]]]) -> str:
            return " ".join(map(str, leaves[i])) if i < len(leaves) else "nothing"

        raise ValueError(f"its arrays are not the template's: array {i} is {show(stored)} "
                         f"in the file, {show(wanted)} in the template")


def _place(arrays: list[np.ndarray], like_leaves: list[Any]) -> list[Any]:
    """The arrays on the devices of ``like``'s leaves (the first device where it has none),
    committed, keys wrapped again."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    where = []
    for _, leaf in like_leaves:
        sharding = getattr(leaf, "sharding", None) or default
        if _is_key(leaf):  # key data has one more axis than the key: place on one device
            sharding = jax.sharding.SingleDeviceSharding(min(sharding.device_set,
                                                             key=lambda d: d.id))
        where.append(sharding)
    placed = jax.device_put(arrays, where)
    return [jax.random.wrap_key_data(a, impl=_key_impl(leaf)) if _is_key(leaf) else a
            for a, (_, leaf) in zip(placed, like_leaves, strict=True)]


def _key_impl(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array):
        return jax.random.key_impl(leaf)
    return leaf.dtype._impl  # a ShapeDtypeStruct: what jax.random.key_impl reads of an array


class CheckpointStore:
    """Saves and restores states of one trajectory as records of its pack ``path``
    (``core/pack.py``); reads the checkpoints of the formats before too: the pack of
    checkpoints ``legacy_pack`` and the files ``legacy/<step>.ckpt``, a pack of one record
    each."""

    def __init__(self, path: str | Path, legacy: str | Path | None = None,
                 legacy_pack: str | Path | None = None):
        self.path = Path(path).absolute()
        self.legacy = Path(legacy).absolute() if legacy is not None else None
        self.pack = Section(Pack(self.path), {"kind": "checkpoint"}, "step")
        self.legacy_pack = (Pack(Path(legacy_pack).absolute(), LEGACY_MAGIC, field("step"))
                            if legacy_pack is not None else None)

    def _entries(self) -> dict[int, Entry]:
        """Every checkpoint's record by step: the trajectory pack's, else one of a format
        before."""
        found: dict[int, Entry] = {}
        if self.legacy is not None and self.legacy.is_dir():
            with os.scandir(self.legacy) as entries:
                names = [e.name for e in entries]
            for name in names:
                if _NAME.fullmatch(name):
                    found.update(scan(self.legacy / name, LEGACY_MAGIC, field("step"))[0])
            if any(n.isdigit() for n in names) and self.legacy not in _WARNED:
                _WARNED.add(self.legacy)
                LOG.warning("%s holds checkpoints of an earlier format (directories "
                            "<step>/), which are not used: their steps are trained again "
                            "(identical results); they are kept, delete them when no longer "
                            "needed", self.legacy)
        if self.legacy_pack is not None:
            found.update(self.legacy_pack.entries())
        found.update(self.pack.entries())
        return found

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        return sorted(self._entries())

    def older_steps(self) -> list[int]:
        """Steps held only in an orbax format (directories ``<step>/``), not read."""
        if self.legacy is None or not self.legacy.is_dir():
            return []
        with os.scandir(self.legacy) as entries:
            return sorted(int(e.name) for e in entries if e.name.isdigit() and e.is_dir())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Appends ``state`` and JSON-serialisable ``meta`` as checkpoint ``step`` unless it is
        stored (idempotent). The caller holds the trajectory's lock: one writer at a time."""
        with timed("checkpoint"):
            if int(step) in self._entries():
                return
            leaves = _host_leaves(state)
            self.pack.append({"step": int(step), "meta": meta, "digest": _digest(step, leaves),
                              "leaves": [path for path, _ in leaves]},
                             [a for _, a in leaves])

    def _entry(self, step: int) -> Entry:
        entry = self._entries().get(int(step))
        if entry is None:
            raise DamagedCheckpoint(step, FileNotFoundError(f"no checkpoint of step {step} in "
                                                            f"{self.path}"))
        return entry

    def restore(self, step: int, like: State) -> tuple[State, dict[str, Any]]:
        """Restores checkpoint ``step`` into the structure of ``like`` (arrays or
        ``jax.ShapeDtypeStruct``s, NamedTuples kept), on like's devices.

        Raises:
          DamagedCheckpoint: it is not stored, cannot be read back, holds other arrays than
            ``like`` has, or its arrays are not those saved (digest mismatch).
        """
        like_leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
        with timed("checkpoint"):
            entry = self._entry(step)
            try:
                _check_structure(entry.header["leaves"], like_leaves)  # dtypes, shapes: like's
                arrays = decode(self.pack.read(entry), entry.header["leaves"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DamagedCheckpoint(step, e) from e
            paths = [spec["path"] for spec in entry.header["leaves"]]
            if _digest(step, list(zip(paths, arrays, strict=True))) != entry.header["digest"]:
                raise DamagedCheckpoint(step, ValueError(
                    "its arrays are not those saved at this step (digest mismatch)"))
            state = jax.tree_util.tree_unflatten(treedef, _place(arrays, like_leaves))
        return state, entry.header["meta"]

    def meta(self, step: int) -> dict[str, Any]:
        """The JSON record of checkpoint ``step``, from its header (DamagedCheckpoint if it is
        not stored)."""
        return self._entry(step).header["meta"]

    def quarantine(self, step: int) -> str:
        """Sets a damaged checkpoint aside so that it is no longer one of ``steps()``: a
        record of a pack is voided (its bytes kept in place), a one-checkpoint file moved
        to ``damaged-<step>-<time>.ckpt``. Returns where it is, for messages."""
        entry = self._entries().get(int(step))
        if entry is None:  # another process set it aside first
            return f"{self.path.name} (already set aside)"
        for pack in (self.pack, self.legacy_pack):
            if pack is not None and entry.path == pack.path:
                pack.void(entry)
                return f"{entry.path.name}, bytes {entry.offset}+ (voided, kept in place)"
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for n in range(1000):  # the same step set aside again within a second gets -1, -2, ...
            target = entry.path.with_name(f"damaged-{step}-{stamp}" + (f"-{n}" if n else "")
                                          + SUFFIX)
            if target.exists():
                continue
            try:
                entry.path.rename(target)
            except FileNotFoundError:  # another process set it aside first
                break
            except OSError:  # another process took this name first: next one
                continue
            break
        return target.name

    def close(self) -> None:
        """Nothing stays open between calls; kept so that callers need not know."""
