"""The paper's claims (``PAPER.md``), evaluated from a finished run's numbers.

Each claim gets a verdict, "holds", "does not hold", "reversed" or "not enough data", and the
numbers behind it. Comparisons are paired by seed: for two quantities a_s and b_s measured on
the same seeds, d_s = a_s - b_s, and the difference counts only beyond its **band**

    band = max(min_gap, 2 * std(d) / sqrt(n))        (std with ddof 1; min_gap alone if n = 1)

so a difference smaller than the seeds' spread (about two standard errors) is no difference.

1. Benign centered training on an adversarial kernel (AC) keeps robustness that grows with the
   switch epoch; on a benign kernel (CC) it stays near the standard network's. Holds when AC
   beats CC at the last switch epoch and AC at the last switch epoch beats AC at the first;
   reversed when CC beats AC there.
2. Adversarial training on a fixed adversarial kernel (AA) is at least as robust as full
   adversarial training of the network (A- at the last switch epoch): holds unless A- beats AA
   beyond the band. The same comparison for CA (the benign kernel) is reported as 2 (CA).
3. Adversarial training's kernel converges first. A trajectory's convergence epoch is the
   first stored epoch from which its distance to its own final kernel stays below a
   ``fraction`` of where it started: S(K_t, K_T) <= fraction * S(K_0, K_T) (relative, because
   the two modes travel different distances); holds when A's epoch is earlier than C's
   (paired by seed), reversed when later. 3 (distinct kernels): the two converge to different
   kernels, i.e. the mean distance between the final C and A kernels of one seed is at least
   ``ratio`` times the mean distance between the final kernels of two seeds of one mode.

Robustness is a fraction of the test set; ``metric`` is the headline (``worst_linf``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from core.kernel_store import KernelTrajectory
from core.kernels import distance, per_kernel, trajectory_pairs

Verdict = Literal["holds", "does not hold", "reversed", "not enough data"]
VERDICTS: tuple[Verdict, ...] = ("holds", "does not hold", "reversed", "not enough data")

MIN_GAP = 0.02
"""Smallest robust-accuracy difference (a fraction of the test set) that counts."""
CONVERGENCE_FRACTION = 0.1
"""A trajectory has converged once S(K_t, K_T) stays at most this fraction of S(K_0, K_T)."""
MIN_EPOCH_GAP = 1.0
"""Smallest difference of convergence epochs that counts."""
DISTINCT_RATIO = 2.0
"""Cross-mode over seed-to-seed distance of final kernels above which they are 'different'."""


@dataclass(frozen=True)
class Claim:
    """One claim's verdict, its evidence as sentences, and the numbers behind it."""

    key: str
    statement: str
    verdict: Verdict
    evidence: tuple[str, ...] = ()
    numbers: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Paired:
    """d_s = a_s - b_s over the seeds both have: mean, standard deviation, n, band."""

    mean: float
    std: float
    n: int
    band: float

    @property
    def sign(self) -> int:
        """+1 if a > b beyond the band, -1 if a < b beyond it, else 0."""
        return 0 if abs(self.mean) <= self.band else (1 if self.mean > 0 else -1)

    def text(self, unit: str = "points", scale: float = 100.0) -> str:
        spread = f"± {scale * self.std:.1f}" if self.n > 1 else "(one seed, no spread)"
        return (f"{scale * self.mean:+.1f} {spread} {unit} over {self.n} seed"
                f"{'s' if self.n != 1 else ''} (band {scale * self.band:.1f})")


def paired(a: Mapping[int, float], b: Mapping[int, float], min_gap: float) -> Paired | None:
    """The paired difference of a and b (by seed) over seeds with both finite, or None."""
    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    if not seeds:
        return None
    d = np.array([a[s] - b[s] for s in seeds], np.float64)
    std = float(d.std(ddof=1)) if len(d) > 1 else 0.0
    return Paired(float(d.mean()), std, len(d), max(min_gap, 2 * std / math.sqrt(len(d))))


def _by_seed(rows: Sequence[Mapping[str, Any]], code: str, switch: float,
             metric: str) -> dict[int, float]:
    return {int(r["seed"]): float(r[metric]) for r in rows
            if r["code"] == code and not r.get("switch_rule") and r["switch_epoch"] == switch}


def _mean_std(values: Mapping[int, float]) -> str:
    v = np.array([x for x in values.values() if math.isfinite(x)], np.float64)
    if not len(v):
        return "-"
    return f"{100 * v.mean():.1f} ± {100 * v.std():.1f} %" if len(v) > 1 else f"{100 * v[0]:.1f} %"


def _switch_epochs(rows: Sequence[Mapping[str, Any]], code: str) -> list[float]:
    return sorted({float(r["switch_epoch"]) for r in rows
                   if r["code"] == code and not r.get("switch_rule")})


