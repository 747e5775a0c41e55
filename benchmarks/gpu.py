"""The GPU check: core/ on one accelerator, within a time budget, one JSON object out.

    python benchmarks/gpu.py [--budget-s 420] [--out gpu.json]     # on a GPU machine
    python benchmarks/gpu.py --quick                                # tiny sizes, any machine

It needs only what ``core/`` needs (jax with CUDA, flax, optax, orbax-checkpoint, numpy,
scikit-learn, pyyaml, pydantic; neural-tangents for its columns), not Ray or MLflow, so it runs
on a GPU machine without network once the small wheels ``benchmarks/gpu.sh --download``
fetched are installed (``make bench-gpu`` does both steps there). Sections, each skipped with
the reason when the budget would run out:

1. ``matmul``: the plain [M, M] x [M, M] float32 product at each matrix-product precision
   (float32, TF32, bf16 inputs with float32 accumulation, and jax's default), TFLOP/s and the
   relative error against float64: the ceiling the NTK contraction is compared with, and which
   precision jax uses by default on this GPU.
2. ``ntk_precision``: the CNN's class-wise kernel at each ``NtkEngine`` precision against the
   engine's float64 kernel (max |K - K64| / max |K64|).
3. ``attack``: fused PGD (one jitted program) against a Python loop of jitted steps
   (``benchmarks/attack.py``), MLP and CNN, batch 128, 20 and 100 iterations.
4. ``training``: ResNet-18 (width 64) training steps on CIFAR-shaped synthetic data, batch
   128, images/s: phase 1 clean and adversarial (PGD-10), phase 2 centered and linearized,
   clean and adversarial.
5. ``ntk``: all ten class-wise kernels [10, N, N] of a CNN and ResNet-18 on CIFAR-shaped
   inputs for N up to 2,000, with the engine (float32 and TF32) and, where they fit,
   neural-tangents' two implementations (the full [N, N, 10, 10] kernel in one call). Achieved
   TFLOP/s count the contraction 2 O N^2 P; the share is of the same-precision matmul.
   The largest rows come last: they are the ones the budget cuts.
6. ``estimate``: what ``ntk-sweep validate --estimate`` predicts for the ``digits-demo``
   experiment on this GPU (``core/estimate.py``: the run's own programs timed once) against
   the experiment's wall time, in this process after the prediction (the programs then come
   from the process's cache, so the run's wall time is mostly compute).
7. ``warm_process``: the same experiment (``--quick``'s variant) in two fresh processes that
   share a persistent compilation cache (``benchmarks/compile_probe.py``): the second calls
   the evaluation programs the first exported (``core/exported.py``) and must compute the
   same rows bit for bit; its compilation share is what a reused cache leaves on this GPU.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from core import determinism  # noqa: E402
from core.attacks import AttackConfig  # noqa: E402
from core.data import load_synthetic  # noqa: E402
from core.dynamics import Anchor, make_apply_fn  # noqa: E402
from core.models import init_model, make_model  # noqa: E402
from core.ntk import NtkEngine  # noqa: E402
from core.train import init_state, make_step  # noqa: E402

PRECISIONS = {"float32": "highest", "tensorfloat32": "tensorfloat32",
              "bfloat16": "BF16_BF16_F32", "jax_default": None}
SECTIONS = ("matmul", "ntk_precision", "attack", "training", "ntk", "estimate", "warm_process")
ATTACK_SPEEDUP_TARGET = 1.5  # benchmarks/attack.py's goal, a GPU goal
FLOAT32_KERNEL_TOLERANCE = 1e-5  # relative to max |K|: float32 rounding, not TF32's ~1e-3


class Budget:
    """Wall-clock budget of the whole check: sections ask before they start."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


