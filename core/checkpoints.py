"""Checkpoints of a training state, one file per minibatch step: ``<directory>/<step>.ckpt``.

Each checkpoint holds the whole ``TrainState`` (params, BatchNorm statistics, optimizer state,
step and key) plus a small JSON record (epoch, phase, ...). A file is laid out as (integers
little-endian)::

    0        b"ntk-sweep checkpoint 1\\n"   magic line, 23 bytes (the format's version)
    23       uint64 H                      length of the header
    31       32 bytes                      SHA-256 of the header's H bytes
    63       H bytes of UTF-8 JSON         the header:
               {"step": int, "meta": {...}, "digest": state_digest(step, state),
                "leaves": [{"path": jax keystr, "dtype": numpy name, "shape": [...],
                            "offset": int, "nbytes": int}, ...]}   (tree order)
    63 + H   the data                      every leaf's raw bytes, C order, little-endian,
                                           at ``offset`` from here, packed; the file ends there

A typed PRNG key leaf is stored as its ``key_data`` and wrapped again at restore. No pickle:
restoring reads only JSON and raw numbers.

A file is written under a temporary name (``.<step>.ckpt.tmp-<pid>``, never one of
``steps()``), flushed to disk and renamed, so a file under its final name was whole when
written. Whole is not intact: every byte is covered by a check at restore. A flip in the
prefix or the header fails its SHA-256 (or the magic, the length bounds); a flip in the data
fails ``digest``, the SHA-256 of the step and of every array of the state; a file of another
step holds that step in its header. Each is a ``DamagedCheckpoint``, which the experiment sets
aside and remakes; so is a file whose arrays (paths, dtypes, shapes) are not those of the
template state given to ``restore``, the message naming the first that differs.

Checkpoints of earlier versions (orbax directories ``<step>/``) are not read: they are not
steps, a warning names their directory, and the trajectory is retrained (identical results).
One file per checkpoint replaced orbax's 16 (issue 15: fewer small files, about 1 ms a save
instead of 100).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import time
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import jax
import numpy as np

from core.timing import timed

State = TypeVar("State")

LOG = logging.getLogger(__name__)

MAGIC = b"ntk-sweep checkpoint 1\n"
_LENGTH = struct.Struct("<Q")
_PREFIX = len(MAGIC) + _LENGTH.size + 32  # magic, header length, header SHA-256
MAX_HEADER = 64 * 2**20
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


def _little(a: np.ndarray) -> np.ndarray:
    return a.astype(a.dtype.newbyteorder("<"), copy=False) if a.dtype.byteorder == ">" else a


def _encode(step: int, state: Any, meta: dict[str, Any]) -> tuple[bytes, list[np.ndarray]]:
    """The prefix + header of a checkpoint file and the arrays that follow it."""
    leaves, specs, offset = _host_leaves(state), [], 0
    for path, a in leaves:
        specs.append({"path": path, "dtype": a.dtype.name, "shape": list(a.shape),
                      "offset": offset, "nbytes": a.nbytes})
        offset += a.nbytes
    header = json.dumps({"step": int(step), "meta": meta, "digest": _digest(step, leaves),
                         "leaves": specs}, separators=(",", ":")).encode()
    prefix = MAGIC + _LENGTH.pack(len(header)) + hashlib.sha256(header).digest()
    return prefix + header, [_little(a) for _, a in leaves]


def _read_header(f: BinaryIO, size: int) -> tuple[dict[str, Any], int]:
    """The header of an open checkpoint file of ``size`` bytes and where its data starts;
    ValueError if the prefix or the header is not what was written."""
    prefix = f.read(_PREFIX)
    if len(prefix) < _PREFIX or not prefix.startswith(MAGIC):
        raise ValueError("not a checkpoint file of this format (magic line)")
    (length,) = _LENGTH.unpack_from(prefix, len(MAGIC))
    if length > min(MAX_HEADER, size - _PREFIX):
        raise ValueError(f"header length {length} exceeds the file ({size} bytes) or "
                         f"{MAX_HEADER} bytes")
    raw = f.read(length)
    if hashlib.sha256(raw).digest() != prefix[-32:]:
        raise ValueError("header checksum mismatch")
    header = json.loads(raw)
    if not isinstance(header, dict) or not {"step", "meta", "digest", "leaves"} <= header.keys():
        raise ValueError("incomplete header")
    return header, _PREFIX + length


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


def _arrays(data: bytearray, specs: list[dict[str, Any]], like_leaves: list[Any]
            ) -> list[np.ndarray]:
    out = []
    for spec, (_, leaf) in zip(specs, like_leaves, strict=True):
        dtype, shape = _stored_as(leaf)
        start, nbytes = spec["offset"], spec["nbytes"]
        if nbytes != dtype.itemsize * int(np.prod(shape)) or not 0 <= start <= len(data) - nbytes:
            raise ValueError(f"{spec['path']}: bytes {start}+{nbytes} outside the data")
        a = np.frombuffer(data, dtype.newbyteorder("<"), count=int(np.prod(shape)), offset=start)
        out.append(a.reshape(shape).astype(dtype, copy=False))
    return out


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
    """Saves and restores states of one trajectory as ``directory/<step>.ckpt``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._known: set[int] = set()

    def _path(self, step: int) -> Path:
        return self.directory / f"{int(step)}{SUFFIX}"

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending (the one call that lists the directory)."""
        found, older = set(), False
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if m := _NAME.fullmatch(entry.name):
                    found.add(int(m.group(1)))
                elif entry.name.isdigit() and entry.is_dir():
                    older = True
        if older and self.directory not in _WARNED:
            _WARNED.add(self.directory)
            LOG.warning("%s holds checkpoints of an earlier format (directories <step>/), which "
                        "are not used: their steps are trained again (identical results); "
                        "they are kept, delete them when no longer needed", self.directory)
        self._known = found
        return sorted(found)

    def older_steps(self) -> list[int]:
        """Steps held only in an earlier format (orbax directories ``<step>/``), not read."""
        with os.scandir(self.directory) as entries:
            return sorted(int(e.name) for e in entries if e.name.isdigit() and e.is_dir())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Writes ``state`` and JSON-serialisable ``meta`` as checkpoint ``step`` (idempotent)."""
        with timed("checkpoint"):
            path = self._path(step)
            if step in self._known or path.exists():
                self._known.add(step)
                return
            head, arrays = _encode(step, state, meta)
            tmp = self.directory / f".{path.name}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(head)
                for a in arrays:
                    f.write(a.reshape(-1).view(np.uint8))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self._known.add(step)

    def restore(self, step: int, like: State) -> tuple[State, dict[str, Any]]:
        """Restores checkpoint ``step`` into the structure of ``like`` (arrays or
        ``jax.ShapeDtypeStruct``s, NamedTuples kept), on like's devices.

        Raises:
          DamagedCheckpoint: the file cannot be read back, holds another step or other arrays
            than ``like`` has, or its arrays are not those saved (digest mismatch).
        """
        like_leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
        with timed("checkpoint"):
            try:
                with open(self._path(step), "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    header, start = _read_header(f, size)
                    if header["step"] != step:
                        raise ValueError(f"the file is the checkpoint of step {header['step']}")
                    _check_structure(header["leaves"], like_leaves)
                    data = bytearray(size - start)
                    got = f.readinto(data)
                if got != sum(spec["nbytes"] for spec in header["leaves"]):
                    raise ValueError(f"{got} bytes of data, the header lists "
                                     f"{sum(spec['nbytes'] for spec in header['leaves'])}")
                arrays = _arrays(data, header["leaves"], like_leaves)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DamagedCheckpoint(step, e) from e
            paths = [spec["path"] for spec in header["leaves"]]
            if _digest(step, list(zip(paths, arrays, strict=True))) != header["digest"]:
                raise DamagedCheckpoint(step, ValueError(
                    "its arrays are not those saved at this step (digest mismatch)"))
            state = jax.tree_util.tree_unflatten(treedef, _place(arrays, like_leaves))
        return state, header["meta"]

    def meta(self, step: int) -> dict[str, Any]:
        """The JSON record of checkpoint ``step``, read from its header alone
        (DamagedCheckpoint if unreadable)."""
        try:
            with open(self._path(step), "rb") as f:
                header, _ = _read_header(f, os.fstat(f.fileno()).st_size)
            if header["step"] != step:
                raise ValueError(f"the file is the checkpoint of step {header['step']}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DamagedCheckpoint(step, e) from e
        return header["meta"]

    def quarantine(self, step: int) -> Path:
        """Moves a damaged checkpoint aside (``damaged-<step>-<time>.ckpt``, kept for
        inspection) so that it is no longer one of ``steps()``; returns where it went."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for n in range(1000):  # the same step set aside again within a second gets -1, -2, ...
            target = self.directory / (f"damaged-{step}-{stamp}" + (f"-{n}" if n else "")
                                       + SUFFIX)
            if target.exists():
                continue
            try:
                self._path(step).rename(target)
            except FileNotFoundError:  # another process set it aside first
                break
            except OSError:  # another process took this name first: next one
                continue
            break
        self._known.discard(step)
        return target

    def close(self) -> None:
        """Nothing stays open between calls; kept so that callers need not know."""
