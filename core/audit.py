"""Rebuild one evaluated model of a finished run and attack it again (``ntk-sweep attack``).

Phase-2 parameters are not stored: phase 2 is deterministic given the switch-point checkpoint
(its key is derived from the seed, the data mode and the switch step), so a model is rebuilt
by running it again from the stored checkpoint. The rebuilt model is checked against the run:
under the run's own evaluation settings its clean accuracy, and every attack's, must equal
the recorded row's (an audit that does not reproduce the row says so instead of reporting
numbers for another model). Then any evaluation can be tried on it: stronger or longer
attacks (``eval.*`` settings), and transfer from any other model of the same seed
(``source``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from core.config import RESULT_METRICS, WORST_LINF, ExperimentConfig, is_network
from core.dynamics import Anchor
from core.evaluate import accuracies, worst_case
from core.experiment import (
    _Context,
    _score,
    craft,
    epoch_to_step,
    eval_keys,
    evaluate_model,
    initial_params,
    reference_examples,
    run_phase2,
)
from core.results import result_metrics
from core.train import TrainState, init_state

SOURCE_KEY = 5
"""``fold_in(PRNGKey(seed), 5)``: the key of the ``source`` model's examples."""


class AuditError(ValueError):
    """The model cannot be rebuilt as asked (no such code, checkpoint or row); names why."""


@dataclass(frozen=True)
class ModelRef:
    """One evaluated model: loader code (``AC``, or ``A-`` for the network) and switch epoch."""

    code: str
    switch: float

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """``AC@10`` -> ModelRef("AC", 10.0); AuditError naming the expected form."""
        m = re.fullmatch(r"([CAF][CAF-])@(\d+(?:\.\d+)?)", text.strip())
        if not m:
            raise AuditError(f"{text[:40]!r}: a model is CODE@EPOCH, e.g. AC@10 or A-@30 (the "
                             "phase-1 network)")
        return cls(m.group(1), float(m.group(2)))

    def __str__(self) -> str:
        return f"{self.code}@{self.switch:g}"


@dataclass
class Rebuilt:
    """A rebuilt model: its anchor (None for a network), its state, the switch-point state."""

    anchor: Anchor | None
    state: TrainState
    switch_state: TrainState


def rebuild(ctx: _Context, ref: ModelRef, seed: int) -> Rebuilt:
    """The switch-point checkpoint of ``ref`` (never trained here: AuditError if it is not
    stored) and, for a phase-2 code, phase 2 run again from it."""
    cfg = ctx.cfg
    if ref.code not in cfg.codes and not is_network(ref.code):
        raise AuditError(f"{ref}: the run's codes are {', '.join(cfg.codes)} (and X- networks)")
    mode = ref.code[0]
    trajectory = ctx.store.get(cfg, mode, seed)
    directory = trajectory.directory
    store = trajectory.checkpoints()
    step = epoch_to_step(ref.switch, len(ctx.y_train) // cfg.phase1.batch_size)
    if step not in store.steps():
        if step in store.older_steps():
            raise AuditError(
                f"{ref}, seed {seed}: the checkpoint at epoch {ref.switch:g} in {directory} was "
                f"written by an earlier version (directory {step}/), which this one does not "
                "read: run the experiment again with the same config and --out to remake its "
                "checkpoints (identical results), then audit")
        epochs = sorted(store.meta(s)["epoch"] for s in store.steps())
        raise AuditError(f"{ref}, seed {seed}: no checkpoint at epoch {ref.switch:g} in "
                         f"{directory} (stored: {epochs or 'none'})")
    template = init_state(*initial_params(ctx, seed), cfg.phase1.momentum,
                          jax.random.PRNGKey(0))
    try:
        state, _ = store.restore(step, template)
    finally:
        store.close()
    if is_network(ref.code):
        return Rebuilt(None, state, state)
    anchor = Anchor(state.params, state.batch_stats)
    final, _ = run_phase2(ctx, ref.code, seed, step, anchor)
    return Rebuilt(anchor, final, state)


def audit(ctx: _Context, ref: ModelRef, seed: int, source: ModelRef | None = None
          ) -> dict[str, Any]:
    """Rebuilds ``ref`` and evaluates it under ``ctx.cfg.eval`` (and, with ``source``, on
    adversarial examples crafted on that model of the same seed, ``source_linf``, counted in
    ``worst_linf``). Returns the result metrics, ``masked``, and ``correct`` (bool [n] per
    attack)."""
    cfg: ExperimentConfig = ctx.cfg
    model = rebuild(ctx, ref, seed)
    eval_key, ref_key = eval_keys(seed)
    x_ref = None if cfg.eval.reference is None else reference_examples(
        ctx, seed, initial_params(ctx, seed), ref_key)
    correct = evaluate_model(ctx, eval_key, model.switch_state, model.anchor, model.state,
                             x_ref)
    metrics = result_metrics(correct, cfg.eval.masking_threshold)
    if source is not None:
        src = rebuild(ctx, source, seed)
        x_src = craft(ctx, src.anchor, src.state,
                      jax.random.fold_in(jax.random.PRNGKey(seed), SOURCE_KEY))
        target_phase = "phase1" if model.anchor is None else "phase2"
        correct["source_linf"] = _score(ctx, target_phase, model.anchor, model.state, x_src)
        worst = worst_case(correct, (*WORST_LINF, "source_linf"))
        metrics.update(source_linf=accuracies(correct)["source_linf"],
                       worst_linf=float(np.mean(worst)))
    return {**metrics, "correct": correct}


def recorded_row(rows: list[dict[str, Any]], ref: ModelRef, seed: int) -> dict[str, Any]:
    """The run's row of ``ref`` and ``seed`` (a listed switch point); AuditError if none."""
    for r in rows:
        if (r["code"], float(r["switch_epoch"]), int(r["seed"]), r.get("switch_rule", "")) == \
                (ref.code, ref.switch, seed, ""):
            return r
    have = sorted({float(r["switch_epoch"]) for r in rows if r["code"] == ref.code})
    seeds = sorted({int(r["seed"]) for r in rows})
    raise AuditError(f"{ref}, seed {seed}: not a row of the run (switch epochs of "
                     f"{ref.code}: {have or 'none'}; seeds {seeds})")


def differences(recorded: dict[str, Any], audited: dict[str, Any]) -> dict[str, tuple]:
    """{metric: (recorded, audited)} where they differ (NaN equals NaN)."""
    out = {}
    for k in RESULT_METRICS:
        a, b = float(recorded.get(k, math.nan)), float(audited.get(k, math.nan))
        if not (a == b or (math.isnan(a) and math.isnan(b))):
            out[k] = (a, b)
    return out