def claim_1(rows: Sequence[Mapping[str, Any]], metric: str, min_gap: float = MIN_GAP) -> Claim:
    statement = ("benign centered training on an adversarial kernel (AC) keeps robustness "
                 "that grows with the switch epoch; on a benign kernel (CC) it does not")
    common = sorted(set(_switch_epochs(rows, "AC")) & set(_switch_epochs(rows, "CC")))
    if len(common) < 2:
        return Claim("1", statement, "not enough data",
                     (f"needs AC and CC rows at two switch epochs or more; have {common}",))
    first, last = common[0], common[-1]
    ac_last, cc_last = (_by_seed(rows, c, last, metric) for c in ("AC", "CC"))
    ac_first = _by_seed(rows, "AC", first, metric)
    gap, growth = paired(ac_last, cc_last, min_gap), paired(ac_last, ac_first, min_gap)
    if gap is None or growth is None:
        return Claim("1", statement, "not enough data", (f"no finite {metric} values",))
    curve = ", ".join(f"{e:g}: {_mean_std(_by_seed(rows, 'AC', e, metric))}" for e in common)
    cc = ", ".join(f"{e:g}: {_mean_std(_by_seed(rows, 'CC', e, metric))}" for e in common)
    evidence = (f"AC {metric} by switch epoch: {curve}",
                f"CC {metric} by switch epoch: {cc}",
                f"AC - CC at epoch {last:g}: {gap.text()}",
                f"AC at epoch {last:g} - AC at epoch {first:g}: {growth.text()}")
    near = paired(cc_last, _by_seed(rows, "C-", last, metric), min_gap)
    if near is not None:  # the claim's second half, as evidence: CC near the standard network
        evidence += (f"CC - C- (the standard network) at epoch {last:g}: {near.text()}",)
    if gap.sign < 0:
        verdict: Verdict = "reversed"
    elif gap.sign > 0 and growth.sign > 0:
        verdict = "holds"
    else:
        verdict = "does not hold"
    return Claim("1", statement, verdict, evidence,
                 {"ac_minus_cc": gap.mean, "ac_growth": growth.mean})


def _claim_fixed_kernel(rows: Sequence[Mapping[str, Any]], metric: str, code: str,
                        min_gap: float) -> Claim:
    key = "2" if code == "AA" else f"2 ({code})"
    kernel = "an adversarial" if code[0] == "A" else "a benign"
    statement = (f"adversarial training on {kernel} fixed kernel ({code}) is at least as "
                 "robust as full adversarial training of the network (A-)")
    common = sorted(set(_switch_epochs(rows, code)) & set(_switch_epochs(rows, "A-")))
    if not common:
        return Claim(key, statement, "not enough data",
                     (f"needs {code} and A- rows at a common switch epoch",))
    last = common[-1]
    fixed, full = _by_seed(rows, code, last, metric), _by_seed(rows, "A-", last, metric)
    d = paired(fixed, full, min_gap)
    if d is None:
        return Claim(key, statement, "not enough data", (f"no finite {metric} values",))
    evidence = (f"{code} at switch epoch {last:g}: {_mean_std(fixed)}; A- (the adversarially "
                f"trained network at epoch {last:g}): {_mean_std(full)}",
                f"{code} - A-: {d.text()}")
    return Claim(key, statement, "does not hold" if d.sign < 0 else "holds", evidence,
                 {f"{code.lower()}_minus_full": d.mean})


def claim_2(rows: Sequence[Mapping[str, Any]], metric: str,
            min_gap: float = MIN_GAP) -> list[Claim]:
    return [_claim_fixed_kernel(rows, metric, c, min_gap) for c in ("AA", "CA")]


@dataclass(frozen=True)
class KernelCurve:
    """One phase-1 trajectory's kernel distance to its final kernel, S(K_t, K_T), by epoch."""

    mode: str
    seed: int
    epochs: np.ndarray  # [T], increasing; the last is T
    to_final: np.ndarray  # [T]; 0 at the last epoch


def convergence_epoch(curve: KernelCurve, fraction: float) -> float:
    """The first stored epoch from which S(K_t, K_T) <= ``fraction`` * S(K_0, K_T) holds at
    every later epoch (the last epoch if none before it)."""
    above = np.nonzero(curve.to_final > fraction * curve.to_final[0])[0]
    index = 0 if not len(above) else min(above[-1] + 1, len(curve.epochs) - 1)
    return float(curve.epochs[index])


def claim_3(curves: Sequence[KernelCurve], fraction: float = CONVERGENCE_FRACTION,
            min_gap: float = MIN_EPOCH_GAP) -> Claim:
    statement = ("adversarial training's kernel converges before standard training's (the "
                 f"epoch from which its distance to its final kernel stays below {fraction:g} "
                 "of the initial distance comes earlier)")
    at = {(c.mode, c.seed): convergence_epoch(c, fraction) for c in curves}
    adv = {s: e for (m, s), e in at.items() if m == "A"}
    std = {s: e for (m, s), e in at.items() if m == "C"}
    d = paired(adv, std, min_gap)
    if d is None:
        return Claim("3", statement, "not enough data",
                     ("needs the kernels of a C and an A trajectory of one seed "
                      "(ntk-sweep kernel RUN_DIR computes them)",))
    ends = {c.mode: float(c.epochs[-1]) for c in curves}

    def listing(mode: str, by_seed: Mapping[int, float]) -> str:
        return ", ".join(f"seed {s}: {e:g}" for s, e in sorted(by_seed.items())) + \
            f" (of {ends[mode]:g} epochs)"

    evidence = (f"convergence epoch of C: {listing('C', std)}",
                f"convergence epoch of A: {listing('A', adv)}",
                f"A - C: {d.text('epochs', 1.0)}")
    verdict: Verdict = {1: "reversed", -1: "holds", 0: "does not hold"}[d.sign]
    return Claim("3", statement, verdict, evidence,
                 {"a_minus_c_convergence_epochs": d.mean,
                  **{f"convergence_epoch_{m}_seed{s}": e for (m, s), e in at.items()}})


