"""Every NTK implementation and output mode against an explicit float64 Jacobian product."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.compat import enable_x64
from core.dynamics import Anchor, make_apply_fn
from core.ntk import Implementation, NtkEngine, Output, kernel_shape
from tests.helpers import tiny_model

N, O = 7, 3  # noqa: E741 - inputs and outputs, as in the formulas
TOL = {"float32": 2e-5, "float64": 1e-11}


def reference_full(apply, anchor, params, bs, x) -> np.ndarray:
    """K[i, j, o, q] = J[i, o, :] . J[j, q, :] with J from jax.jacrev in float64."""
    with enable_x64():
        f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)  # noqa: E731
        a64, p64, bs64 = f64(anchor), f64(params), f64(bs)
        f = lambda p: apply(a64, p, bs64, jnp.asarray(x, jnp.float64), False)[0]  # noqa: E731
        jac = jax.jacrev(f)(p64)
        flat = [leaf.reshape(x.shape[0], O, -1) for leaf in jax.tree.leaves(jac)]
        j = jnp.concatenate(flat, axis=-1)
        return np.asarray(jnp.einsum("iop,jqp->ijoq", j, j))


def expected(full: np.ndarray, output: Output, logit: int) -> np.ndarray:
    return {
        Output.LOGIT: full[:, :, logit, logit],
        Output.CLASSWISE: np.einsum("ijoo->oij", full),
        Output.TRACE: np.einsum("ijoo->ij", full),
        Output.FULL: full,
    }[output]


def _setup(name: str, dynamics: str, with_model: bool = False):
    model, params, bs = tiny_model(name, num_classes=O)
    apply = make_apply_fn(model, dynamics, "frozen")
    moved = jax.tree.map(lambda p: p + 0.05, params)  # kernels at parameters off the anchor
    anchor = None if dynamics == "standard" else Anchor(params, bs)
    x = np.random.default_rng(0).uniform(size=(N, 8, 8, 1)).astype(np.float32)
    if with_model:
        return apply, anchor, moved, bs, x, model
    return apply, anchor, moved, bs, x


NT = pytest.mark.skipif(importlib.util.find_spec("neural_tangents") is None,
                        reason="neural-tangents (the nt extra) is not installed")

# "blocked" runs twice: with dense-layer factors (given the model) and with plain Jacobians;
# neural-tangents' implementations need the optional nt extra (CI installs it). Every one runs
# on the MLP and the CNN; ResNet-18 (BatchNorm, residual sums: what the layer factors must get
# right) runs the engine's default, blocked with factors; the others see no layer there, and
# each ResNet case costs about 30 s of compilation on 2 cores.
CASES = [
    *(pytest.param(name, impl, marks=[*([NT] if impl not in ("blocked+factors",
                                                            Implementation.BLOCKED) else []),
                                      *([pytest.mark.slow] if name == "cnn" else [])])
      for name in ("mlp", "cnn") for impl in ("blocked+factors", *Implementation)),
    pytest.param("resnet18", "blocked+factors", marks=pytest.mark.slow),
]
_REFERENCES: dict[str, np.ndarray] = {}  # by model: the float64 Jacobian product, once


@pytest.mark.smoke
@pytest.mark.parametrize("name, implementation", CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_implementation_and_output_against_jacobian_product(name, implementation, dtype):
    apply, anchor, params, bs, x, model = _setup(name, "standard", with_model=True)
    if name not in _REFERENCES:
        _REFERENCES[name] = reference_full(apply, anchor, params, bs, x)
    full = _REFERENCES[name]
    scale = np.abs(full).max()
    factors = implementation == "blocked+factors"
    for output in Output:
        engine = NtkEngine(apply, output, logit=2, block_size=3, dtype=dtype,
                           implementation="blocked" if factors else implementation,
                           model=model if factors else None)
        k = engine(anchor, params, bs, x)
        assert k.shape == kernel_shape(output, N, O) and k.dtype == np.dtype(dtype)
        np.testing.assert_allclose(k / scale, expected(full, output, 2) / scale,
                                   atol=TOL[dtype], err_msg=f"{output}")


@pytest.mark.parametrize("dynamics", ["linearized", "centered"])
def test_kernel_of_linear_dynamics_is_the_anchor_kernel(dynamics):
    apply, anchor, params, bs, x = _setup("cnn", dynamics)
    net = make_apply_fn(tiny_model("cnn", num_classes=O)[0], "standard", "frozen")
    k_lin = NtkEngine(apply, "classwise", block_size=3)(anchor, params, bs, x)
    # The linear model's Jacobian is J at the anchor, wherever its parameters are.
    k_anchor = NtkEngine(net, "classwise", block_size=3)(None, anchor.params, bs, x)
    np.testing.assert_allclose(k_lin, k_anchor, rtol=1e-5, atol=1e-6 * np.abs(k_anchor).max())


@pytest.mark.parametrize("output", ["classwise", "trace", "full"])
def test_symmetric_and_positive_semidefinite(output):
    apply, anchor, params, bs, x = _setup("cnn", "standard")
    k = NtkEngine(apply, output, block_size=2)(anchor, params, bs, x)
    if output == "full":
        k = k.transpose(2, 0, 3, 1).reshape(O * N, O * N)
    mats = k if k.ndim == 3 else k[None]
    for m in mats:
        np.testing.assert_allclose(m, m.T, rtol=0, atol=1e-6 * np.abs(m).max())
        assert np.linalg.eigvalsh(m.astype(np.float64)).min() >= -1e-5 * np.abs(m).max()


# What each NtkEngine precision must put on every (matrix product, convolution). Without a
# precision of its own, a float32 product runs at jax's default, which is TF32 on NVIDIA GPUs
# (about 1e-3 relative error in the kernel; benchmarks/gpu.py measures it). Convolutions take no
# bf16 algorithm: under "bfloat16" they run at DEFAULT (TF32 on NVIDIA GPUs).
PRECISION_IN_HLO = {"float32": ("HIGHEST", "HIGHEST"), "tensorfloat32": ("HIGH", "HIGH"),
                    "bfloat16": ("lhs_precision_type = bf16", "precision DEFAULT")}


@pytest.mark.parametrize("precision", list(PRECISION_IN_HLO))
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_every_product_and_convolution_runs_at_the_engine_precision(name, precision):
    apply, anchor, params, bs, x, model = _setup(name, "standard", with_model=True)
    engine = NtkEngine(apply, "classwise", block_size=3, model=model, precision=precision)
    text = engine.programs_text(anchor, params, bs, x)
    ops = [line for line in text.splitlines()
           if "stablehlo.dot_general" in line or "stablehlo.convolution" in line]
    assert ops and any("convolution" in op for op in ops) == (name == "cnn")
    dot, conv = PRECISION_IN_HLO[precision]
    for op in ops:
        assert (conv if "convolution" in op else dot) in op, op[:300]
    if precision != "float32":  # faster, and close: the kernel within bf16's rounding
        k = engine(anchor, params, bs, x)
        ref = NtkEngine(apply, "classwise", block_size=3, model=model)(anchor, params, bs, x)
        np.testing.assert_allclose(k, ref, atol=3e-2 * np.abs(ref).max())


def test_streaming_under_a_tiny_budget_equals_cached():
    apply, anchor, params, bs, x = _setup("mlp", "standard")
    cached = NtkEngine(apply, "classwise", block_size=2)
    streaming = NtkEngine(apply, "classwise", block_size=2, memory_budget=10_000)
    a, b = cached(anchor, params, bs, x), streaming(anchor, params, bs, x)
    assert cached.last_plan["cached"] and not streaming.last_plan["cached"]
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7 * np.abs(a).max())


def test_no_recompilation_across_checkpoints():
    apply, anchor, params, bs, x, model = _setup("cnn", "standard", with_model=True)
    engine = NtkEngine(apply, "classwise", block_size=3, model=model)
    engine(anchor, params, bs, x)
    traces = engine.traces
    assert traces == 2  # the Jacobian program and the tile contraction
    for scale in (0.9, 1.1, 1.2):
        engine(anchor, jax.tree.map(lambda p, s=scale: p * s, params), bs, x)
    assert engine.traces == traces


SHARDED = textwrap.dedent("""
    import jax, numpy as np
    from core.ntk import NtkEngine, Output
    from core.dynamics import make_apply_fn
    from tests.helpers import tiny_model
    assert jax.device_count() == 4, jax.devices()
    for name in ("mlp", "cnn"):
        model, params, bs = tiny_model(name, num_classes=3)
        apply = make_apply_fn(model, "standard", "frozen")
        for n in (13, 8, 3):  # not divisible by 4, divisible, fewer inputs than devices
            x = np.random.default_rng(n).uniform(size=(n, 8, 8, 1)).astype(np.float32)
            for output in Output:
                one = NtkEngine(apply, output, block_size=2, devices=jax.devices()[:1])
                four = NtkEngine(apply, output, block_size=2, model=model)
                a, b = one(None, params, bs, x), four(None, params, bs, x)
                assert four.last_plan["devices"] == 4
                np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())
                stream = NtkEngine(apply, output, block_size=2, memory_budget=20_000)
                c = stream(None, params, bs, x)
                assert not stream.last_plan["cached"]
                np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())
    print("SHARDED OK")
