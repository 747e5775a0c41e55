"""The one place that knows which jax release is installed.

ntk-sweep runs on jax 0.10 (Python 3.11) and jax 0.12 (Python 3.12/3.13), and its GPU check on
whatever jax a GPU machine has (0.11 with CUDA 13, say). Call sites import these names and never
test versions themselves:

* ``enable_x64()``: a context in which arrays default to 64 bits (``jax.enable_x64(True)``
  since jax 0.6; ``jax.experimental.enable_x64()`` before, removed in 0.9).
* ``shard_map(f, mesh, in_specs, out_specs)``: ``f`` as a per-device program, with the
  replication checks OFF (``check_vma=False``, formerly ``check_rep=False``). With them on, a
  ``jacrev`` of replicated parameters inside ``f`` gets a ``psum`` inserted and the per-device
  Jacobians are silently summed across devices (tests/test_ntk.py compares 4 devices to 1).
* ``use_compilation_cache(directory)``: jax's persistent compilation cache in ``directory``.
* ``import_neural_tangents()``: neural-tangents 0.6.5 (its last release, written for jax 0.4)
  on current jax and without TensorFlow; see ``NT_ALIASES``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

# --- jax ---------------------------------------------------------------------------------------

COMPILATION_CACHE_MAX_BYTES = 4 * 2**30  # least recently used entries go beyond this


def use_compilation_cache(directory: str | os.PathLike[str] | None) -> None:
    """jax's persistent compilation cache in ``directory`` (None: leave it off), for every
    program however short its compilation: a second process with the same programs loads
    them instead of compiling (the tiny test experiment: 15 s -> 3.4 s on 2 CPU cores). jax's
    cache key covers the program, its compile options, the backend and device kind and the
    jax/jaxlib versions, so a stale entry is never used; loaded executables compute the same
    bits as compiled ones. Entries beyond ``COMPILATION_CACHE_MAX_BYTES`` are evicted."""
    if directory is None:
        return
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if "jax_compilation_cache_max_size" in jax.config.values:
        jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)


@contextlib.contextmanager
def enable_x64() -> Iterator[None]:
    """Arrays created inside default to float64/int64 (for float64 reference computations)."""
    if hasattr(jax, "enable_x64"):
        with jax.enable_x64(True):
            yield
    else:  # jax < 0.6
        from jax.experimental import enable_x64 as legacy

        with legacy():
            yield


def shard_map(f: Callable, mesh: jax.sharding.Mesh, in_specs: Any, out_specs: Any) -> Callable:
    """``f`` run once per device of ``mesh`` on its shard, replication checks off."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy  # jax < 0.7

    return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


# --- neural-tangents ---------------------------------------------------------------------------

# (module neural-tangents imports from, name, module where current jax keeps it). Each is aliased
# only where the first module lacks the name, so on a jax that still has it nothing changes.
NT_ALIASES: tuple[tuple[str, str, str], ...] = (
    ("jax.core", "Jaxpr", "jax.extend.core"),
    ("jax.core", "JaxprEqn", "jax.extend.core"),
    ("jax.core", "Literal", "jax.extend.core"),
    ("jax.core", "Var", "jax.extend.core"),
    ("jax.core", "Primitive", "jax.extend.core"),
    ("jax.util", "safe_map", "jax._src.util"),  # the module jax.util is gone since jax 0.8
    ("jax.util", "safe_zip", "jax._src.util"),
    ("jax.interpreters.ad", "zeros_like_p", "jax._src.ad_util"),
)

TENSORFLOW_MESSAGE = (
    "neural_tangents.experimental (TensorFlow/Keras models) needs TensorFlow, which ntk-sweep "
    "does not install; ntk-sweep uses only neural_tangents.empirical_ntk_fn"
)


def _module(name: str) -> types.ModuleType:
    """The module ``name``, created empty (and attached to its parent) when it does not exist."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
    parent, _, child = name.rpartition(".")
    module = types.ModuleType(name, f"created by core.compat: {name} is gone from this jax")
    sys.modules[name] = module
    if parent:
        setattr(_module(parent), child, module)
    return module


def alias_missing(aliases: Sequence[tuple[str, str, str]]) -> list[str]:
    """Gives each ``module.name`` that is missing the object jax now keeps elsewhere.

    Returns the names aliased (empty where nothing was missing). Raises ``ImportError`` naming
    the symbol when it is in neither place: a jax release that moved it again.
    """
    done = []
    for target, name, source in aliases:
        module = _module(target)
        if hasattr(module, name):
            continue
        try:
            value = getattr(importlib.import_module(source), name)
        except (ImportError, AttributeError):
            raise ImportError(
                f"neural-tangents needs {target}.{name}, which jax {jax.__version__} has "
                f"neither there nor in {source}: add its new home to core.compat.NT_ALIASES"
            ) from None
        setattr(module, name, value)
        done.append(f"{target}.{name}")
    return done


def _tensorflow_stub() -> types.ModuleType:
    """Stands in for ``neural_tangents.experimental`` when TensorFlow is not installed: the
    package imports it eagerly, but only its TF/Keras converters need it."""
    stub = types.ModuleType("neural_tangents.experimental", TENSORFLOW_MESSAGE)

    def __getattr__(attr: str) -> Any:
        if attr.startswith("__"):  # import machinery probes (__path__, ...): plain "absent"
            raise AttributeError(attr)
        raise ImportError(f"neural_tangents.experimental.{attr}: {TENSORFLOW_MESSAGE}")

    stub.__getattr__ = __getattr__  # type: ignore[method-assign]
    return stub


def import_neural_tangents() -> types.ModuleType:
    """neural-tangents (the ``nt`` extra), importable on current jax without TensorFlow.

    Only ``empirical_ntk_fn`` with ``JACOBIAN_CONTRACTION`` and ``NTK_VECTOR_PRODUCTS`` is used
    and tested (tests/test_ntk.py, against a float64 Jacobian product); its
    ``STRUCTURED_DERIVATIVES`` and ``AUTO`` rely on more jax internals and do not work.
    """
    if "neural_tangents" in sys.modules:
        return sys.modules["neural_tangents"]
    if importlib.util.find_spec("neural_tangents") is None:
        raise ImportError("neural-tangents is not installed: pip install 'ntk-sweep[nt]' "
                          "(or `pip install --no-deps neural-tangents frozendict`)")
    alias_missing(NT_ALIASES)
    if importlib.util.find_spec("tensorflow") is None:
        sys.modules.setdefault("neural_tangents.experimental", _tensorflow_stub())
    return importlib.import_module("neural_tangents")
