"""Empirical NTK speed and memory: the project's blocked engine against neural-tangents and the
reference code's approach.

    python benchmarks/ntk.py [--quick]

For each model and probe size N (digits images, 10 classes) it times, after a warm-up call:

* ``engine``: all ten class-wise kernels [10, N, N] with ``core.ntk.NtkEngine`` (blocked);
* ``nt_jacobian_contraction`` / ``nt_ntk_vector_products``: one neural-tangents call computing
  the full [N, N, 10, 10] kernel (which contains the class-wise ones), where it fits in memory;
* ``reference``: the reference code's approach, neural-tangents NTK_VECTOR_PRODUCTS wrapped in
  ``nt.batch(batch_size=4)``, a Python double loop over upper-triangle blocks of 100 inputs,
  one class at a time. It is slow, so it is timed on the first ``reference_classes`` classes and
  scaled to ten (every class costs the same).

GFLOP/s count the contraction a full class-wise kernel needs, 2 * O * N^2 * P, divided by the
time; a float32 matmul's GFLOP/s measured in the same run is the machine's ceiling (times are
the best of 3, the matmul's of 5). The engine's speed is measured with an 8 GiB budget (the
most the neural-tangents calls are allowed), and for the CNN at N = 500 also with the default
budget (``ntk_contraction_vs_matmul``: what a run gets); peak
memory is measured separately, with a 256 MiB budget, as the resident-set growth of a fresh
process while it computes the CNN kernel of N = 500 (sampled every 2 ms).
Prints one JSON object with a ``goals`` list.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from core.compat import import_neural_tangents  # noqa: E402
from core.data import load_digits, load_synthetic  # noqa: E402
from core.dynamics import make_apply_fn  # noqa: E402
from core.models import init_model, make_model  # noqa: E402
from core.ntk import NtkEngine, jacobian_bytes_per_input  # noqa: E402

MODELS = {
    "mlp": dict(widths=(256, 256)),
    "cnn": dict(width=32),
    "resnet18": dict(width=16),
}
REFERENCE_BLOCK = 100
NT_MEMORY_LIMIT = 8 * 2**30  # skip single neural-tangents calls whose Jacobians exceed this


def _setup(name: str, n: int):
    if name == "resnet18":
        data = load_synthetic(0, n_train=max(n, 64), shape=(32, 32, 3), num_classes=10)
    else:
        data = load_digits()
    model = make_model(name, 10, **MODELS[name])
    params, bs = init_model(model, jax.random.PRNGKey(0), data.x_train.shape[1:])
    params = jax.tree.map(lambda p: p + 0.01, params)  # away from zero-initialised logits
    apply = make_apply_fn(model, "standard", "frozen")
    return apply, params, bs, np.asarray(data.x_train[:n]), model


def _time(fn) -> float:
    fn()  # compile and warm up
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _best_time(fn, repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed calls after a warm-up: the machine's rate with the
    least interference (this host's timings vary by 20 % call to call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_gflops(size: int = 2048) -> float:
    a = jnp.ones((size, size), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    seconds = _best_time(lambda: f(a).block_until_ready(), repeats=5)
    return 2 * size**3 / seconds / 1e9


def _nt_full(apply, params, bs, x, implementation: str) -> float:
    nt = import_neural_tangents()
    impl = getattr(nt.NtkImplementation, implementation.upper())
    f = lambda p, x: apply(None, p, bs, x, False)[0]  # noqa: E731
    fn = jax.jit(nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation=impl))
    return _time(lambda: fn(x, None, params).block_until_ready())


def _reference(apply, params, bs, x, classes: int) -> float:
    """Seconds for ``classes`` class-wise kernels the way the reference computes them."""
    nt = import_neural_tangents()
    n = x.shape[0]
    blocks = [slice(i, min(i + REFERENCE_BLOCK, n)) for i in range(0, n, REFERENCE_BLOCK)]

    def one_class(c):
        f = lambda p, x: apply(None, p, bs, x, False)[0][:, c : c + 1]  # noqa: E731
        fn = nt.batch(nt.empirical_ntk_fn(f, vmap_axes=0,
                                          implementation=nt.NtkImplementation.NTK_VECTOR_PRODUCTS),
                      batch_size=4)
        k = np.zeros((n, n), np.float32)
        for i, bi in enumerate(blocks):
            for bj in blocks[i:]:
                k[bi, bj] = np.asarray(fn(x[bi], x[bj], params))
                k[bj, bi] = k[bi, bj].T
        return k

    one_class(0)  # compile
    t0 = time.perf_counter()
    for c in range(classes):
        one_class(c)
    return time.perf_counter() - t0


def bench(name: str, n: int, reference_classes: int, run_nt: bool,
          default_budget: bool = False) -> dict:
    apply, params, bs, x, model = _setup(name, n)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    flops = 2 * 10 * n * n * n_params
    # The same memory as the neural-tangents calls may use (they are skipped above it).
    engine = NtkEngine(apply, "classwise", model=model, memory_budget=NT_MEMORY_LIMIT)
    row = {"model": name, "n": n, "params": n_params, "nominal_gflop": flops / 1e9}
    row["engine_s"] = _best_time(lambda: engine(None, params, bs, x))
    row["engine_gflops"] = flops / row["engine_s"] / 1e9
    row["engine_plan"] = engine.last_plan
    if default_budget:  # what a run gets: the budget from the machine's free memory
        engine = NtkEngine(apply, "classwise", model=model)
        row["engine_default_budget_s"] = _best_time(lambda: engine(None, params, bs, x))
        row["engine_default_budget_gflops"] = flops / row["engine_default_budget_s"] / 1e9
        row["engine_default_budget_plan"] = {**engine.last_plan,
                                             "budget_bytes": engine.memory_budget}
    jac_bytes = n * jacobian_bytes_per_input(params, 10, 4)
    for impl in ("jacobian_contraction", "ntk_vector_products"):
        if run_nt and jac_bytes <= NT_MEMORY_LIMIT:
            try:
                row[f"nt_{impl}_s"] = _nt_full(apply, params, bs, x, impl)
            except jax.errors.JaxRuntimeError as e:  # XLA refuses what does not fit
                if "memory" not in str(e).lower():
                    raise
                row[f"nt_{impl}"] = f"out of memory: {str(e).splitlines()[0][:120]}"
    if reference_classes:
        seconds = _reference(apply, params, bs, x, reference_classes)
        row["reference_s"] = seconds * 10 / reference_classes
        row["reference_classes_timed"] = reference_classes
        row["speedup_vs_reference"] = row["reference_s"] / row["engine_s"]
    nt_times = [v for k, v in row.items() if k.startswith("nt_") and k.endswith("_s")]
    if nt_times:
        row["ratio_vs_best_nt"] = min(nt_times) / row["engine_s"]
    return row


MEMORY_CHILD = """
import os, sys, json, threading, time
sys.path.insert(0, os.getcwd())
from benchmarks.ntk import _setup
from core.ntk import NtkEngine

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

