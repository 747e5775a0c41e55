"""Where phase-1 trajectories live: the one place that knows a trajectory's id, directory,
lock, checkpoints, kernels and record.

Layout under a store root (an experiment's output directory, or a sweep's: its trials share
one store, and so do later sweeps and experiments given the same root)::

    trajectories/<id>/trajectory.pack                 its record (id, mode, seed, config),
                                                      checkpoints (``core/checkpoints.py``),
                                                      kernels (``core/kernel_store.py``) and
                                                      networks' per-example evaluations
                                                      and the models of switch step 0 it
                                                      computed (``core/evaluation_store.py``):
                                                      records of one pack (``core/pack.py``)
    trajectories/<id>/reference-<key>-<step>.npz      reference examples crafted on it
    trajectories/<id>.lock                            flock: one writer at a time

The files of the formats before are read, never written: ``trajectory.json`` (the record),
``checkpoints.pack`` and ``checkpoints/<step>.ckpt``, ``kernels/<output>-<hash>.pack`` and
``kernels/<output>-<hash>/epoch_*.npz``, ``evaluations-<key>.jsonl``. A trajectory is two
files (issue 15: a sweep over seeds, whose trials share nothing, kept five per trajectory).
The lock stays a file of its own: it is taken before anything else exists, and a lock on a
file that is also written through other descriptors is lost on NFS when any of them closes.

``<id>`` hashes what determines the trajectory (dataset, model, phase-1 optimisation and
attack, data mode, seed; not its length), so two configs that differ only in phase 2 or in
their switch points share it, and a trajectory found stored is continued, never retrained.
``<hash>`` hashes the kernel settings that change the numbers (probe set, output, logit,
dtype), so kernels of other settings never mix; ``<key>`` the evaluation settings and the
stack (``core/evaluation_store.py``).

This module imports no JAX (the checkpoint store is opened lazily): the CLI
uses it to estimate storage and resolve ids without loading JAX.

The lock is only as good as the filesystem's ``flock``: a sweep calls ``check_locking`` on its
store before it starts (a shared volume whose locks do not reach other processes or nodes,
such as NFSv3 mounted without lockd, is refused rather than risk two writers).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import ExperimentConfig, KernelSpec, config_from_dict, read_prefix
from core.evaluation_store import NetworkEvaluations
from core.kernel_store import KernelTrajectory
from core.pack import Pack
from core.recent import recent

if TYPE_CHECKING:
    from core.checkpoints import CheckpointStore

PACK_FILE = "trajectory.pack"
# The formats before: read, no longer written.
RECORD = "trajectory.json"
CHECKPOINTS = "checkpoints.pack"
LEGACY_CHECKPOINTS = "checkpoints"  # <step>.ckpt, one file each
KERNELS = "kernels"
PACK = ".pack"

RECORD_FIELDS = ("dataset", "model", "phase1", "switch_points", "fractional_checkpoints",
                 "switch_rule")
"""The config's parts that decide a trajectory's checkpoints: a record is appended to the
pack when they differ from the stored record's (phase 1 continued further, say), not for
every config that uses the trajectory (a sweep's 10,000 trials over phase-2 settings)."""

MAX_RECORD_BYTES = 16 << 20
"""A ``trajectory.json`` of the format before is read up to this (a config is at most 1 MiB
of YAML); a larger one is damaged, not read."""

LOG = logging.getLogger(__name__)

_HELD: set[tuple[Path, int]] = set()  # (lock file, thread) held in this process
_EVALUATIONS: dict[tuple[Path, str, str], NetworkEvaluations] = {}

LOCK_PROBE = ".lock-probe"
NFS_LOCAL_LOCKS = ("nolock", "local_lock=flock", "local_lock=all")
"""NFS mount options under which the client keeps flock locks to itself (other nodes never
see them): ``nolock`` is how NFSv3 is mounted where the server runs no lockd."""

NEW_ATTACK_FIELDS = {"schedule": "fixed"}
"""AttackSpec fields newer than the first stored trajectories, with their defaults: left out
of the id at their default, so that those trajectories keep their ids."""


def trajectory_id(cfg: ExperimentConfig, mode: str, seed: int) -> str:
    """Content hash (16 hex digits) of everything that determines a phase-1 trajectory."""
    spec = {
        "dataset": cfg.dataset.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
        "phase1": cfg.phase1.model_dump(mode="json", exclude={"epochs"}),
        "mode": mode,
        "seed": seed,
    }
    if mode != "F":
        spec["phase1"].pop("flip_epoch")
    if mode == "C":
        spec["phase1"].pop("attack")
        spec["phase1"].pop("adv_scheme")
    for name, default in NEW_ATTACK_FIELDS.items():
        if spec["phase1"].get("attack", {}).get(name, default) == default:
            spec["phase1"].get("attack", {}).pop(name, None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def kernel_key(spec: KernelSpec) -> str:
    """``<output>-<hash>``: the kernel directory name of the settings ``spec``."""
    key = {k: getattr(spec, k) for k in ("probe_size", "probe_seed", "output", "logit", "dtype")}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return f"{spec.output}-{digest}"


def epoch_to_step(epoch: float, steps_per_epoch: int) -> int:
    """The minibatch step at (possibly fractional) epoch: round(epoch * steps_per_epoch)."""
    return int(round(epoch * steps_per_epoch))


def checkpoint_epochs(cfg: ExperimentConfig) -> list[float]:
    """Every whole epoch of phase 1, the fractional checkpoints and the switch points."""
    last = cfg.phase1_epochs
    whole = range(int(math.floor(last)) + 1)
    points = {*whole, *cfg.fractional_checkpoints, *cfg.switch_points, last}
    return sorted(p for p in points if p <= last)


def kernel_storage_bytes(cfg: ExperimentConfig, num_classes: int) -> int:
    """Upper bound on the kernel files of one seed (every data mode's trajectory, each
    checkpoint or ``kernel.epochs``), uncompressed: probe_size^2 x outputs x itemsize each."""
    spec = cfg.kernel
    outputs = {"logit": 1, "trace": 1, "classwise": num_classes, "full": num_classes ** 2}
    per_kernel = spec.probe_size ** 2 * outputs[spec.output] * (8 if spec.dtype == "float64"
                                                                 else 4)
    checkpoints = len(checkpoint_epochs(cfg)) if spec.epochs is None else len(spec.epochs)
    return per_kernel * checkpoints * len(cfg.phase1_modes)


def checkpoint_steps(cfg: ExperimentConfig, steps_per_epoch: int) -> dict[int, float]:
    """{step: epoch} of phase-1 checkpoints. Where several epochs round to one step, a whole
    epoch or a switch point names it rather than a fractional checkpoint."""
    named = {*range(int(math.floor(cfg.phase1_epochs)) + 1), *cfg.switch_points}
    steps: dict[int, float] = {}
    for e in sorted(checkpoint_epochs(cfg), key=lambda e: e in named):  # named ones last: win
        steps[epoch_to_step(e, steps_per_epoch)] = e
    return steps


@dataclass(frozen=True)
class Trajectory:
    """One phase-1 trajectory: data mode ``mode`` (C, A or F) of ``seed`` under ``config``,
    stored in ``directory`` (which need not exist yet)."""

    id: str
    mode: str
    seed: int
    directory: Path
    config: ExperimentConfig

    @property
    def pack_path(self) -> Path:
        return self.directory / PACK_FILE

    @property
    def lock_path(self) -> Path:
        return self.directory.with_name(self.directory.name + ".lock")

    def exists(self) -> bool:
        """Phase 1 has started it (its record is written before the first step)."""
        return read_record(self.directory) is not None

    def write_record(self) -> None:
        """Appends the trajectory's record to its pack, unless the stored one has the same
        id, mode, seed and ``RECORD_FIELDS`` of the config. For the holder of the lock."""
        record = {"id": self.id, "mode": self.mode, "seed": self.seed,
                  "config": self.config.model_dump(mode="json")}
        stored = read_record(self.directory)
        if stored is not None and all(
                stored.get(k) == record[k] for k in ("id", "mode", "seed")) and all(
                stored["config"].get(k) == record["config"][k] for k in RECORD_FIELDS):
            return
        Pack(self.pack_path).append(
            {"kind": "record", "meta": record, "digest": "", "leaves": []}, [])

    @contextlib.contextmanager
    def lock(self, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """An exclusive ``flock`` on ``<directory>.lock`` while the block runs: phase-1
        training and kernel computation of one trajectory happen in one process at a time
        (trials that share it wait, then find the work stored). ``on_wait`` is called once
        when another process holds the lock, before waiting for it. Held already by this
        thread, it is entered again. Before it is let go, the evaluations this process kept
        while another held it are appended."""
        with self._flock(True, on_wait):
            yield
            _flush_evaluations(self.pack_path)

    @contextlib.contextmanager
    def try_lock(self) -> Iterator[bool]:
        """The lock if it is free now (or held by this thread): yields whether it is held."""
        with self._flock(False) as held:
            yield held

    @contextlib.contextmanager
    def _flock(self, wait: bool, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
        held = (self.lock_path, threading.get_ident())
        if held in _HELD:
            yield True
            return
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    yield False
                    return
                if on_wait is not None:
                    on_wait()
                fcntl.flock(f, fcntl.LOCK_EX)
            _HELD.add(held)
            try:
                yield True
            finally:
                _HELD.discard(held)
                fcntl.flock(f, fcntl.LOCK_UN)

    def busy(self) -> bool:
        """Whether another process holds the lock now (training the trajectory or computing
        its kernels); takes and drops it if free, so it is an answer for this instant."""
        path = self.lock_path
        if (path, threading.get_ident()) in _HELD:
            return False
        try:
            with open(path) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                fcntl.flock(f, fcntl.LOCK_UN)
        except FileNotFoundError:
            pass
        return False

    def checkpoints(self) -> CheckpointStore:
        """The checkpoint store (``core/checkpoints.py``; the caller closes it)."""
        from core.checkpoints import CheckpointStore

        return CheckpointStore(self.pack_path, legacy=self.directory / LEGACY_CHECKPOINTS,
                               legacy_pack=self.directory / CHECKPOINTS)

    def evaluations(self, key: str, kind: str = "evaluation") -> NetworkEvaluations:
        """Its networks' per-example evaluations under settings ``key`` (the process's one
        reader and writer of them, the last 64 used); ``kind`` ``"initial"``: the models of
        switch step 0 it holds (``core/evaluation_store.py``)."""
        legacy = self.directory / f"evaluations-{key}.jsonl" if kind == "evaluation" else None
        return recent(_EVALUATIONS, (self.pack_path.absolute(), kind, key),
                      lambda: NetworkEvaluations(self.pack_path, key, self.try_lock, legacy, kind),
                      64)

    def reference_path(self, key: str, step: int) -> Path:
        """The reference examples crafted on its network at ``step`` under ``key``."""
        return self.directory / f"reference-{key}-{int(step)}.npz"

    def _kernels_at(self, key: str) -> KernelTrajectory:
        """Kernels of settings ``key``: records of its pack, and those of the formats before,
        ``kernels/<key>.pack`` and the ``.npz`` files in ``kernels/<key>/``."""
        return KernelTrajectory(self.pack_path, key, legacy=self.directory / KERNELS / key,
                                legacy_pack=self.directory / KERNELS / f"{key}{PACK}")

    def kernels(self, spec: KernelSpec, any_of_output: bool = False) -> KernelTrajectory:
        """The stored kernels of settings ``spec``. ``any_of_output``: if none are, the only
        kernels of the same output mode computed with other settings (``kernel --set``)."""
        kernels = self._kernels_at(kernel_key(spec))
        if any_of_output and not kernels.exists():
            packed = {k[1] for k in Pack(self.pack_path).entries()
                      if k[0] == "kernel" and k[1].startswith(f"{spec.output}-")}
            before = {p.name.removesuffix(PACK)
                      for p in (self.directory / KERNELS).glob(f"{spec.output}-*")}
            if len(others := packed | before) == 1:
                return self._kernels_at(others.pop())
        return kernels


def _flush_evaluations(pack_path: Path) -> None:
    """Appends the evaluations this process keeps for the pack (its lock being held)."""
    for (path, *_), evaluations in list(_EVALUATIONS.items()):
        if path == pack_path.absolute() and evaluations.pending:
            evaluations.flush()


def flush_evaluations() -> None:
    """Appends every evaluation this process keeps whose trajectory's lock is free now (at
    the end of a run: those it cannot are left to other processes to evaluate again)."""
    for evaluations in list(_EVALUATIONS.values()):
        evaluations.flush()


def read_record(directory: Path) -> dict[str, Any] | None:
    """The record of the trajectory stored in ``directory`` (its pack's last, else the
    ``trajectory.json`` of the format before), or None if it has none."""
    directory = Path(directory)
    entry = Pack(directory / PACK_FILE).entries().get(("record",))
    if entry is not None:
        return entry.header["meta"]
    path = directory / RECORD
    try:
        data = read_prefix(path, MAX_RECORD_BYTES)
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError(f"over {MAX_RECORD_BYTES} bytes")
        record = json.loads(data)
        if not isinstance(record, dict) or not {"id", "mode", "seed", "config"} <= record.keys():
            raise ValueError("not a trajectory record")
        return record
    except FileNotFoundError:
        return None
    except ValueError as e:  # the next phase 1 of the trajectory appends a record to its pack
        LOG.warning("%s: damaged (%s), not read; the trajectory's next run writes its "
                    "record again", path, str(e)[:200])
        return None


class TrajectoryStore:
    """The trajectories under ``root/trajectories``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.directory = self.root / "trajectories"

    def get(self, cfg: ExperimentConfig, mode: str, seed: int) -> Trajectory:
        tid = trajectory_id(cfg, mode, seed)
        return Trajectory(tid, mode, seed, self.directory / tid, cfg)

    def of(self, cfg: ExperimentConfig, seeds: Any = None) -> list[Trajectory]:
        """The trajectories ``cfg`` trains: every phase-1 data mode of each seed (``seeds``,
        default the config's), stored or not."""
        return [self.get(cfg, mode, seed) for seed in (cfg.seeds if seeds is None else seeds)
                for mode in cfg.phase1_modes]

    def stored(self) -> list[Trajectory]:
        """Every trajectory with a record here, by id, as its record describes it."""
        found = []
        for tid in self.ids():
            try:
                found.append(self.at(self.directory / tid))
            except FileNotFoundError:  # a pack without a record yet, a damaged record
                continue
        return found

    def ids(self) -> list[str]:
        """Ids of the trajectories stored here (a pack, or a record of the format before),
        without reading them."""
        return sorted({p.parent.name for name in (PACK_FILE, RECORD)
                       for p in self.directory.glob(f"*/{name}")})

    def at(self, directory: Path) -> Trajectory:
        """The stored trajectory in ``directory``, as its record describes it."""
        meta = read_record(Path(directory))
        if meta is None:
            raise FileNotFoundError(f"{directory}: no trajectory record")
        return Trajectory(meta["id"], meta["mode"], meta["seed"], Path(directory),
                          config_from_dict(meta["config"], str(Path(directory) / PACK_FILE)))


class LocksNotEnforced(RuntimeError):
    """``flock`` in a store does not keep a second writer out (the message says where, why
    and what to do)."""


# Run in a second process: exit 0 if the probe file's lock is refused, 1 if granted, 2 if
# flock fails (the error on stdout).
_SECOND_LOCKER = """
import fcntl, sys
with open(sys.argv[1], "a") as f:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(0)
    except OSError as e:
        print(e.strerror)
        sys.exit(2)
sys.exit(1)
"""


def _unescape(field: str) -> str:
    """A /proc/self/mountinfo path field (spaces and the like are octal escapes)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def local_only_locks(directory: Path, mountinfo: str) -> str | None:
    """The NFS mount holding ``directory`` and its option that keeps locks on this node
    (``NFS_LOCAL_LOCKS``), or None; ``mountinfo`` is the text of /proc/self/mountinfo."""
    path, best = str(Path(directory).resolve()), None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if "-" not in fields:
            continue
        dash = fields.index("-")
        point, fstype = _unescape(fields[4]), fields[dash + 1]
        options = set(fields[5].split(",")) | set(fields[dash + 3].split(","))
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > len(best[0])):
            best = (point, fstype, options)
    if best is None or not best[1].startswith("nfs"):
        return None
    local = sorted(best[2] & set(NFS_LOCAL_LOCKS))
    return f"{best[1]} mount {best[0]} with {local[0]}" if local else None


def check_locking(directory: str | Path, timeout_s: float = 30.0,
                  mountinfo: Path = Path("/proc/self/mountinfo")) -> None:
    """Raises ``LocksNotEnforced`` unless ``flock`` keeps a second writer out in
    ``directory`` (created if missing), as ``Trajectory.lock`` needs: an exclusive lock on a
    probe file there must make a second process's non-blocking lock fail, and the directory
    must not be on an NFS mount whose locks stay on this node (``local_only_locks``).

    A probe from one node sees one node: it catches a filesystem that ignores or refuses
    locks (ENOLCK: NFSv3 whose lockd is unreachable) and a mount that keeps them local, not a
    server that grants conflicting locks to two clients."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / LOCK_PROBE
    advice = ("trials sharing a trajectory would train it at once and could damage it. Use "
              "a volume whose locks work across nodes (NFSv4, CephFS, or NFSv3 with lockd "
              "and without 'nolock'), or a one-node cluster with a ReadWriteOnce volume")
    try:
        with open(probe, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            second = subprocess.run([sys.executable, "-c", _SECOND_LOCKER, str(probe)],
                                    capture_output=True, text=True, timeout=timeout_s)
    except OSError as e:
        raise LocksNotEnforced(f"{directory}: flock fails here ({e.strerror}): {advice}") from e
    except subprocess.TimeoutExpired:
        raise LocksNotEnforced(f"{directory}: a second lock did not answer in {timeout_s:g} "
                               f"s (flock hangs): {advice}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)
    if second.returncode == 1:
        raise LocksNotEnforced(f"{directory}: flock is not enforced here (a second process "
                               f"got the lock this one held): {advice}")
    if second.returncode != 0:
        raise LocksNotEnforced(f"{directory}: flock fails here for a second process "
                               f"({second.stdout.strip() or second.stderr.strip()}): {advice}")
    try:
        mounts = mountinfo.read_text()
    except OSError:
        return  # not Linux: nothing more to learn
    if local := local_only_locks(directory, mounts):
        raise LocksNotEnforced(f"{directory}: on an {local}, so other nodes never see its "
                               f"locks: {advice}")


def is_trajectory(directory: Path) -> bool:
    return any((Path(directory) / name).is_file() for name in (PACK_FILE, RECORD))
