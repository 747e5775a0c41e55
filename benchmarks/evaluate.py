"""What the evaluation ensemble costs per evaluated model: the digits CNN of the shipped configs
on the 360 digits test images, L-inf eps 0.2, with PGD alone (cross-entropy, plus L2: the
ensemble before issue 12) against the full ensemble (plus PGD with the margin loss and 2
restarts, plus the transfer attack from the switch-point network).

    python benchmarks/evaluate.py [--quick]

Prints one JSON object: per iteration count (20: quickstart; 100: digits-switch-point) the
median seconds per model of each, their ratio, and the goal ``ensemble_cost_ratio``: the full
ensemble at most 4x PGD alone (it runs five PGD passes, L-inf, L2, the margin attack twice and
the transfer attack on the network, where PGD alone runs two: about 2.5x).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform

import jax
from attack import median_seconds  # benchmarks/attack.py, beside this script

from core.attacks import AttackConfig, AttackLoss, Norm
from core.data import load_digits
from core.dynamics import Anchor, make_apply_fn
from core.evaluate import make_evaluator, make_transfer_evaluator
from core.models import init_model, make_model

RATIO_TARGET = 4.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 iterations only, 1 repeat")
    args = parser.parse_args()
    data = load_digits()
    model = make_model("cnn", data.num_classes, width=16)
    params, bs = init_model(model, jax.random.PRNGKey(0), data.x_train.shape[1:])
    net = make_apply_fn(model, "standard", "frozen")
    centered = make_apply_fn(model, "centered", "frozen")
    anchor = Anchor(params, bs)
    moved = jax.tree.map(lambda p: p * 1.01, params)
    x, y, key = data.x_test, data.y_test, jax.random.PRNGKey(1)
    rows = []
    for iters in (20,) if args.quick else (20, 100):
        linf = AttackConfig(Norm.LINF, 0.2, 2 * 0.2 / iters, iters, keep_best=True)
        l2 = AttackConfig(Norm.L2, 1.0, 0.1, iters, keep_best=True)
        margin = dataclasses.replace(linf, loss=AttackLoss.MARGIN, restarts=2)
        pgd_only = make_evaluator(centered, {"linf": linf, "l2": l2})
        ensemble = make_evaluator(centered, {"linf": linf, "l2": l2, "margin": margin})
        transfer = make_transfer_evaluator(net, centered, dataclasses.replace(
            linf, keep_best=False))

        def before(ev=pgd_only):
            ev(anchor, moved, bs, x, y, key, 500)

        def after(ev=ensemble, tr=transfer):
            ev(anchor, moved, bs, x, y, key, 500)
            tr((None, params, bs), (anchor, moved, bs), x, y, key, 500)

        repeats = 1 if args.quick else 3
        a, b = median_seconds(before, repeats), median_seconds(after, repeats)
        rows.append({"iters": iters, "pgd_only_s": round(a, 3), "ensemble_s": round(b, 3),
                     "ratio": round(b / a, 2)})
    worst = max(r["ratio"] for r in rows)
    print(json.dumps({
        "machine": platform.processor() or platform.machine(), "jax": jax.__version__,
        "devices": str(jax.devices()), "test_images": len(y), "rows": rows,
        "goals": [{"name": "ensemble_cost_ratio", "value": worst, "target": RATIO_TARGET,
                   "met": worst <= RATIO_TARGET}],
    }, indent=1))


if __name__ == "__main__":
    main()
