"""Evaluations kept with a phase-1 trajectory, so that the processes sharing it (a sweep's
trials) evaluate each of its networks and craft its reference examples once: the digits
grid as one trial per code evaluated every phase-1 network twice and crafted the reference
examples four times, about a fifth of its work.

* A network's evaluation is a record of the trajectory's pack (``core/pack.py``) of kind
  ``"evaluation"``, its ``setting`` the evaluation key and its ``step`` the checkpoint's: its
  leaves are the network's per-example correctness under each white-box member of the
  ensemble (bool [n], named by the member, bits packed: ``np.packbits``), its ``meta``
  ``{"n": n}``, its ``digest`` the SHA-256 of its data. A record that fails its checks is
  skipped with a warning and the network evaluated again, so a damaged record never becomes
  a number. The pack has one writer at a time, the holder of the trajectory's lock: a process
  that evaluated a network while another holds it (training the trajectory further,
  computing its kernels) keeps the result and appends it the next time the lock is free
  (``flush``), or not at all (another process then evaluates the network again).
* The models of switch step 0 (the initial network, the same in every trajectory of a seed,
  and phase 2 of each loader from it) are records of kind ``"initial"``, step 0, laid out
  alike; their ``setting`` hashes everything such a model depends on but the trajectory's
  data mode (``core/experiment.py``'s ``_InitialRuns``), and their ``meta`` adds the
  training metrics and phase-2 epoch curve to ``n``. The trajectory that computed one holds
  it; the runs of the seed's other trajectories, in any process, copy it instead of
  computing it again (AC@0 = CC@0 bit for bit).
* ``reference-<key>-<step>.npz`` in the trajectory's directory: the reference examples
  (``x`` [n_test, ...]) crafted on the network at ``step``, written to a temporary name and
  renamed; the zip's CRC-32 of the member catches damage (the file is then crafted again and
  replaced).

``<key>`` (``evaluation_key``) hashes the evaluation settings that change these numbers
and the stack (JAX version and backend): results of other settings or another stack are
never read. The evaluation keys themselves derive from the trajectory's seed.

Evaluations of the format before, ``evaluations-<key>.jsonl`` (one line per network,
``{"step", "n", "correct": {member: base64 of the packed bools}, "sha256"}``), are still read.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from core.config import EvalSpec
from core.kernel_store import DamagedFile, load_arrays, save_arrays
from core.pack import Entry, Pack, Section, decode

LOG = logging.getLogger("ntk_sweep")

NETWORK_FIELDS = ("linf", "l2", "margin_restarts", "batch_size", "max_test")
"""The ``EvalSpec`` fields a network's white-box evaluation depends on."""
REFERENCE_FIELDS = ("linf", "batch_size", "max_test")
"""The fields the reference examples depend on."""
MAX_EVALUATIONS_BYTES = 64 << 20
"""An evaluations file of the format before is read whole: a line is about 7 KB for 10,000 test
images and four attacks, so this holds thousands of checkpoints; a larger file is refused
unread."""


