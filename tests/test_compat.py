"""core.compat: the jax APIs that moved, and neural-tangents on current jax without TensorFlow."""

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

from core import compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NT_INSTALLED = importlib.util.find_spec("neural_tangents") is not None


@pytest.mark.smoke
def test_enable_x64_is_a_context():
    assert jnp.ones(1).dtype == jnp.float32
    with compat.enable_x64():
        assert jnp.ones(1).dtype == jnp.float64
    assert jnp.ones(1).dtype == jnp.float32


def test_alias_missing_changes_nothing_that_exists():
    before = jax.core.ShapedArray
    assert compat.alias_missing([("jax.core", "ShapedArray", "jax.extend.core")]) == []
    assert jax.core.ShapedArray is before


def test_alias_missing_names_a_symbol_that_moved_again():
    with pytest.raises(ImportError, match=r"jax\.core\.NoSuchName.*jax\.extend\.core"):
        compat.alias_missing([("jax.core", "NoSuchName", "jax.extend.core")])


def test_alias_missing_creates_a_module_that_is_gone():
    # A fresh interpreter: the created module must not leak into this test process.
    code = textwrap.dedent("""
        import sys
        from core import compat
        assert "jax.ntk_sweep_gone" not in sys.modules
        done = compat.alias_missing([("jax.ntk_sweep_gone", "safe_map", "jax._src.util")])
        assert done == ["jax.ntk_sweep_gone.safe_map"], done
        from jax.ntk_sweep_gone import safe_map
        import jax._src.util
        assert safe_map is jax._src.util.safe_map
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.smoke
def test_install_holds_no_tensorflow():
    """The lock's override keeps neural-tangents' TensorFlow requirement out (1.9 GB)."""
    assert importlib.util.find_spec("tensorflow") is None
    assert importlib.util.find_spec("tf2jax") is None


@pytest.mark.smoke
def test_ci_installs_the_nt_extra():
    """The neural-tangents cross-checks (tests/test_ntk.py) skip without the extra: CI must not."""
    if os.environ.get("CI"):
        assert NT_INSTALLED, "CI must install the nt extra (make install does, through .[dev])"


@pytest.mark.smoke
@pytest.mark.skipif(not NT_INSTALLED, reason="the nt extra is not installed")
def test_neural_tangents_imports_without_tensorflow_and_computes_a_kernel():
    nt = compat.import_neural_tangents()
    with pytest.raises(ImportError, match="TensorFlow"):
        nt.experimental.convert_tf_model  # noqa: B018 - the TF-only part says why it is absent
    w = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)
    f = lambda p, x: jnp.tanh(x @ p)  # noqa: E731
    k = np.asarray(nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0)(x, None, w))
    with compat.enable_x64():  # K[i, j, o, q] = J[i, o] . J[j, q], J from jacrev in float64
        j = jax.jacrev(lambda p: jnp.tanh(jnp.asarray(x, jnp.float64) @ p))(
            jnp.asarray(w, jnp.float64)).reshape(4, 3, -1)
        expected = np.asarray(jnp.einsum("iop,jqp->ijoq", j, j))
    np.testing.assert_allclose(k, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
