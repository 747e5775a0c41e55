"""core.determinism: importing core asks XLA for deterministic GPU operations, before jax starts.

The flag only acts on a GPU (benchmarks/gpu.py's ``warm_process`` section checks the bits there);
here each case is a fresh interpreter, since XLA reads XLA_FLAGS once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from core import determinism

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = "--xla_gpu_deterministic_ops=true"


def fresh(code: str, **env: str) -> dict:
    """Runs ``code`` in a new interpreter whose environment has no XLA_FLAGS or opt-out but
    ``env``; ``code`` ends by printing one JSON object."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("XLA_FLAGS", determinism.OPT_OUT)}
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
    got = fresh(PROBE)
    assert got == {"flags": FLAG, "late": False}
    # Flags of the user's are kept, the request appended.
    got = fresh(PROBE, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert got["flags"] == f"--xla_force_host_platform_device_count=2 {FLAG}"


def test_the_user_decides_over_the_default():
    # An explicit value in XLA_FLAGS, either way, is left as it is.
    off = "--xla_gpu_deterministic_ops=false"
    assert fresh(PROBE, XLA_FLAGS=off)["flags"] == off
    assert fresh(PROBE, XLA_FLAGS=FLAG)["flags"] == FLAG
    # The opt-out leaves XLA_FLAGS unset.
    assert fresh(PROBE, NTK_SWEEP_GPU_DETERMINISTIC="0")["flags"] is None


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
    assert got == {"flags": FLAG, "late": True, "state": "cpu"}
