"""Kernel trajectories on disk: one ``.npz`` per checkpoint, read without pickle. Members are
stored, not deflated (deflate cost 60x the write time of a 10 x 500 x 500 kernel for 10 % less
space); the zip's CRC-32 of every member still catches damaged files, and files written
compressed by earlier versions read the same.

A kernel file holds ``kernel`` (the array), ``probe_indices`` [N] (into the training set),
``labels`` [N] and ``meta``, a JSON string with at least ``model``, ``epoch``, ``output`` and
``dtype``. Files are written to a temporary name and renamed, so a reader never sees half a
file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(frozen=True)
class KernelRecord:
    kernel: np.ndarray
    probe_indices: np.ndarray
    labels: np.ndarray
    meta: dict[str, Any]


def kernel_filename(epoch: float) -> str:
    """``epoch_0002.5000.npz`` for epoch 2.5: names sort in epoch order."""
    return f"epoch_{epoch:09.4f}.npz"


def save_arrays(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes named arrays to an ``.npz`` atomically (a temporary name, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # stored, not deflated: 60x faster to write, ~10 % larger
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_kernel(path: str | Path, record: KernelRecord) -> None:
    """Writes a kernel file atomically."""
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
    """A kernel file that cannot be read as written."""


def load_kernel(path: str | Path) -> KernelRecord:
    """Reads a kernel file; DamagedKernel if it is not readable."""
    return load_arrays(path, lambda z: KernelRecord(
        z["kernel"], z["probe_indices"], z["labels"], json.loads(str(z["meta"]))),
        "kernel file", DamagedKernel)


def load_meta(path: str | Path) -> dict[str, Any]:
    """Only the JSON record of a kernel file (the kernel itself is not read)."""
    return load_arrays(path, lambda z: json.loads(str(z["meta"])), "kernel file",
                       DamagedKernel)


# Kernel records read in this process, most recent last, by file: at most CACHE_BYTES of
# kernels. A trial's end reads its trajectories' kernels for the measures, the figures and the
# distances between trajectories, and a sweep's end every pair of its trajectories: each file
# is read once while it fits, and the least recently read go first.
CACHE_BYTES = 1 << 30
_CACHE: OrderedDict[Path, tuple[tuple[int, int, int], KernelRecord]] = OrderedDict()
_held = 0  # bytes of the kernels in _CACHE (kept, not summed: a sweep's end reads thousands)


def clear_cache() -> None:
    """Forgets every kernel record read (tests that count reads start from here)."""
    global _held
    _CACHE.clear()
    _held = 0


def _cached_load(path: Path) -> KernelRecord:
    """``load_kernel(path)``, from the cache while the file is the one read: same inode,
    size and modification time (files are replaced, never rewritten, so a new file is a new
    inode even where the file system keeps times in whole seconds). Cached records are
    read-only: every reader shares them."""
    global _held
    stat = path.stat() if path.is_file() else None
    version = (stat.st_ino, stat.st_size, stat.st_mtime_ns) if stat else (-1, -1, -1)
    cached = _CACHE.pop(path, None)
    if cached is not None and cached[0] == version:
        _CACHE[path] = cached
        return cached[1]
    if cached is not None:  # the file was replaced
        _held -= cached[1].kernel.nbytes
    record = load_kernel(path)
    if record.kernel.nbytes <= CACHE_BYTES:
        for array in (record.kernel, record.probe_indices, record.labels):
            array.flags.writeable = False
        _CACHE[path] = (version, record)
        _held += record.kernel.nbytes
        while _held > CACHE_BYTES:
            _, (_, old) = _CACHE.popitem(last=False)
            _held -= old.kernel.nbytes
    return record


class KernelTrajectory:
    """The kernels of one trajectory and output mode, stored under ``directory`` (records
    read through the process's cache, ``_cached_load``)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def path(self, epoch: float) -> Path:
        return self.directory / kernel_filename(epoch)

    def epochs(self) -> list[float]:
        """Epochs with a stored kernel, ascending."""
        return sorted(load_meta(p)["epoch"] for p in self.directory.glob("epoch_*.npz"))

    def has(self, epoch: float) -> bool:
        return self.path(epoch).is_file()

    def save(self, record: KernelRecord) -> None:
        save_kernel(self.path(record.meta["epoch"]), record)

    def load(self, epoch: float) -> KernelRecord:
        return _cached_load(self.path(epoch))

    def stack(self, epochs: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(epochs [T], kernels [T, ...]) for the given or all stored epochs."""
        epochs = self.epochs() if epochs is None else epochs
        return np.asarray(epochs), np.stack([self.load(e).kernel for e in epochs])
