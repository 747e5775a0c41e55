"""Append-only files of checksummed records: everything kept of a phase-1 trajectory (its
record, checkpoints, kernels and network evaluations) in one file, ``trajectory.pack``
(issue 15: a file per checkpoint and per kernel made a trial of the digits grid about a
hundred small files; a file per kind of record, ten files a trial of two trajectories).

A record is laid out as (integers little-endian)::

    0        magic line (``MAGIC``s below)   the kind of record and the format's version
    M        uint64 H                        length of the header
    M + 8    32 bytes                        SHA-256 of the header's H bytes
    M + 40   H bytes of UTF-8 JSON           the header: the record's key (``KEYS``: its
                                             ``"kind"`` and the fields that name it among
                                             its kind), ``"meta"``, ``"digest"`` (of the
                                             data, checked by the caller) and ``"leaves"``:
                                             [{"path", "dtype", "shape", "offset",
                                             "nbytes"}, ...]
    M+40+H   the data                        every leaf's raw bytes, C order, little-endian,
                                             at ``offset`` from here, packed

and a pack is records one after another. Records are only appended, by one writer at a time
(the caller holds the trajectory's lock), each with a single ``write`` then ``fsync``; a record
once written never changes, so readers need no lock and read a record by its offset. The
store of each kind sees its records through a ``Section`` of the file.

What can go wrong, and what a reader does about it:

- a record being written, or torn by a crash, at the end of the file: not a record yet (a
  header that fails its checks, or data past the end); ignored, and cut off by the next writer
  before it appends;
- damaged bytes in the middle (a flipped bit in a header or a prefix): the scan warns, naming
  the file and the byte range, and goes on at the next magic line; the records there are
  missing, to be made again;
- a flipped bit in the data: the record is listed, and the caller's digest check fails when it
  is read (a ``DamagedRecord``-style error of its own); the caller then ``void``s it: a
  tombstone record (``"void": offset``) is appended, the damaged bytes stay where they were for
  inspection, and a record of the same key appended later replaces it.

The last intact record of a key wins. A file of one record is a pack: checkpoints of the
formats before (``<step>.ckpt``, one file each; ``checkpoints.pack``, and kernels'
``kernels/<setting>.pack``, packs of one kind with their own magic lines) are read this way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

LOG = logging.getLogger(__name__)

_LENGTH = struct.Struct("<Q")
MAX_HEADER = 64 * 2**20
_CHUNK = 1 << 20  # bytes read at a time while looking for the next magic line
_WARNED: set[tuple[Path, int]] = set()  # (file, offset) of damage already reported

MAGIC = b"ntk-sweep trajectory 1\n"
"""The magic line of a trajectory's pack (its records of every kind)."""
KEYS: dict[str, tuple[str, ...]] = {
    "record": (),                       # the trajectory's id, mode, seed and config
    "checkpoint": ("step",),            # core/checkpoints.py
    "kernel": ("setting", "epoch"),     # core/kernel_store.py; setting: the kernel key
    "evaluation": ("setting", "step"),  # core/evaluation_store.py; setting: its key
    "initial": ("setting", "step"),     # core/evaluation_store.py: the models of step 0
}
"""The fields that name a record among those of its kind."""

Key = Callable[[dict[str, Any]], Hashable]


def trajectory_key(header: dict[str, Any]) -> tuple[Any, ...]:
    """A trajectory pack record's key: (kind, *its ``KEYS`` fields); a kind this version does
    not know is keyed by its kind alone, and no section reads it."""
    kind = header["kind"]
    return (kind, *(header[f] for f in KEYS.get(kind, ())))


def field(name: str) -> Key:
    """The key of packs of one kind (the formats before): one header field."""
    return lambda header: header[name]


@dataclass(frozen=True)
class Entry:
    """One intact-looking record: in ``path``, starting at ``offset``, its data at ``data``."""

    path: Path
    offset: int
    data: int
    header: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(int(spec["nbytes"]) for spec in self.header["leaves"])


