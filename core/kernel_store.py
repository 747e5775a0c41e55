"""Kernel trajectories on disk: the kernels of one trajectory and kernel setting are records
of the trajectory's pack (``core/pack.py``) of kind ``"kernel"``, with that setting (the
kernel key, ``core/trajectory_store.kernel_key``), keyed by epoch, read without pickle. A
record's leaves are ``kernel`` (the array), ``probe_indices`` [N] (into the training set) and
``labels`` [N], its ``meta`` at least ``model``, ``epoch``, ``output`` and ``dtype``, its
``digest`` the SHA-256 of its data, checked at every read from disk.

Kernels of the formats before are still read; new kernels go to the trajectory's pack: a pack
per setting (``kernels/<setting>.pack``, magic line ``LEGACY_MAGIC``, the same records without
``"kind"`` and ``"setting"``), and before it an ``.npz`` per checkpoint in the directory
``kernels/<setting>/`` (members stored, not deflated; the zip's CRC-32 of every member catches
damaged files). ``save_arrays``/``load_arrays``
are that ``.npz`` format, still used for the reference examples (``core/evaluation_store.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np

from core.pack import Entry, Pack, Section, decode, field

T = TypeVar("T")
LEGACY_MAGIC = b"ntk-sweep kernel 1\n"  # kernels/<setting>.pack
LEAVES = ("kernel", "probe_indices", "labels")


@dataclass(frozen=True)
class KernelRecord:
    kernel: np.ndarray
    probe_indices: np.ndarray
    labels: np.ndarray
    meta: dict[str, Any]


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Writes a file atomically: ``write`` fills a temporary file beside ``path``, which is
    then renamed over it (a reader, or a process killed half-way, never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_arrays(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes named arrays to an ``.npz`` atomically (a temporary name, then renamed)."""
    # stored, not deflated: 60x faster to write, ~10 % larger
    write_atomic(path, lambda f: np.savez(f, **arrays))


def save_kernel(path: str | Path, record: KernelRecord) -> None:
    """Writes a kernel ``.npz`` of the previous format atomically (tests of reading it)."""
    save_arrays(path, {"kernel": record.kernel, "probe_indices": record.probe_indices,
                       "labels": record.labels, "meta": np.array(json.dumps(record.meta))})


class DamagedFile(ValueError):
    """An ``.npz`` that cannot be read as written (the zip's CRC-32 of every member catches
    nearly every flipped bit); the message names the file."""


def load_arrays(path: str | Path, parse: Callable[[Any], T], what: str,
                error: type[DamagedFile] = DamagedFile) -> T:
    """``parse`` of the opened ``.npz`` (``allow_pickle=False``); ``error`` naming the file
    and ``what`` it is if it cannot be read (FileNotFoundError passes)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return parse(z)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - zipfile, zlib, npy-header and JSON errors alike
        raise error(f"{path}: damaged {what} ({type(e).__name__}: {str(e)[:200]}); delete "
                    "it to have it computed again") from e


class DamagedKernel(DamagedFile):
    """A kernel that cannot be read as written."""


def load_kernel(path: str | Path) -> KernelRecord:
    """Reads a kernel file; DamagedKernel if it is not readable."""
    return load_arrays(path, lambda z: KernelRecord(
        z["kernel"], z["probe_indices"], z["labels"], json.loads(str(z["meta"]))),
        "kernel file", DamagedKernel)


def load_meta(path: str | Path) -> dict[str, Any]:
    """Only the JSON record of a kernel file (the kernel itself is not read)."""
    return load_arrays(path, lambda z: json.loads(str(z["meta"])), "kernel file",
                       DamagedKernel)


# Kernel records read in this process, most recent last, by where they are (pack file, offset
# and digest of the record; or a previous-format file with its inode, size and time): at most
# CACHE_BYTES of kernels. A trial's end reads its trajectories' kernels for the measures, the
# figures and the distances between trajectories, and a sweep's end every pair of its
# trajectories: each record is read once while it fits, and the least recently read go first.
CACHE_BYTES = 1 << 30
_CACHE: OrderedDict[tuple[Any, ...], KernelRecord] = OrderedDict()
_held = 0  # bytes of the kernels in _CACHE (kept, not summed: a sweep's end reads thousands)


def clear_cache() -> None:
    """Forgets every kernel record read (tests that count reads start from here)."""
    global _held
    _CACHE.clear()
    _held = 0


def _cached(key: tuple[Any, ...], load: Callable[[], KernelRecord]) -> KernelRecord:
    """``load()``, or the record cached under ``key`` (read-only: every reader shares it)."""
    global _held
    if (record := _CACHE.pop(key, None)) is not None:
        _CACHE[key] = record
        return record
    record = load()
    if record.kernel.nbytes <= CACHE_BYTES:
        for array in (record.kernel, record.probe_indices, record.labels):
            array.flags.writeable = False
        _CACHE[key] = record
        _held += record.kernel.nbytes
        while _held > CACHE_BYTES:
            _, old = _CACHE.popitem(last=False)
            _held -= old.kernel.nbytes
    return record


def _data_digest(arrays: list[np.ndarray]) -> str:
    """SHA-256 of the arrays as a record stores them (little-endian, packed): that of its data."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


