"""Shared fixtures: tiny data and a local Ray, so every test runs in seconds on 2 CPU cores
(plain helpers and constants: tests/helpers.py)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent jax compilation cache for the whole run, shared with the CLI subprocesses and Ray
# workers the tests start (they inherit the environment): the suite compiles the same tiny
# programs in many processes, and jax 0.10 compiles them about 1.5x slower than 0.5.3 did.
# Cached executables are the compiled programs themselves: results stay bit for bit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="ntk-sweep-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

from core.data import load_synthetic  # noqa: E402


@pytest.fixture(scope="session")
def synthetic():
    return load_synthetic(seed=0, n_train=64, n_test=32, shape=(8, 8, 1), num_classes=3)


@pytest.fixture
def ray_local():
    """A local Ray instance of 2 CPUs for the test, shut down after it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}})
    yield
    ray.shutdown()


def pytest_configure(config):
    """Property and fuzz tests draw the same examples every run (CI is reproducible) unless
    ``--hypothesis-seed=N`` asks for others."""
    from hypothesis import settings

    seeded = config.getoption("hypothesis_seed", default=None) is not None
    settings.register_profile("ntk-sweep", derandomize=not seeded, deadline=None)
    settings.load_profile("ntk-sweep")
