"""Bit-for-bit runs on GPUs: XLA's deterministic GPU operations, on unless the user opts out.

On a GPU, XLA implements scatter-adds (the gradients of gathers and of pooling, say) and some
reductions with atomic additions, whose order changes from run to run, so two runs of one seed
differ. Measured on an NVIDIA H200 (jax 0.11.2, ``benchmarks/gpu_determinism.py``, 2026-11-27):
the quick digits experiment in five fresh processes gave five different result tables, with
or without the persistent compilation cache (so not the cache, nor exported programs), clean
accuracies apart by up to 0.8 points and robust ones by up to 3; with
``--xla_gpu_deterministic_ops=true`` a cold and a warm process gave the same bits.

XLA reads ``XLA_FLAGS`` once, when jax starts its backends (the first computation), so
``core`` calls ``request()`` when it is imported, before any computation of its own:

* ``XLA_FLAGS`` that already name ``xla_gpu_deterministic_ops`` (either value) are left alone;
* ``NTK_SWEEP_GPU_DETERMINISTIC=0`` leaves the flag off: faster where atomics matter, and not
  reproducible;
* otherwise the flag is appended. It changes nothing on CPU.

``state()`` says what the backend got (part of the key of stored evaluations: numbers of a
non-deterministic GPU run are not another run's). A process that started jax before importing
``core`` cannot get the flag any more: ``state()`` is then ``"off"`` on a GPU, with a warning.
"""

from __future__ import annotations

import os
import warnings
from functools import cache

from core import xla_flags

FLAG = "xla_gpu_deterministic_ops"
OPT_OUT = "NTK_SWEEP_GPU_DETERMINISTIC"
_late = False  # jax's backends had started when request() ran


def request() -> None:
    """Appends ``--xla_gpu_deterministic_ops=true`` to ``XLA_FLAGS`` (see the module doc)."""
    global _late
    if os.environ.get(OPT_OUT, "1").strip() in ("0", "false", "False"):
        return
    started = xla_flags.backends_started()
    if xla_flags.append(FLAG, "true"):  # not when XLA_FLAGS name it already
        _late = started


@cache
def state() -> str:
    """``"cpu"`` (deterministic anyway), ``"on"`` or ``"off"``: what this process's backend
    runs with. Call after jax has started (it starts the backend if not)."""
    import jax

    if jax.default_backend() == "cpu":
        return "cpu"
    flags = os.environ.get("XLA_FLAGS", "").replace(" ", "")
    on = f"--{FLAG}=true" in flags or f"--{FLAG}=1" in flags
    if on and _late:
        warnings.warn(f"jax started its {jax.default_backend()} backend before core was "
                      f"imported, so XLA_FLAGS' {FLAG} came too late: runs on it are not "
                      "bit-for-bit reproducible. Import core (or set XLA_FLAGS) first.",
                      RuntimeWarning, stacklevel=2)
        return "off"
    return "on" if on else "off"
