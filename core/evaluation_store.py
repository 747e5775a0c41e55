"""Evaluations kept with a phase-1 trajectory, so that the processes sharing it (a sweep's
trials) evaluate each of its networks and craft its reference examples once: the digits
grid as one trial per code evaluated every phase-1 network twice and crafted the reference
examples four times, about a fifth of its work.

Two kinds of file, under the trajectory's directory (``Trajectory.evaluations`` names them):

* ``evaluations-<key>.jsonl``: one line per evaluated network (checkpoint step),
  ``{"step", "n", "correct": {member: base64 of the packed bools}, "sha256"}``, where
  ``correct`` is the network's per-example correctness under each white-box member of the
  ensemble (bool [n]) and ``sha256`` hashes the line's other fields. Lines are appended
  with one ``write`` each; a line whose hash fails (torn by a crash, damaged on disk, two
  writers interleaved on a file system without atomic appends) is skipped with a warning
  and the network evaluated again, so a damaged line never becomes a number.
* ``reference-<key>-<step>.npz``: the reference examples (``x`` [n_test, ...]) crafted on
  the network at ``step``, written to a temporary name and renamed; the zip's CRC-32 of the
  member catches damage (the file is then crafted again and replaced).

``<key>`` (``evaluation_key``) hashes the evaluation settings that change these numbers
and the stack (JAX version and backend): results of other settings or another stack are
never read. The evaluation keys themselves derive from the trajectory's seed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from core.config import EvalSpec
from core.kernel_store import DamagedFile, load_arrays, save_arrays
from core.recent import recent

LOG = logging.getLogger("ntk_sweep")

NETWORK_FIELDS = ("linf", "l2", "margin_restarts", "batch_size", "max_test")
"""The ``EvalSpec`` fields a network's white-box evaluation depends on."""
REFERENCE_FIELDS = ("linf", "batch_size", "max_test")
"""The fields the reference examples depend on."""
MAX_EVALUATIONS_BYTES = 64 << 20
"""An evaluations file is read whole: a line is about 7 KB for 10,000 test images and four
attacks, so this holds thousands of checkpoints; a larger file is refused unread."""


def evaluation_key(spec: EvalSpec, fields: tuple[str, ...], stack: str) -> str:
    """16 hex digits: the hash of ``spec``'s ``fields`` and ``stack``."""
    settings = {"eval": spec.model_dump(mode="json", include=set(fields)), "stack": stack}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _line_hash(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


class NetworkEvaluations:
    """The per-example evaluations of a trajectory's networks under one key, in ``path``
    (a JSON-lines file, appended to)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._seen: tuple[int, int, int] | None = None  # (inode, size, mtime) parsed
        self._records: dict[int, dict[str, Any]] = {}

    def _parse(self) -> dict[int, dict[str, Any]]:
        """The intact records by step (the last of a step wins), parsed again only when the
        file has changed (a damaged line is reported once per file version); DamagedFile if
        the file is over ``MAX_EVALUATIONS_BYTES``."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}
        version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if version == self._seen:
            return self._records
        if stat.st_size > MAX_EVALUATIONS_BYTES:
            raise DamagedFile(f"{self.path}: {stat.st_size} bytes, over the "
                              f"{MAX_EVALUATIONS_BYTES} an evaluations file may hold; delete it "
                              "to have its networks evaluated again")
        text = self.path.read_text(errors="replace")  # a damaged byte fails its line's hash
        records = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line:
                continue
            try:
                record = json.loads(line)
                if record.pop("sha256") != _line_hash(record):
                    raise ValueError("its checksum does not match")
                records[int(record["step"])] = record
            except Exception as e:  # noqa: BLE001 - JSON, key, type errors alike
                LOG.warning("%s:%d: damaged evaluation record skipped (%s: %s); the network "
                            "is evaluated again", self.path, number, type(e).__name__,
                            str(e)[:200])
        self._seen, self._records = version, records
        return records

    def get(self, step: int) -> dict[str, np.ndarray] | None:
        """{member: bool [n]} of the network at ``step``, or None if not stored intact;
        DamagedFile if the file is over ``MAX_EVALUATIONS_BYTES``."""
        record = self._parse().get(int(step))
        if record is None:
            return None
        try:
            n = record["n"]
            return {name: np.unpackbits(np.frombuffer(base64.b64decode(data), np.uint8),
                                        count=n).astype(bool)
                    for name, data in record["correct"].items()}
        except Exception as e:  # noqa: BLE001 - key and base64 errors of an intact-looking line
            LOG.warning("%s: damaged evaluation record of step %d skipped (%s: %s); the "
                        "network is evaluated again", self.path, step, type(e).__name__,
                        str(e)[:200])
            return None

    def put(self, step: int, correct: dict[str, np.ndarray]) -> None:
        """Appends the evaluation of the network at ``step`` (one ``write``; after a torn
        last line, on a line of its own)."""
        n = {len(v) for v in correct.values()}
        if len(n) != 1:
            raise ValueError(f"members of unequal length {sorted(n)}")
        record = {"step": int(step), "n": n.pop(), "correct": {
            name: base64.b64encode(np.packbits(np.asarray(v, bool))).decode()
            for name, v in sorted(correct.items())}}
        line = json.dumps({**record, "sha256": _line_hash(record)}) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn line stays apart
                line = "\n" + line
            os.write(fd, line.encode())
        finally:
            os.close(fd)


_OPEN: dict[Path, NetworkEvaluations] = {}


def network_evaluations(path: str | Path) -> NetworkEvaluations:
    """The process's reader of the evaluations file ``path`` (one per file, the last 64
    files: each is parsed once per version, however many lookups a run makes)."""
    return recent(_OPEN, Path(path).absolute(), lambda: NetworkEvaluations(path), 64)


def load_reference(path: str | Path) -> np.ndarray | None:
    """The reference examples stored at ``path``; None if absent or damaged (with a
    warning: they are crafted again)."""
    try:
        return load_arrays(path, lambda z: z["x"], "reference examples file")
    except FileNotFoundError:
        return None
    except DamagedFile as e:
        LOG.warning("%s; crafting them again", e)
        return None


def save_reference(path: str | Path, x: np.ndarray) -> None:
    save_arrays(path, {"x": np.asarray(x)})