def log(msg: str) -> None:
    print(f"[gpu check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def timed(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, float]:
    """(seconds of the first call (compile + run), median seconds of ``repeats`` later calls)."""
    t0 = time.perf_counter()
    _block(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                 "neural-tangents"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_memory() -> int | None:
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    return None if not stats else int(stats.get("bytes_limit", 0)) or None


# --- 1. matmul ----------------------------------------------------------------------------------


def matmul(size: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    a_host = rng.standard_normal((size, size)).astype(np.float32)
    b_host = rng.standard_normal((size, size)).astype(np.float32)
    check = 512  # error measured on a corner, against float64 on the host
    exact = a_host[:check].astype(np.float64) @ b_host[:, :check].astype(np.float64)
    a, b = jnp.asarray(a_host), jnp.asarray(b_host)
    rows = {}
    for name, precision in PRECISIONS.items():
        f = jax.jit(lambda a, b, p=precision: jnp.matmul(a, b, precision=p))
        _, seconds = timed(lambda f=f: f(a, b), repeats=5)
        out = np.asarray(f(a, b))[:check, :check]
        rows[name] = {"tflops": 2 * size**3 / seconds / 1e12,
                      "rel_error": float(np.abs(out - exact).max() / np.abs(exact).max())}
    default = rows["jax_default"]["rel_error"]
    closest = min(("float32", "tensorfloat32", "bfloat16"),
                  key=lambda k: abs(np.log(rows[k]["rel_error"] + 1e-30) - np.log(default + 1e-30)))
    return {"size": size, "precisions": rows, "jax_default_behaves_like": closest}


# --- 2. and 3. the NTK --------------------------------------------------------------------------


def _ntk_setup(name: str, n: int, width: int):
    data = load_synthetic(0, n_train=n, n_test=10, shape=(32, 32, 3), num_classes=10)
    model = make_model(name, 10, width=width)
    params, bs = init_model(model, jax.random.PRNGKey(0), (32, 32, 3))
    params = jax.tree.map(lambda p: p + 0.01, params)  # away from zero-initialised logits
    apply = make_apply_fn(model, "standard", "frozen")
    return model, apply, params, bs, np.asarray(data.x_train[:n])


def _n_params(params: Any) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def ntk_precision(n: int, width: int) -> dict[str, Any]:
    model, apply, params, bs, x = _ntk_setup("cnn", n, width)
    k64 = NtkEngine(apply, "classwise", model=model, dtype="float64")(None, params, bs, x)
    scale = np.abs(k64).max()
    out = {"model": f"cnn width {width}", "n": n, "params": _n_params(params)}
    for precision in ("float32", "tensorfloat32", "bfloat16"):
        k = NtkEngine(apply, "classwise", model=model, precision=precision)(None, params, bs, x)
        out[precision] = float(np.abs(k - k64).max() / scale)
    return out


def _nt_full(apply, params, bs, x, implementation: str) -> float:
    from core.compat import import_neural_tangents

    nt = import_neural_tangents()
    impl = getattr(nt.NtkImplementation, implementation.upper())
    f = lambda p, x: apply(None, p, bs, x, False)[0]  # noqa: E731
    with jax.default_matmul_precision("highest"):
        fn = jax.jit(nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation=impl))
        return timed(lambda: fn(x, None, params), repeats=1)[1]


def ntk_rows(name: str, width: int, sizes: list[int], block: int, budget: Budget,
             matmul_tflops: dict[str, float], nt_at: int | None) -> list[dict[str, Any]]:
    """Rows for one model: the engine at every N (one compiled program per precision, reused
    across N by a fixed block size), neural-tangents at N = ``nt_at``."""
    model, apply, params, bs, x_all = _ntk_setup(name, max(sizes), width)
    p = _n_params(params)
    memory = device_memory()
    rows = []
    # The engine's default budget: a share of the device's free memory (machine_memory_budget).
    engines = {prec: NtkEngine(apply, "classwise", model=model, block_size=block, precision=prec)
               for prec in ("float32", "tensorfloat32")}
    for n in sizes:
        x = x_all[:n]
        row: dict[str, Any] = {"model": f"{name} width {width}", "params": p, "n": n}
        flops = 2 * 10 * n * n * p
        for prec, engine in engines.items():
            # Estimate from the last row (cost grows as N^2) before starting a large one.
            if rows and f"engine_{prec}_s" in rows[-1]:
                estimate = rows[-1][f"engine_{prec}_s"] * (n / rows[-1]["n"]) ** 2 * 2 + 10
                if not budget.allows(estimate + 30):
                    row[f"engine_{prec}"] = f"skipped: about {estimate:.0f} s, budget left " \
                                            f"{budget.left():.0f} s"
                    continue
            first, seconds = timed(lambda e=engine, x=x: e(None, params, bs, x), repeats=1)
            row[f"engine_{prec}_s"] = seconds
            row[f"engine_{prec}_first_call_s"] = first
            row[f"engine_{prec}_tflops"] = flops / seconds / 1e12
            row[f"engine_{prec}_share_of_matmul"] = flops / seconds / 1e12 / matmul_tflops[prec]
            row["plan"] = {**engine.last_plan, "memory_budget": engine.memory_budget}
        if n == nt_at:
            jac_bytes = n * 10 * p * 4
            for impl in ("jacobian_contraction", "ntk_vector_products"):
                if memory and jac_bytes > memory * 0.3:
                    row[f"nt_{impl}"] = f"skipped: J is {jac_bytes / 2**30:.1f} GiB"
                    continue
                if not budget.allows(90):
                    row[f"nt_{impl}"] = "skipped: time budget"
                    continue
                try:
                    row[f"nt_{impl}_s"] = _nt_full(apply, params, bs, x, impl)
                except ImportError as e:
                    row[f"nt_{impl}"] = f"not run: {e}"
                except jax.errors.JaxRuntimeError as e:  # XLA refuses what does not fit
                    if "memory" not in str(e).lower():
                        raise
                    row[f"nt_{impl}"] = "out of memory"
            nt_times = [v for k, v in row.items() if k.startswith("nt_") and k.endswith("_s")]
            if nt_times and "engine_float32_s" in row:
                row["engine_float32_vs_best_nt"] = min(nt_times) / row["engine_float32_s"]
        rows.append(row)
        log(json.dumps(row))
    return rows


# --- 4. attacks ---------------------------------------------------------------------------------


def attacks(quick: bool) -> list[dict[str, Any]]:
    from benchmarks.attack import bench_model

    repeats = 3 if quick else 10
    return [bench_model(m, it, 128, repeats) for m in ("mlp", "cnn") for it in (20, 100)]


# --- 5. training --------------------------------------------------------------------------------


def training(width: int, batch: int, steps: int, pgd_iters: int) -> list[dict[str, Any]]:
    data = load_synthetic(0, n_train=batch * 4, n_test=10, shape=(32, 32, 3), num_classes=10)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    model = make_model("resnet18", 10, width=width)
    params, bs = init_model(model, jax.random.PRNGKey(0), (32, 32, 3))
    anchor = Anchor(params, bs)
    attack = AttackConfig.reference("linf", iters=pgd_iters)
    cases = [("phase1 C (standard)", "standard", "update", None, None),
             (f"phase1 A (standard, PGD-{pgd_iters})", "standard", "update", attack, None),
             ("phase2 C (centered)", "centered", "frozen", None, anchor),
             (f"phase2 A (centered, PGD-{pgd_iters})", "centered", "frozen", attack, anchor),
             ("phase2 C (linearized)", "linearized", "frozen", None, anchor)]
    rows = []
    for label, dynamics, bn, atk, anc in cases:
        step = make_step(make_apply_fn(model, dynamics, bn), momentum=0.9, lr=0.01, attack=atk)
        state = init_state(params, bs, 0.9, jax.random.PRNGKey(1))
        idx = [jnp.arange(i * batch, (i + 1) * batch, dtype=jnp.int32) for i in range(4)]
        t0 = time.perf_counter()
        state, m = step(state, anc, x, y, idx[0])
        _block(m)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(steps):
            state, m = step(state, anc, x, y, idx[i % 4])
        _block((state.params, m))
        seconds = time.perf_counter() - t0
        rows.append({"case": label, "model": f"resnet18 width {width}", "batch": batch,
                     "steps": steps, "compile_and_first_step_s": first,
                     "images_per_s": steps * batch / seconds,
                     "final_loss_finite": bool(np.isfinite(float(m["loss"])))})
        log(json.dumps(rows[-1]))
    return rows


# --- main ---------------------------------------------------------------------------------------


def estimate_check(quick: bool) -> dict[str, Any]:
    """``validate --estimate`` for digits-demo (``quick``: 2 phase-1 epochs, switch points 0
    and 2, 1 phase-2 epoch) against its real wall time here."""
    import tempfile

    from core.config import config_from_dict, read_config_file
    from core.estimate import for_experiment
    from core.experiment import run_experiment
    from search_spaces import resolve

    overrides = ["phase1.epochs=2", "switch_points=[0,2]", "phase2.epochs=1"] if quick else []
    cfg = config_from_dict(read_config_file(resolve("digits-demo"), overrides))
    predicted = for_experiment(cfg)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_experiment(cfg, out)
        wall = time.perf_counter() - start
    compute = sum(predicted.seconds.values())
    return {"experiment": "digits-demo", "predicted_compute_s": round(compute, 2),
            "predicted_compile_s": round(predicted.compile_s, 2), "wall_s": round(wall, 2),
            "ratio": round(wall / compute, 3),
            "by_work_s": {k: round(v, 3) for k, v in predicted.seconds.items() if v}}


def warm_process() -> dict[str, Any]:
    """Two fresh processes, one compilation cache: same rows, and the second's compile share."""
    import tempfile

    from compile_probe import compile_share

    with tempfile.TemporaryDirectory() as tmp:
        return compile_share(Path(tmp), quick=True, timeout_s=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: checks that the script runs (any machine, ~1 min)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="wall-clock budget; sections that would not fit are skipped")
    parser.add_argument("--out", help="also write the JSON object to this file")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--ntk-models", help="NTK rows for these models only, e.g. resnet18:64")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        parser.error(f"--sections: unknown {sorted(sections - set(SECTIONS))}")
    q = args.quick
    budget = Budget(args.budget_s)
    result: dict[str, Any] = {
        "benchmark": "gpu", "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
        "device_memory_bytes": device_memory(), "versions": versions(), "quick": q,
        "deterministic_ops": determinism.state(),  # core/determinism.py
    }
    log(f"{result['device']} x{result['devices']}, jax {result['versions']['jax']}")

    result["matmul"] = matmul(256 if q else 8192)
    log(json.dumps(result["matmul"]))
    ceiling = {k: v["tflops"] for k, v in result["matmul"]["precisions"].items()}

    if "ntk_precision" in sections:
        result["ntk_precision"] = ntk_precision(16 if q else 256, 8 if q else 32)
        log(json.dumps(result["ntk_precision"]))

    def section(name: str, run: Callable[[], Any]) -> None:
        """``result[name]``: ``run()`` if asked for and a minute of the budget is left."""
        if name not in sections:
            result[name] = "not asked for"
        elif budget.allows(60 if not q else 0):
            result[name] = run()
            log(json.dumps(result[name]))
        else:
            result[name] = "skipped: time budget"

    section("attack", lambda: attacks(q))
    section("training", lambda: training(8 if q else 64, 16 if q else 128, 2 if q else 10,
                                         2 if q else 10))

    result["ntk"] = []
    plans = ([("cnn", 8, [16, 32], 8, 16), ("resnet18", 4, [16], 8, 16)] if q else
             [("cnn", 32, [500, 1000, 2000], 100, 500),
              ("resnet18", 16, [500, 1000, 2000], 50, 500),
              ("resnet18", 64, [250, 500, 1000], 25, None)])
    if args.ntk_models:
        plans = [p for p in plans if f"{p[0]}:{p[1]}" in args.ntk_models.split(",")]
    if "ntk" not in sections:
        plans = []
    for name, width, sizes, block, nt_at in plans:
        if not budget.allows(120 if not q else 0):
            result["ntk"].append({"model": f"{name} width {width}", "skipped": "time budget"})
            continue
        result["ntk"] += ntk_rows(name, width, sizes, block, budget, ceiling, nt_at)

    section("estimate", lambda: estimate_check(q))
    section("warm_process", warm_process)

    result["wall_s"] = time.perf_counter() - budget.start
    result["goals"] = goals(result)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    if "ntk_precision" in result:
        err = result["ntk_precision"]["float32"]
        out.append({"name": "ntk_float32_matches_float64", "value": err,
                    "target": FLOAT32_KERNEL_TOLERANCE, "met": err <= FLOAT32_KERNEL_TOLERANCE})
    ratios = [r["engine_float32_vs_best_nt"] for r in result["ntk"]
              if "engine_float32_vs_best_nt" in r]
    if result["ntk"]:  # the section ran (not asked for: no goal)
        out.append({"name": "ntk_vs_best_nt_call", "value": min(ratios) if ratios else None,
                    "target": 1.0, "met": bool(ratios) and min(ratios) >= 1.0})
    if isinstance(result["attack"], list):
        mlp = min(r["speedup"] for r in result["attack"] if r["model"] == "mlp")
        out.append({"name": "attack_speedup_mlp", "value": mlp, "target": ATTACK_SPEEDUP_TARGET,
                    "met": mlp >= ATTACK_SPEEDUP_TARGET})
    if isinstance(result.get("estimate"), dict):
        ratio = result["estimate"]["ratio"]
        out.append({"name": "estimate_ratio_digits_experiment", "value": ratio,
                    "target": [0.5, 2], "met": 0.5 <= ratio <= 2})
    if isinstance(result.get("warm_process"), dict):
        same = result["warm_process"]["same_rows"]
        out.append({"name": "exported_programs_same_rows", "value": same, "target": True,
                    "met": same})
    if isinstance(result["training"], list):
        finite = all(r["final_loss_finite"] for r in result["training"])
        out.append({"name": "training_steps_finite", "value": finite, "target": True,
                    "met": finite})
    return out


if __name__ == "__main__":
    main()