def claim_distinct(final_distances: Mapping[tuple[tuple[str, int], tuple[str, int]], float],
                   ratio: float = DISTINCT_RATIO) -> Claim:
    """``final_distances``: S between the final kernels of two trajectories (mode, seed)."""
    statement = (f"adversarial and standard training converge to different kernels (C-A "
                 f"distance at least {ratio:g}x the seed-to-seed distance)")
    cross = [d for ((ma, sa), (mb, sb)), d in final_distances.items() if ma != mb and sa == sb
             and {ma, mb} == {"A", "C"}]
    within = [d for ((ma, sa), (mb, sb)), d in final_distances.items()
              if ma == mb and ma in "AC" and sa != sb]
    if not cross or not within:
        return Claim("3 (distinct kernels)", statement, "not enough data",
                     ("needs final kernels of C and A for one seed and of two seeds of a mode",))
    c, w = float(np.mean(cross)), float(np.mean(within))
    evidence = (f"C-A distance of final kernels, same seed: {c:.4f} (mean of {len(cross)})",
                f"seed-to-seed distance, same mode: {w:.4f} (mean of {len(within)}); "
                f"ratio {c / w if w > 0 else math.inf:.2f}",)
    verdict: Verdict = "holds" if c >= ratio * w else "does not hold"
    return Claim("3 (distinct kernels)", statement, verdict, evidence,
                 {"final_cross_distance": c, "final_seed_distance": w})


def evaluate(rows: Sequence[Mapping[str, Any]], curves: Sequence[KernelCurve] = (),
             final_distances: Mapping[tuple[tuple[str, int], tuple[str, int]], float] | None
             = None, metric: str = "worst_linf", fraction: float = CONVERGENCE_FRACTION
             ) -> list[Claim]:
    """Every claim over the rows of one study (one variant of a sweep) and its kernels."""
    if rows and metric not in rows[0]:
        raise ValueError(f"metric {metric!r} is not in the result rows")
    return [claim_1(rows, metric), *claim_2(rows, metric), claim_3(curves, fraction),
            claim_distinct(final_distances or {})]


def kernel_evidence(trajectories: Mapping[tuple[str, int], KernelTrajectory]
                    ) -> tuple[list[KernelCurve], dict[tuple[tuple[str, int], tuple[str, int]],
                                                       float]]:
    """Claim 3's inputs from stored kernels, keyed by (mode, seed): each trajectory's
    S(K_t, K_T) at every stored epoch (class-wise mean; K_T its last stored kernel, loaded
    once, the others one at a time) and S between the final kernels of the same epoch of the
    pairs ``trajectory_pairs`` chooses (every pair up to 16 trajectories). Trajectories
    without stored kernels are left out."""
    curves, finals = [], {}
    for (mode, seed), store in sorted(trajectories.items()):
        epochs = store.epochs() if store.exists() else []
        if len(epochs) < 2:
            continue
        last = store.load(epochs[-1])
        final = per_kernel(last.kernel[None], last.meta["output"])[0]
        to_final = []
        for e in epochs:
            r = last if e == epochs[-1] else store.load(e)
            k = per_kernel(r.kernel[None], r.meta["output"])[0]
            to_final.append(float(np.mean(distance(k, final))))
        curves.append(KernelCurve(mode, seed, np.asarray(epochs, np.float64),
                                  np.asarray(to_final)))
        finals[(mode, seed)] = (epochs[-1], final)
    pairs = {(a, b): float(np.mean(distance(finals[a][1], finals[b][1])))
             for a, b in trajectory_pairs(finals) if finals[a][0] == finals[b][0]}
    return curves, pairs


def claims_markdown(claims: Sequence[Claim], title: str = "The paper's claims") -> str:
    """A section: one line per claim with its verdict, then its evidence."""
    lines = [f"## {title}", ""]
    for c in claims:
        lines.append(f"- **{c.key}: {c.verdict}**. {c.statement[0].upper()}{c.statement[1:]}.")
        lines += [f"  - {e}" for e in c.evidence]
    return "\n".join(lines) + "\n"


def claims_json(claims: Sequence[Claim]) -> list[dict[str, Any]]:
    return [{"key": c.key, "statement": c.statement, "verdict": c.verdict,
             "evidence": list(c.evidence), "numbers": c.numbers} for c in claims]