""")


@pytest.mark.slow
@pytest.mark.smoke
def test_sharded_equals_unsharded_on_four_cpu_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": root}, cwd=root, timeout=600)
    assert proc.returncode == 0 and "SHARDED OK" in proc.stdout, proc.stderr[-3000:]


def test_memory_budget_comes_from_the_machine():
    """No budget given: a share of what is free now, per device. On CPU that is a quarter of
    the host's available memory over the CPU devices; an accelerator reports its own free
    memory (``memory_stats``), and the smallest free share among the devices counts."""
    from core import ntk

    cpus = jax.devices("cpu")
    expected = ntk.HOST_MEMORY_SHARE * ntk.host_available_memory() / len(cpus)
    budget = ntk.machine_memory_budget(cpus)
    assert abs(budget - max(expected, ntk.MIN_MEMORY_BUDGET)) < 0.05 * expected + 2**20

    class Accelerator:  # what jax.Device.memory_stats reports on a GPU, for the arithmetic
        platform = "gpu"

        def __init__(self, limit: int, used: int):
            self.stats = {"bytes_limit": limit, "bytes_in_use": used}

        def memory_stats(self) -> dict[str, int]:
            return self.stats

    gpus = [Accelerator(80 * 2**30, 10 * 2**30), Accelerator(80 * 2**30, 30 * 2**30)]
    assert ntk.machine_memory_budget(gpus) == int(ntk.DEVICE_MEMORY_SHARE * 50 * 2**30)
    assert ntk.machine_memory_budget([Accelerator(2**20, 0)]) == ntk.MIN_MEMORY_BUDGET

    apply = make_apply_fn(tiny_model("mlp")[0], "standard", "frozen")
    assert abs(NtkEngine(apply, "classwise").memory_budget - budget) < 0.05 * budget + 2**20
    assert NtkEngine(apply, memory_budget=2**20).memory_budget == 2**20