apply, params, bs, x, model = _setup("cnn", int(sys.argv[1]))
engine = NtkEngine(apply, "classwise", memory_budget=int(sys.argv[2]), model=model)
engine(None, params, bs, x)  # compile and warm up: the second call is measured
base, peak, done = rss(), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)

t = threading.Thread(target=sample)
t.start()
engine(None, params, bs, x)
done.set()
t.join()
print(json.dumps({"growth": max(peak[0] - base, 0), "plan": engine.last_plan}))
"""


def peak_memory(n: int, budget: int) -> dict:
    """Peak resident-set growth (sampled every 2 ms) of a warmed-up engine computing the CNN
    kernel in a fresh process: what one more kernel of a trajectory costs."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(n), str(budget)], cwd=root,
                          capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    kernel_bytes = 10 * n * n * 4  # the host result itself
    return {"n": n, "budget_bytes": budget, "rss_growth_bytes": out["growth"],
            "result_bytes": kernel_bytes, "plan": out["plan"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes (a few minutes)")
    args = parser.parse_args()
    sizes = [100, 500] if args.quick else [100, 200, 500]
    t0 = time.perf_counter()
    ceiling = matmul_gflops()
    rows = []
    for name in ("mlp", "cnn"):
        for n in sizes:
            ref_classes = 1 if (name == "cnn" and n == 500) or not args.quick else 0
            rows.append(bench(name, n, ref_classes, run_nt=True,
                              default_budget=(name, n) == ("cnn", 500)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    rows.append(bench("resnet18", 32 if args.quick else 64, 0, run_nt=not args.quick))
    memory = peak_memory(500, 256 * 2**20)
    cnn500 = next(r for r in rows if r["model"] == "cnn" and r["n"] == 500)
    best_nt = min((r["ratio_vs_best_nt"] for r in rows if "ratio_vs_best_nt" in r), default=None)
    contraction = cnn500["engine_default_budget_gflops"] / ceiling
    within = memory["rss_growth_bytes"] <= memory["budget_bytes"] + memory["result_bytes"]
    print(json.dumps({
        "benchmark": "ntk", "backend": jax.default_backend(), "devices": jax.device_count(),
        "matmul_gflops": ceiling, "rows": rows, "memory": memory,
        "wall_s": time.perf_counter() - t0,
        "goals": [
            {"name": "ntk_speedup_vs_reference_cnn_500",
             "value": round(cnn500["speedup_vs_reference"], 2), "target": 5.0,
             "met": cnn500["speedup_vs_reference"] >= 5.0},
            {"name": "ntk_vs_best_nt_call", "value": None if best_nt is None else round(best_nt, 3),
             "target": 1.0, "met": best_nt is not None and best_nt >= 1.0},
            {"name": "ntk_contraction_vs_matmul",
             "value": round(contraction, 3), "target": 0.5, "met": contraction >= 0.5},
            {"name": "ntk_peak_memory_within_budget",
             "value": memory["rss_growth_bytes"], "target": memory["budget_bytes"],
             "met": within},
        ],
    }, indent=1))


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
