"""Fused PGD (one jitted program, ``lax.fori_loop``) against the reference code's structure
(a Python loop calling a jitted single PGD step), same model, batch, key and iterations.

    python benchmarks/attack.py [--quick]

The two are timed in pairs, one call of each in turn (the order alternating), so a change of
load on the machine slows both: the speedup of a pair is loop / fused seconds, and the figure
is the median over the pairs with a 95 % bootstrap interval (``ratio_ci95``), narrow enough
with the default repeats to tell 0.95 from 1.05 (``decided``: the interval excludes 1).

Prints one JSON object: per model, batch size and iteration count the median seconds of each,
the median speedup and its interval, and the goals: ``attack_fused_not_slower`` (on every
row the fused attack at least as fast as the loop: smallest median speedup >= 1.0), and on an
accelerator ``attack_speedup_mlp`` (fused at least 1.5x faster on the MLP at the training batch
size, 128; the GPU check, ``benchmarks/gpu.py``, measures it). Fusing removes the
per-iteration dispatch (tens of microseconds); it pays most where one iteration's compute is
small (a GPU, or small batches), which the batch-16 rows show.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from core.attacks import AttackConfig, Norm, attack_loss, pgd, project, random_start
from core.data import load_digits
from core.models import init_model, make_model

MODELS = {"mlp": dict(widths=(256, 256)), "cnn": dict(width=32)}
SPEEDUP_TARGET = 1.5


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_speedup(fast, slow, repeats: int, seed: int = 0) -> dict:
    """Seconds of ``fast()`` and ``slow()`` timed in ``repeats`` interleaved pairs (order
    alternating, one warm-up call each), and the pairs' speedup slow / fast: median, 95 %
    bootstrap interval of the median (2,000 resamples, ``seed``), and whether the interval
    excludes 1."""
    fast(), slow()
    t_fast, t_slow = [], []
    for r in range(repeats):
        for fn, times in ((fast, t_fast), (slow, t_slow))[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    ratios = np.array(t_slow) / np.array(t_fast)
    draws = np.random.default_rng(seed).choice(ratios, (2000, ratios.size))
    low, high = np.quantile(np.median(draws, axis=1), [0.025, 0.975])
    return {"fast_s": statistics.median(t_fast), "slow_s": statistics.median(t_slow),
            "speedup": float(np.median(ratios)), "ratio_ci95": [float(low), float(high)],
            "decided": bool(low > 1 or high < 1), "pairs": repeats}


def _reference_loop(f, cfg: AttackConfig):
    """The reference structure: one jitted PGD step, iterated from Python."""

    @jax.jit
    def step(x_adv, x, y):
        g = jax.grad(lambda xa: attack_loss(f(xa), y, cfg.loss).sum())(x_adv)
        stepped = x_adv + cfg.step_size * jnp.sign(g)
        return jnp.clip(x + project(stepped - x, Norm.LINF, cfg.eps), 0.0, 1.0)

    @jax.jit
    def start(x, key):
        return jnp.clip(x + random_start(key, x, Norm.LINF, cfg.eps), 0.0, 1.0)

    def run(x, y, key):
        x_adv = start(x, key)
        for _ in range(cfg.iters):
            x_adv = step(x_adv, x, y)
        return x_adv

    return run


def bench_model(name: str, iters: int, batch: int, repeats: int) -> dict:
    data = load_digits()
    model = make_model(name, 10, **MODELS[name])
    params, _ = init_model(model, jax.random.PRNGKey(0), data.x_train.shape[1:])
    f = lambda x: model.apply({"params": params}, x)  # noqa: E731
    x, y = jnp.asarray(data.x_train[:batch]), jnp.asarray(data.y_train[:batch])
    cfg = AttackConfig.reference("linf", iters=iters, eps=0.1)
    key = jax.random.PRNGKey(1)
    fused = jax.jit(lambda x, y, k: pgd(f, x, y, k, cfg))
    loop = _reference_loop(f, cfg)
    # Both compute the same attack: check before timing.
    same = bool(jnp.allclose(fused(x, y, key), loop(x, y, key), atol=1e-6))
    timed = paired_speedup(lambda: fused(x, y, key).block_until_ready(),
                           lambda: loop(x, y, key).block_until_ready(), repeats)
    return {"model": name, "iters": iters, "batch": batch, "fused_s": timed.pop("fast_s"),
            "loop_s": timed.pop("slow_s"), **timed, "same_result": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs (about a minute)")
    args = parser.parse_args()
    repeats = 15 if args.quick else 41
    results = [bench_model(m, it, b, repeats) for m in MODELS for b in (16, 128)
               for it in (20, 100)]
    slowest = min(r["speedup"] for r in results)
    goals = [{"name": "attack_fused_not_slower", "value": round(slowest, 3), "target": 1.0,
              "met": slowest >= 1.0}]
    if jax.default_backend() != "cpu":
        mlp = min(r["speedup"] for r in results if r["model"] == "mlp" and r["batch"] == 128)
        goals.append({"name": "attack_speedup_mlp", "value": round(mlp, 3),
                      "target": SPEEDUP_TARGET, "met": mlp >= SPEEDUP_TARGET})
    print(json.dumps({
        "benchmark": "attack",
        "device": str(jax.devices()[0]), "backend": jax.default_backend(),
        "machine": platform.machine(), "cpus": jax.device_count(),
        "results": results, "goals": goals,
    }, indent=1))


if __name__ == "__main__":
    main()
