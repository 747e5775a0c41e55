"""Fused PGD (one jitted program, ``lax.fori_loop``) against the reference code's structure
(a Python loop calling a jitted single PGD step), same model, batch, key and iterations.

    python benchmarks/attack.py [--quick]

Prints one JSON object: per model, batch size and iteration count the median seconds of each
and their ratio, and the goal ``attack_speedup_mlp``: fused at least 1.5x faster on the MLP at
the training batch size (128), the smallest ratio over 20 and 100 iterations. Fusing removes the
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
    t_fused = median_seconds(lambda: fused(x, y, key).block_until_ready(), repeats)
    t_loop = median_seconds(lambda: loop(x, y, key).block_until_ready(), repeats)
    return {"model": name, "iters": iters, "batch": batch, "fused_s": t_fused,
            "loop_s": t_loop, "speedup": t_loop / t_fused, "same_result": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about a minute)")
    args = parser.parse_args()
    repeats = 5 if args.quick else 20
    results = [bench_model(m, it, b, repeats) for m in MODELS for b in (16, 128)
               for it in (20, 100)]
    mlp = min(r["speedup"] for r in results if r["model"] == "mlp" and r["batch"] == 128)
    print(json.dumps({
        "benchmark": "attack",
        "device": str(jax.devices()[0]), "backend": jax.default_backend(),
        "machine": platform.machine(), "cpus": jax.device_count(),
        "results": results,
        "goals": [{"name": "attack_speedup_mlp", "value": round(mlp, 3),
                   "target": SPEEDUP_TARGET, "met": mlp >= SPEEDUP_TARGET}],
    }, indent=1))


if __name__ == "__main__":
    main()