class KernelTrajectory:
    """The kernels of one trajectory and kernel setting: records of the trajectory's pack
    ``path`` with ``setting``, and those of the formats before, the pack ``legacy_pack`` and
    the ``.npz`` files in ``legacy`` (records read through the process's cache). Saving (and
    ``verify``) is for the holder of the trajectory's lock."""

    def __init__(self, path: str | Path, setting: str = "", legacy: str | Path | None = None,
                 legacy_pack: str | Path | None = None):
        self.path = Path(path)
        self.setting = setting
        self.legacy = Path(legacy) if legacy is not None else None
        self.pack = Section(Pack(self.path), {"kind": "kernel", "setting": setting},
                            "epoch")
        self.legacy_pack = (Pack(legacy_pack, LEGACY_MAGIC, field("epoch"))
                            if legacy_pack is not None else None)
        self._legacy: dict[float, Path] | None = None

    def _old(self) -> dict[float, Path]:
        """{epoch: file} of the previous format (listed once: nothing writes there now)."""
        if self._legacy is None:
            files = sorted(self.legacy.glob("epoch_*.npz")) if self.legacy is not None else []
            self._legacy = {load_meta(p)["epoch"]: p for p in files}
        return self._legacy

    def _packed(self) -> dict[float, Entry]:
        """{epoch: record} of the packs: the trajectory's, else the setting's of before."""
        if self.legacy_pack is None:
            return self.pack.entries()
        return {**self.legacy_pack.entries(), **self.pack.entries()}

    def exists(self) -> bool:
        """Whether any kernel of this setting is stored."""
        return bool(self._packed()) or bool(self._old())

    def epochs(self) -> list[float]:
        """Epochs with a stored kernel, ascending."""
        return sorted({*self._old(), *self._packed()})

    def fingerprint(self) -> str:
        """SHA-256 of what is stored: the setting and every epoch with its record's data digest
        (a file of the format before: its path, size and modification time). Equal
        fingerprints, equal kernels: what a figure drawn from them may be kept by."""
        parts: list[list[Any]] = [[e, entry.header["digest"]]
                                  for e, entry in sorted(self._packed().items())]
        for epoch, path in sorted(self._old().items()):
            stat = path.stat()
            parts.append([epoch, str(path), stat.st_size, stat.st_mtime_ns])
        return hashlib.sha256(json.dumps([self.setting, parts]).encode()).hexdigest()

    def has(self, epoch: float) -> bool:
        return epoch in self._packed() or epoch in self._old()

    def save(self, record: KernelRecord) -> None:
        """Appends ``record`` (keyed by ``meta["epoch"]``) unless its epoch is stored."""
        epoch = float(record.meta["epoch"])
        if epoch in self._packed():
            return
        arrays = [np.asarray(record.kernel), np.asarray(record.probe_indices),
                  np.asarray(record.labels)]
        self.pack.append({"epoch": epoch, "meta": record.meta, "digest": _data_digest(arrays),
                          "leaves": list(LEAVES)}, arrays)

    def _read(self, entry: Entry) -> KernelRecord:
        epoch = entry.header["epoch"]
        where = f"{entry.path}: the kernel of epoch {epoch:g} (bytes {entry.offset}+)"
        try:
            data = self.pack.read(entry)
            if [spec["path"] for spec in entry.header["leaves"]] != list(LEAVES):
                raise ValueError(f"its arrays are {[s['path'] for s in entry.header['leaves']]}")
            digest = hashlib.sha256(data).hexdigest()
            arrays = decode(data, entry.header["leaves"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DamagedKernel(f"{where} cannot be read ({type(e).__name__}: {str(e)[:200]})"
                                "; the next kernel computation of this trajectory makes it "
                                "again") from e
        if digest != entry.header["digest"]:
            raise DamagedKernel(f"{where} is damaged (digest mismatch); the next kernel "
                                "computation of this trajectory makes it again")
        return KernelRecord(*arrays, entry.header["meta"])

    def load(self, epoch: float) -> KernelRecord:
        """The kernel at ``epoch`` (DamagedKernel if it does not read back as written,
        FileNotFoundError if none is stored)."""
        entry = self._packed().get(epoch)
        if entry is not None:  # a record never changes: where it is and its digest name it
            return _cached((entry.path, entry.offset, entry.header["digest"]),
                           lambda: self._read(entry))
        path = self._old().get(epoch)
        if path is None:
            raise FileNotFoundError(f"{self.path}: no kernel of epoch {epoch:g}")
        stat = path.stat()
        return _cached((path, stat.st_ino, stat.st_size, stat.st_mtime_ns),
                       lambda: load_kernel(path))

    def verify(self) -> list[float]:
        """Voids every record of the pack that does not read back as written, so that it is
        computed again; returns their epochs. For the holder of the trajectory's lock."""
        damaged = []
        for epoch, entry in list(self._packed().items()):
            try:
                self.load(epoch)  # from disk, once a process: the cache holds checked records
            except DamagedKernel:
                pack = self.pack if entry.path == self.pack.path else self.legacy_pack
                assert pack is not None
                pack.void(entry)
                damaged.append(epoch)
        return damaged

    def export(self, epochs: list[float]) -> dict[str, np.ndarray]:
        """The kernels at ``epochs`` as arrays for an ``.npz``: ``epochs`` [T], ``kernels``
        [T, ...], ``probe_indices`` [N], ``labels`` [N] (of the first; one probe set per
        setting) and ``meta``, a JSON list of the T records' meta."""
        records = [self.load(e) for e in epochs]
        return {"epochs": np.asarray(epochs, np.float64),
                "kernels": np.stack([r.kernel for r in records]),
                "probe_indices": records[0].probe_indices, "labels": records[0].labels,
                "meta": np.array(json.dumps([r.meta for r in records]))}

    def stack(self, epochs: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(epochs [T], kernels [T, ...]) for the given or all stored epochs."""
        epochs = self.epochs() if epochs is None else epochs
        return np.asarray(epochs), np.stack([self.load(e).kernel for e in epochs])