def evaluation_key(spec: EvalSpec, fields: tuple[str, ...], stack: str) -> str:
    """16 hex digits: the hash of ``spec``'s ``fields`` and ``stack``."""
    settings = {"eval": spec.model_dump(mode="json", include=set(fields)), "stack": stack}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _line_hash(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _sole_writer() -> Iterator[bool]:
    yield True


class Evaluation(NamedTuple):
    """A model's per-example correctness under each member of the ensemble (bool [n]) and
    what else its record keeps (``meta``: JSON)."""

    correct: dict[str, np.ndarray]
    meta: dict[str, Any]


class NetworkEvaluations:
    """The per-example evaluations of a trajectory's networks under one key: records of the
    trajectory's pack ``path`` of ``kind`` (``"evaluation"``, or ``"initial"`` for the models
    of switch step 0) with setting ``key``, and the lines of the file of the format before,
    ``legacy``. ``try_lock()`` enters the trajectory's lock if it is free, and says
    whether it did (the default: the caller is the only writer)."""

    def __init__(self, path: str | Path, key: str,
                 try_lock: Callable[[], AbstractContextManager[bool]] = _sole_writer,
                 legacy: str | Path | None = None, kind: str = "evaluation"):
        self.path = Path(path)
        self.section = Section(Pack(self.path), {"kind": kind, "setting": key}, "step")
        self.try_lock = try_lock
        self.legacy = LegacyEvaluations(legacy) if legacy is not None else None
        self.pending: dict[int, Evaluation] = {}  # evaluated, not yet appended
        self._read: dict[int, tuple[int, Evaluation | None]] = {}  # by offset

    def _load(self, entry: Entry) -> Evaluation | None:
        """The record's evaluation, None (with a warning) if it fails its checks."""
        try:
            data = self.section.read(entry)
            if hashlib.sha256(data).hexdigest() != entry.header["digest"]:
                raise ValueError("its digest does not match")
            meta = dict(entry.header["meta"])
            n = int(meta.pop("n"))
            arrays = decode(data, entry.header["leaves"])
            return Evaluation({spec["path"]: np.unpackbits(a, count=n).astype(bool)
                               for spec, a in zip(entry.header["leaves"], arrays, strict=True)},
                              meta)
        except Exception as e:  # noqa: BLE001 - I/O, key, type and value errors alike
            LOG.warning("%s: damaged %s record of step %s (bytes %d+) skipped (%s: %s); the "
                        "model is evaluated again", entry.path, self.section.fields["kind"],
                        entry.header.get("step"), entry.offset, type(e).__name__, str(e)[:200])
            return None

    def get(self, step: int) -> dict[str, np.ndarray] | None:
        """{member: bool [n]} of the network at ``step``, or None if not stored intact;
        DamagedFile if a file of the format before is over ``MAX_EVALUATIONS_BYTES``."""
        found = self.record(step)
        return None if found is None else found.correct

    def record(self, step: int) -> Evaluation | None:
        """The evaluation at ``step`` with its ``meta``, or None if not stored intact."""
        step = int(step)
        self.flush()
        if step in self.pending:
            return self.pending[step]
        if step in self.section.entries():
            return self._stored(step)
        correct = self.legacy.get(step) if self.legacy is not None else None
        return None if correct is None else Evaluation(correct, {})

    def _stored(self, step: int) -> Evaluation | None:
        """The pack's record of ``step`` if there and intact (read once a process)."""
        entry = self.section.entries().get(step)
        if entry is None:
            return None
        offset, found = self._read.get(step, (-1, None))
        if offset != entry.offset:
            found = self._load(entry)
            self._read[step] = (entry.offset, found)
        return found

    def put(self, step: int, correct: dict[str, np.ndarray],
            meta: dict[str, Any] | None = None) -> None:
        """Keeps the evaluation of the model at ``step`` (with ``meta``: JSON, kept in the
        record's header) and appends it to the pack, now if the trajectory's lock is free,
        else at a later ``put``, ``get`` or ``flush``."""
        n = {len(v) for v in correct.values()}
        if len(n) != 1:
            raise ValueError(f"members of unequal length {sorted(n)}")
        meta = json.loads(json.dumps(meta or {}))  # as it reads back: lists, plain floats
        if "n" in meta:
            raise ValueError("meta: 'n' is the record's own (the number of examples)")
        self.pending[int(step)] = Evaluation(
            {k: np.asarray(v, bool) for k, v in correct.items()}, meta)
        self.flush()

    def flush(self) -> None:
        """Appends the kept evaluations if the trajectory's lock is free (else keeps them)."""
        if not self.pending:
            return
        with self.try_lock() as held:
            if not held:
                return
            for step, found in sorted(self.pending.items()):
                if self._stored(step) is not None:
                    continue  # another process evaluated it first
                names = sorted(found.correct)
                arrays = [np.packbits(found.correct[k]) for k in names]
                digest = hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()
                meta = {"n": len(found.correct[names[0]]), **found.meta}
                self.section.append({"step": step, "meta": meta, "digest": digest,
                                     "leaves": names}, arrays)
            self.pending.clear()


class LegacyEvaluations:
    """The evaluations of the format before, ``evaluations-<key>.jsonl`` (read only)."""

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
