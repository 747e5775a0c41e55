"""Does APGD's step-size schedule find more than fixed-step PGD on the models of a real run?

    python benchmarks/apgd.py RUN_DIR [--seed 0] [--models AC@5,CA@0,...] [--iters 100]

Rebuilds each model of a finished experiment (``core.audit``: phase 2 again from its stored
checkpoint) and attacks it in L-inf with the run's eps: PGD with cross-entropy (step 2 eps /
iters) against APGD with cross-entropy, and the margin loss with 2 restarts under both
schedules, same keys. Prints one JSON object: per model each attack's robust accuracy, the
examples APGD breaks that PGD does not (and the reverse), the per-example worst case of each
schedule's pair and of all four, and seconds per attack; the goal ``apgd_time_ratio``: APGD
at most 1.25x PGD's time (one more gradient per attack and a larger loop state).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np

from core.attacks import AttackLoss, attack_config
from core.audit import ModelRef, rebuild
from core.config import config_from_dict
from core.evaluate import make_evaluator
from core.experiment import _apply, eval_keys, make_context

DEFAULT_MODELS = "C-@30,A-@30,CC@0,CC@30,AC@5,AC@30,CA@0,CA@5,CA@30,AA@1,AA@30"
TIME_TARGET = 1.25


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--iters", type=int, default=100)
    args = parser.parse_args()
    # the run directory's results.json, read directly
    results = json.loads((args.run_dir / "results.json").read_text())
    cfg = config_from_dict(results["config"])
    ctx = make_context(cfg, args.run_dir)
    base = dataclasses.replace(attack_config(cfg.eval.linf, keep_best=True), iters=args.iters,
                               step_size=2 * cfg.eval.linf.eps / args.iters)
    attacks = {
        "pgd_ce": base,
        "apgd_ce": dataclasses.replace(base, schedule="apgd"),
        "pgd_margin": dataclasses.replace(base, loss=AttackLoss.MARGIN, restarts=2),
        "apgd_margin": dataclasses.replace(base, loss=AttackLoss.MARGIN, restarts=2,
                                           schedule="apgd"),
    }
    key, _ = eval_keys(args.seed)
    evaluators: dict[tuple[str, str], object] = {}
    rows, times = [], {name: [] for name in attacks}
    for text in args.models.split(","):
        ref = ModelRef.parse(text)
        model = rebuild(ctx, ref, args.seed)
        phase = "phase1" if model.anchor is None else "phase2"
        correct = {}
        for name, attack in attacks.items():
            ev = evaluators.setdefault((phase, name), make_evaluator(_apply(ctx, phase),
                                                                     {name: attack}))
            ev(model.anchor, model.state.params, model.state.batch_stats, ctx.x_test[:8],
               ctx.y_test[:8], key, cfg.eval.batch_size)  # compile outside the timing
            t0 = time.perf_counter()
            out = ev(model.anchor, model.state.params, model.state.batch_stats, ctx.x_test,
                     ctx.y_test, key, cfg.eval.batch_size)
            times[name].append(time.perf_counter() - t0)
            correct[name] = out[f"robust_{name}"]
        pct = {k: round(100 * float(np.mean(v)), 1) for k, v in correct.items()}
        only = {f"broken_by_{a}_not_{b}": int(np.sum(correct[b] & ~correct[a]))
                for a, b in (("apgd_ce", "pgd_ce"), ("pgd_ce", "apgd_ce"),
                             ("apgd_margin", "pgd_margin"), ("pgd_margin", "apgd_margin"))}
        rows.append({"model": str(ref), **pct, **only,
                     "worst_pgd": round(100 * float(np.mean(correct["pgd_ce"]
                                                            & correct["pgd_margin"])), 1),
                     "worst_apgd": round(100 * float(np.mean(correct["apgd_ce"]
                                                             & correct["apgd_margin"])), 1),
                     "worst_all": round(100 * float(np.mean(np.logical_and.reduce(
                         list(correct.values())))), 1)})
        print(json.dumps(rows[-1]), flush=True)
    seconds = {k: round(float(np.median(v)), 3) for k, v in times.items()}
    ratio = round(max(seconds["apgd_ce"] / seconds["pgd_ce"],
                      seconds["apgd_margin"] / seconds["pgd_margin"]), 2)
    print(json.dumps({
        "machine": platform.processor() or platform.machine(), "jax": jax.__version__,
        "run": str(args.run_dir), "seed": args.seed, "iters": args.iters,
        "eps": cfg.eval.linf.eps, "test_images": len(ctx.y_test), "rows": rows,
        "median_seconds": seconds,
        "goals": [{"name": "apgd_time_ratio", "value": ratio, "target": TIME_TARGET,
                   "met": ratio <= TIME_TARGET}],
    }, indent=1))


if __name__ == "__main__":
    main()
