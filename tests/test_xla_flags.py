"""What importing core sets in XLA_FLAGS before jax starts (core/xla_flags.py): deterministic GPU
operations (core/determinism.py), and LLVM level 2 on CPUs.

The determinism flag only acts on a GPU (benchmarks/gpu.py's ``warm_process`` section checks the
bits there); here each case is a fresh interpreter, since XLA reads XLA_FLAGS once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from core import determinism, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = "--xla_gpu_deterministic_ops=true"
LEVEL2 = "--xla_backend_optimization_level=2"


def fresh(code: str, **env: str) -> dict:
    """Runs ``code`` in a new interpreter whose environment has no XLA_FLAGS or opt-out but
    ``env``; ``code`` ends by printing one JSON object."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("XLA_FLAGS", determinism.OPT_OUT, "JAX_PLATFORMS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={**base, "PYTHONPATH": ROOT, **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


PROBE = """
import json, os
import core
from core import determinism
print(json.dumps({"flags": os.environ.get("XLA_FLAGS"), "late": determinism._late}))
"""


@pytest.mark.smoke
def test_importing_core_asks_for_deterministic_gpu_ops():
    got = fresh(PROBE, JAX_PLATFORMS="cuda")  # a GPU process: nothing else is appended
    assert got == {"flags": FLAG, "late": False}
    # Flags of the user's are kept, the request appended.
    got = fresh(PROBE, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                JAX_PLATFORMS="cuda")
    assert got["flags"] == f"--xla_force_host_platform_device_count=2 {FLAG}"


def test_the_user_decides_over_the_default():
    # An explicit value in XLA_FLAGS, either way, is left as it is.
    off = "--xla_gpu_deterministic_ops=false"
    assert fresh(PROBE, XLA_FLAGS=off, JAX_PLATFORMS="cuda")["flags"] == off
    assert fresh(PROBE, XLA_FLAGS=FLAG, JAX_PLATFORMS="cuda")["flags"] == FLAG
    # The opt-out leaves XLA_FLAGS unset.
    assert fresh(PROBE, NTK_SWEEP_GPU_DETERMINISTIC="0", JAX_PLATFORMS="cuda")["flags"] is None
    # And on a CPU an explicit optimisation level is the user's.
    level3 = "--xla_backend_optimization_level=3"
    assert fresh(PROBE, XLA_FLAGS=level3, JAX_PLATFORMS="cpu")["flags"] == f"{level3} {FLAG}"


def test_jax_started_before_core_is_known_to_be_late():
    got = fresh("""
import json, os
import jax.numpy as jnp
jnp.ones(1).block_until_ready()  # the backend starts here, without the flag
import core
from core import determinism
print(json.dumps({"flags": os.environ.get("XLA_FLAGS"), "late": determinism._late,
                  "state": determinism.state()}))
""")
    # On CPU the flag changes nothing, so the state is "cpu" however late it came; on a GPU
    # the same process would say "off" and warn.
    assert got == {"flags": f"{FLAG} {LEVEL2}", "late": True, "state": "cpu"}


def test_a_cpu_process_compiles_at_llvm_level_2_and_a_gpu_process_at_xlas_default():
    assert fresh(PROBE, JAX_PLATFORMS="cpu")["flags"] == f"{FLAG} {LEVEL2}"
    assert fresh(PROBE, JAX_PLATFORMS="cuda")["flags"] == FLAG
    assert fresh(PROBE, JAX_PLATFORMS="cuda,cpu")["flags"] == FLAG
    # With no platform named, the host decides: an accelerator's device node means not only
    # the CPU.
    got = fresh(PROBE)["flags"]
    assert got == (f"{FLAG} {LEVEL2}" if xla_flags.cpu_only() else FLAG)


_DIGEST = """
import hashlib, json, os, sys
import numpy as np
from core.experiment import run_experiment
from core.trajectory_kernels import compute_trajectory_kernels
from core.trajectory_store import TrajectoryStore
from tests.helpers import tiny_cfg
digest = hashlib.sha256()
for name, model in (("mlp", {"name": "mlp", "widths": [8]}),):
    cfg = tiny_cfg(switch_points=[1], codes=["AA"], model=model)
    cfg = cfg.model_copy(update={"kernel": cfg.kernel.model_copy(update={"probe_size": 12})})
    rows = run_experiment(cfg, os.path.join(sys.argv[1], name))
    digest.update(json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in rows],
                             sort_keys=True).encode())
    for trajectory in TrajectoryStore(os.path.join(sys.argv[1], name)).of(cfg):
        store = compute_trajectory_kernels(trajectory, cfg.kernel)
        for epoch in store.epochs():
            digest.update(np.ascontiguousarray(store.load(epoch).kernel).tobytes())
print(json.dumps({"flags": os.environ["XLA_FLAGS"], "digest": digest.hexdigest()}))
"""


@pytest.mark.slow
def test_llvm_level_2_computes_the_bits_of_xlas_default_level(tmp_path):
    """Level 2 is a speed choice only: a tiny experiment (adversarial training, linearised
    adversarial phase 2, the evaluation's attacks) and its kernels are the same bits as at
    XLA's default level 3. (The CNN with BatchNorm of the quick digits experiment too:
    ``benchmarks/xla_opt_level.py``; a tiny one here would take 30 s to compile at level 3.)"""
    default = fresh(_DIGEST.replace("sys.argv[1]", repr(str(tmp_path / "a"))),
                    JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=3")
    ours = fresh(_DIGEST.replace("sys.argv[1]", repr(str(tmp_path / "b"))),
                 JAX_PLATFORMS="cpu")
    assert LEVEL2 in ours["flags"] and LEVEL2 not in default["flags"]
    assert ours["digest"] == default["digest"]