def encode(magic: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> bytes:
    """The bytes of a record: prefix, ``header`` with ``leaves`` filled in from ``arrays``
    (``header["leaves"]`` given as a list of paths), and the data."""
    specs, offset, data = [], 0, []
    for path, a in zip(header["leaves"], arrays, strict=True):
        a = np.asarray(a)  # (np.ascontiguousarray would make a scalar [1])
        a = a if a.flags.c_contiguous else a.copy("C")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        specs.append({"path": path, "dtype": a.dtype.name, "shape": list(a.shape),
                      "offset": offset, "nbytes": a.nbytes})
        offset += a.nbytes
        data.append(a.reshape(-1).view(np.uint8).tobytes())
    raw = json.dumps({**header, "leaves": specs}, separators=(",", ":")).encode()
    return b"".join([magic, _LENGTH.pack(len(raw)), hashlib.sha256(raw).digest(), raw, *data])


def decode(data: bytes | bytearray, specs: list[dict[str, Any]]) -> list[np.ndarray]:
    """The arrays of a record's data (``Pack.read``) as its header's ``leaves`` describe them,
    in native byte order; ValueError if a leaf's bytes do not fit its dtype and shape or lie
    outside the data."""
    out = []
    for spec in specs:
        dtype = np.dtype(spec["dtype"]).newbyteorder("<")
        count, start, nbytes = int(np.prod(spec["shape"])), spec["offset"], spec["nbytes"]
        if nbytes != dtype.itemsize * count or not 0 <= start <= len(data) - nbytes:
            raise ValueError(f"{spec['path']}: bytes {start}+{nbytes} outside the data or not "
                             f"{spec['shape']} {spec['dtype']}")
        a = np.frombuffer(data, dtype, count=count, offset=start).reshape(spec["shape"])
        out.append(a.astype(dtype.newbyteorder("="), copy=False))
    return out


def read_header(f: BinaryIO, at: int, size: int, magic: bytes) -> tuple[dict[str, Any], int]:
    """The header of the record at byte ``at`` of an open file of ``size`` bytes and where its
    data starts; ValueError if the prefix or the header is not what was written."""
    prefix_len = len(magic) + _LENGTH.size + 32
    f.seek(at)
    prefix = f.read(prefix_len)
    if len(prefix) < prefix_len or not prefix.startswith(magic):
        raise ValueError("not a record of this format (magic line)")
    (length,) = _LENGTH.unpack_from(prefix, len(magic))
    if length > min(MAX_HEADER, size - at - prefix_len):
        raise ValueError(f"header length {length} exceeds the file ({size} bytes) or "
                         f"{MAX_HEADER} bytes")
    raw = f.read(length)
    if hashlib.sha256(raw).digest() != prefix[-32:]:
        raise ValueError("header checksum mismatch")
    header = json.loads(raw)
    if not isinstance(header, dict) or not {"meta", "digest", "leaves"} <= header.keys():
        raise ValueError("incomplete header")
    return header, at + prefix_len + length


def _next_magic(f: BinaryIO, start: int, size: int, magic: bytes) -> int | None:
    """The offset of the first ``magic`` at or after ``start``, or None."""
    at = start
    while at < size:
        f.seek(at)
        chunk = f.read(min(_CHUNK + len(magic), size - at))
        if (i := chunk.find(magic)) >= 0:
            return at + i
        at += _CHUNK
    return None


def scan(path: Path, magic: bytes, key: Key, start: int = 0,
         known: dict[Any, Entry] | None = None) -> tuple[dict[Any, Entry], int]:
    """The intact-looking records of ``path`` by ``key(header)`` (last one wins, voided ones
    removed) and where the last complete record ends (the file's size unless a torn record
    follows). A missing file is empty. ``start``, ``known``: the records before byte
    ``start`` are ``known`` (a scan up to there), only what follows is read."""
    entries: dict[Any, Entry] = dict(known or {})
    by_offset: dict[int, Any] = {e.offset: k for k, e in entries.items()}
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return {}, 0
    with f:
        size = os.fstat(f.fileno()).st_size
        at = end = start
        while at < size:
            try:
                header, data = read_header(f, at, size, magic)
                entry = Entry(path, at, data, header)
                stop = data + entry.nbytes
                if stop > size:
                    raise ValueError(f"its data runs {stop - size} bytes past the end")
                name = key(header)
                void = int(header["void"]) if "void" in header else None
            except (ValueError, KeyError, TypeError) as e:
                nxt = _next_magic(f, at + 1, size, magic)
                if nxt is None:  # a record being written or torn: not there yet
                    break
                if (path, at) not in _WARNED:
                    _WARNED.add((path, at))
                    LOG.warning("%s: bytes %d to %d are damaged (%s: %s) and skipped; what "
                                "they held is made again", path, at, nxt, type(e).__name__, e)
                at = nxt
                continue
            if void is not None:
                if (k := by_offset.pop(void, None)) is not None:
                    entries.pop(k, None)
            else:
                entries[name] = entry
                by_offset[at] = name
            at = end = stop
    return entries, end


class Pack:
    """One pack file: ``entries()`` read lazily and again only when the file has changed."""

    def __init__(self, path: str | Path, magic: bytes = MAGIC, key: Key = trajectory_key):
        self.path = Path(path)
        self.magic, self.key = magic, key
        self._seen: tuple[int, int, int] | None = None
        self._entries: dict[Any, Entry] = {}
        self._end = 0
        self.scans = 0  # how often the file was read: a section's cue to filter again

    def _version(self) -> tuple[int, int, int] | None:
        try:
            s = self.path.stat()
        except FileNotFoundError:
            return None
        return (s.st_ino, s.st_size, s.st_mtime_ns)

    def entries(self) -> dict[Any, Entry]:
        """The records by key (see ``scan``)."""
        version = self._version()
        if version != self._seen:
            self._entries, self._end = scan(self.path, self.magic, self.key)
            self._seen = version
            self.scans += 1
        return self._entries

    def append(self, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        """Appends a record (``encode``), first cutting off a torn record at the end. The
        caller is the only writer (it holds the trajectory's lock), so afterwards only the new
        record is read to know the file again (not every header: a pack holds hundreds)."""
        record = encode(self.magic, header, arrays)
        self.entries()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        start = self._end
        with open(self.path, "ab") as f:
            if f.tell() > start:
                f.truncate(start)
            f.write(record)
            f.flush()
            os.fsync(f.fileno())
        self._entries, self._end = scan(self.path, self.magic, self.key, start, self._entries)
        self._seen = self._version()
        self.scans += 1

    def read(self, entry: Entry) -> bytearray:
        """The data bytes of ``entry``; ValueError if fewer are there than its header lists."""
        data = bytearray(entry.nbytes)
        with open(entry.path, "rb") as f:
            f.seek(entry.data)
            got = f.readinto(data)
        if got != len(data):
            raise ValueError(f"{got} bytes of data, the header lists {len(data)}")
        return data

    def void(self, entry: Entry) -> None:
        """Sets a damaged record aside: a tombstone (its key's fields, ``"void"``: its
        offset) is appended, its bytes stay in place."""
        named = {k: v for k, v in entry.header.items() if k not in ("meta", "digest", "leaves")}
        self.append({**named, "void": entry.offset, "meta": {}, "digest": "", "leaves": []}, [])


class Section:
    """The records of one kind of a trajectory pack whose header has ``fields`` (the kind,
    a setting), by their header's ``key`` field: what a store of that kind reads and
    appends, as if it were a pack of its own."""

    def __init__(self, pack: Pack, fields: dict[str, Any], key: str):
        self.pack, self.fields, self.key = pack, fields, key
        self._seen: int | None = None
        self._entries: dict[Any, Entry] = {}

    @property
    def path(self) -> Path:
        return self.pack.path

    def entries(self) -> dict[Any, Entry]:
        """This section's records by their ``key`` field (see ``scan``)."""
        every = self.pack.entries()
        if self.pack.scans != self._seen:
            self._entries = {e.header[self.key]: e for e in every.values()
                             if all(e.header.get(f) == v for f, v in self.fields.items())}
            self._seen = self.pack.scans
        return self._entries

    def append(self, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        """Appends a record of this section (``Pack.append``; the caller holds the lock)."""
        self.pack.append({**self.fields, **header}, arrays)

    def read(self, entry: Entry) -> bytearray:
        return self.pack.read(entry)

    def void(self, entry: Entry) -> None:
        self.pack.void(entry)
