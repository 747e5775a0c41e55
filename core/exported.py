"""Jitted programs kept across processes as exported StableHLO (``jax.export``), beside the
persistent compilation cache.

The persistent cache (``core.compat.use_compilation_cache``) spares a new process XLA's
compilation, not tracing and lowering: the digits experiment's three evaluators took 1.7 s
to trace and 0.6 s to lower in every process, half of the compilation left in a warm run
(issue 15). ``stored_jit`` exports a program once and keeps it in ``<cache>/exported/``; a
later process deserializes it and calls it (the phase-2 evaluator: 0.05 s instead of 0.94 s).

* A program's file is ``<name>-<hash>.jaxexport``, the hash of its name, what it is built
  from (``deps``, as ``core.experiment._program`` keys it), its arguments (tree, shapes,
  dtypes), the stack (JAX version, backend, the JAX flags that change tracing: ``FLAGS``) and
  the source of ``core/``: a change to the code makes new programs, so a stale one is never
  called.
* The file is the serialized program followed by its SHA-256, written to a temporary name
  and renamed; one that fails the check or does not deserialize is reported with a warning
  and exported again. The newest ``MAX_PROGRAMS`` are kept.
* Every process calls the exported program, whether it exported or loaded it (and without a
  cache, exported in memory): one program per signature, the same bits in every process.

Programs whose arguments include custom pytree nodes need them registered for serialization
(``jax.export.register_namedtuple_serialization``): done here for ``Anchor``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from core.dynamics import Anchor
from core.kernel_store import write_atomic

LOG = logging.getLogger("ntk_sweep")

SUFFIX = ".jaxexport"
MAX_PROGRAM_BYTES = 256 << 20
"""A stored program larger than this is damaged (the digits evaluators are about 50 KB)."""
MAX_PROGRAMS = 512
"""Programs kept: past this many files, saving one removes the least recently written (each
change to ``core/`` makes new ones; JAX's cache eviction does not look into ``exported/``)."""
FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
         "jax_threefry_partitionable", "jax_numpy_dtype_promotion")
"""JAX settings that change what tracing produces: part of every program's key."""

jax.export.register_namedtuple_serialization(Anchor, serialized_name="ntk_sweep.Anchor")

_SOURCE: list[str] = []  # the digest of core/'s source, computed once per process


def source_digest() -> str:
    """SHA-256 of every ``core/*.py`` file (names and contents), once per process."""
    if not _SOURCE:
        digest = hashlib.sha256()
        for path in sorted(Path(__file__).parent.glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        _SOURCE.append(digest.hexdigest())
    return _SOURCE[0]


def directory() -> Path | None:
    """Where exported programs are kept: ``exported/`` in JAX's persistent compilation cache,
    None when the process has none."""
    cache = jax.config.jax_compilation_cache_dir
    return Path(cache) / "exported" if cache else None


def _signature(args: tuple[Any, ...]) -> str:
    """The arguments as a program sees them: tree structure, shapes, dtypes, weak types."""
    leaves, tree = jax.tree.flatten(args)
    return repr((str(tree), [(np.shape(x), str(x.dtype)) if hasattr(x, "dtype") else
                             type(x).__name__ for x in leaves]))


def _key(name: str, deps: str, signature: str) -> str:
    stack = [jax.__version__, jax.default_backend(),
             *(repr(jax.config.values.get(f)) for f in FLAGS)]
    text = repr((name, deps, signature, stack, source_digest()))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _load(path: Path) -> jax.export.Exported | None:
    """The program stored at ``path``; None if there is none, or (with a warning) if it is
    damaged."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROGRAM_BYTES + 33)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        LOG.warning("%s: exported program not read (%s); exported again", path, e)
        return None
    try:
        if len(data) > MAX_PROGRAM_BYTES + 32 or len(data) < 32:
            raise ValueError(f"{len(data)} bytes")
        body, digest = data[:-32], data[-32:]
        if hashlib.sha256(body).digest() != digest:
            raise ValueError("its SHA-256 does not match")
        return jax.export.deserialize(bytearray(body))
    except Exception as e:  # noqa: BLE001 - checks and flatbuffers' errors alike
        LOG.warning("%s: damaged exported program (%s: %s); exported again", path,
                    type(e).__name__, str(e)[:200])
        return None


def _save(path: Path, exported: jax.export.Exported) -> None:
    body = bytes(exported.serialize())
    write_atomic(path, lambda f: f.write(body + hashlib.sha256(body).digest()))
    _prune(path.parent)


def _prune(where: Path) -> None:
    """Removes the oldest programs beyond ``MAX_PROGRAMS`` (another process that was about
    to read one exports it again)."""
    programs = []
    for p in where.glob(f"*{SUFFIX}"):
        try:
            programs.append((p.stat().st_mtime_ns, p))
        except FileNotFoundError:  # removed by another process meanwhile
            continue
    for _, p in sorted(programs)[:-MAX_PROGRAMS]:
        p.unlink(missing_ok=True)


def stored_jit(fn: Callable[..., Any], name: str, deps: str,
               donate_argnums: tuple[int, ...] = ()) -> Callable[..., Any]:
    """``jax.jit(fn)``, each of its programs (one per argument signature) exported once and
    kept in ``directory()``, so that later processes call it instead of tracing ``fn``.
    ``deps``: everything ``fn``'s closure reads, as a stable string."""
    jitted = jax.jit(fn, donate_argnums=donate_argnums)
    programs: dict[str, Callable[..., Any]] = {}

    def call(*args: Any) -> Any:
        signature = _signature(args)
        if (program := programs.get(signature)) is None:
            where, key = directory(), _key(name, deps, signature)
            path = None if where is None else where / f"{name}-{key}{SUFFIX}"
            exported = None if path is None else _load(path)
            if exported is None:
                exported = jax.export.export(jitted)(*args)
                if path is not None:
                    try:
                        _save(path, exported)
                    except OSError as e:  # a full or read-only cache: still run the program
                        LOG.warning("%s: exported program not kept (%s)", path, e)
            program = programs[signature] = jax.jit(exported.call, donate_argnums=donate_argnums)
        return program(*args)

    return call
