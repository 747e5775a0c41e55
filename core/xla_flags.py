"""XLA flags that importing ``core`` appends to ``XLA_FLAGS``, before jax starts its backends
(XLA reads them once per process, at the first computation). A flag the user's ``XLA_FLAGS``
already names keeps the user's value.

* ``--xla_gpu_deterministic_ops=true``: GPU runs bit for bit (``core/determinism.py``).
* ``--xla_backend_optimization_level=2`` where the process computes on the CPU (``cpu_only``):
  XLA's CPU backend compiles with LLVM at level 3 by default, and level 2 gives the same bits,
  compiles faster and runs faster here. Measured on this project's 2-core host (jax 0.10.2,
  2026-11-27, ``benchmarks/xla_opt_level.py``, alternating 3, 2, 2, 3): the quick digits
  experiment in a fresh process 54.2/58.3 s -> 41.9/47.8 s (0.80), with every program loaded
  from the compilation cache 39.4/39.0 s -> 31.5/31.2 s (0.80), the result rows the same bits
  at both levels; a tiny ResNet-18's initialisation compiled in 12.6 s -> 2.5 s. GPUs keep
  XLA's default (not measured there).
  ``XLA_FLAGS=--xla_backend_optimization_level=3`` restores the default.
"""

from __future__ import annotations

import os
import sys

OPT_LEVEL = "xla_backend_optimization_level"
CPU_OPT_LEVEL = 2
# Device nodes of accelerators jax would use instead of the CPU: NVIDIA, AMD (ROCm), TPU.
ACCELERATOR_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/accel0")


def backends_started() -> bool:
    """Whether jax has started its backends (too late for ``XLA_FLAGS``); never imports jax."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    started = getattr(bridge, "backends_are_initialized", None)
    return bool(started and started())


def append(flag: str, value: str) -> bool:
    """Appends ``--flag=value`` to ``XLA_FLAGS`` unless they name ``flag`` already; whether it
    did."""
    flags = os.environ.get("XLA_FLAGS", "")
    if flag in flags:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} --{flag}={value}".strip()
    return True


def cpu_only() -> bool:
    """Whether this process will compute on the CPU: ``JAX_PLATFORMS`` says only ``cpu``, or it
    names nothing and the host has no accelerator device node (``ACCELERATOR_NODES``)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms == "cpu"
    return not any(os.path.exists(node) for node in ACCELERATOR_NODES)


def request_cpu_opt_level() -> None:
    """``--xla_backend_optimization_level=2`` where ``cpu_only()`` (see the module doc)."""
    if cpu_only():
        append(OPT_LEVEL, str(CPU_OPT_LEVEL))
