"""The paper's claims from a run's numbers (``core.claims``): verdicts on runs whose outcome
is known by construction, and the kernel evidence read from stored kernel trajectories."""

from __future__ import annotations

import numpy as np
import pytest

from core.claims import (
    VERDICTS,
    KernelCurve,
    claim_1,
    claim_2,
    claim_3,
    claim_distinct,
    convergence_epoch,
    evaluate,
    kernel_evidence,
    paired,
)
from core.kernel_store import KernelRecord, KernelTrajectory
from core.kernels import distance


def _rows(values: dict[tuple[str, float], list[float]]) -> list[dict]:
    """Result rows: values[(code, switch epoch)][seed] is the robust accuracy."""
    return [{"seed": s, "code": code, "switch_epoch": t, "switch_rule": "",
             "worst_linf": v, "accuracy": 0.9}
            for (code, t), vs in values.items() for s, v in enumerate(vs)]


def _verdict(claims, key):
    return next(c for c in claims if c.key == key).verdict


def test_paired_differences_count_only_beyond_the_seeds_spread():
    # Mean difference 0.05 with a large spread: within 2 standard errors, no difference.
    d = paired({0: 0.40, 1: 0.10, 2: 0.25}, {0: 0.10, 1: 0.20, 2: 0.20}, min_gap=0.02)
    assert d.n == 3 and d.mean == pytest.approx(0.25 / 3)
    assert d.band == pytest.approx(2 * np.std([0.3, -0.1, 0.05], ddof=1) / np.sqrt(3))
    assert d.sign == 0
    # The same mean, consistent over seeds: a difference.
    assert paired({0: 0.3, 1: 0.3}, {0: 0.2, 1: 0.2}, 0.02).sign == 1
    # One seed: only the minimum gap applies; seeds missing on one side are left out.
    one = paired({0: 0.30, 1: 0.9}, {0: 0.31}, 0.02)
    assert one.n == 1 and one.sign == 0
    assert paired({0: float("nan")}, {0: 0.1}, 0.02) is None


@pytest.mark.parametrize("ac, cc, verdict", [
    ([[0.01, 0.02, 0.01], [0.40, 0.45, 0.42]], [[0.01, 0.02, 0.01], [0.02, 0.01, 0.02]], "holds"),
    ([[0.01, 0.02, 0.01], [0.02, 0.01, 0.02]], [[0.01, 0.02, 0.01], [0.40, 0.45, 0.42]],
     "reversed"),
    # AC above CC but not growing: the claim is about both.
    ([[0.40, 0.45, 0.42], [0.41, 0.44, 0.42]], [[0.01, 0.02, 0.01], [0.02, 0.01, 0.02]],
     "does not hold"),
])
def test_claim_1_verdicts(ac, cc, verdict):
    rows = _rows({("AC", 0.0): ac[0], ("AC", 10.0): ac[1],
                  ("CC", 0.0): cc[0], ("CC", 10.0): cc[1]})
    claim = claim_1(rows, "worst_linf")
    assert claim.verdict == verdict
    assert claim.numbers["ac_minus_cc"] == pytest.approx(np.mean(ac[1]) - np.mean(cc[1]))
    assert any("AC - CC at epoch 10" in e for e in claim.evidence)


def test_claim_1_needs_two_switch_epochs():
    rows = _rows({("AC", 5.0): [0.4], ("CC", 5.0): [0.1], ("AC", 10.0): [0.5]})
    assert claim_1(rows, "worst_linf").verdict == "not enough data"


def test_claim_2_compares_the_last_common_switch_epoch_with_the_network():
    rows = _rows({("AA", 10.0): [0.60, 0.58, 0.62], ("A-", 10.0): [0.61, 0.60, 0.62],
                  ("CA", 10.0): [0.30, 0.31, 0.29], ("AA", 2.0): [0.1, 0.1, 0.1],
                  ("A-", 2.0): [0.5, 0.5, 0.5]})
    aa, ca = claim_2(rows, "worst_linf")
    assert (aa.key, aa.verdict) == ("2", "holds")  # within the band: comparable
    assert aa.numbers["aa_minus_full"] == pytest.approx(-0.01)
    assert (ca.key, ca.verdict) == ("2 (CA)", "does not hold")
    assert claim_2(_rows({("AA", 1.0): [0.5]}), "worst_linf")[0].verdict == "not enough data"


def _curve(mode: str, seed: int, converged_at: float) -> KernelCurve:
    """S(K_t, K_T) at epochs 0..10, from 0.2, that falls to 0.001 at ``converged_at``."""
    epochs = np.arange(11.0)
    return KernelCurve(mode, seed, epochs,
                       np.where(epochs < converged_at, 0.2 - 0.01 * epochs, 0.001))


def test_convergence_epoch_is_where_the_distance_stays_below():
    c = KernelCurve("C", 0, np.array([0, 1, 2, 3, 4.0]), np.array([0.3, 0.01, 0.05, 0.01, 0]))
    assert convergence_epoch(c, 0.1) == 3.0  # within 0.03 at 1, but came back above it
    assert convergence_epoch(c, 1.0) == 0.0
    assert convergence_epoch(_curve("A", 0, 4.0), 0.1) == 4.0


@pytest.mark.parametrize("c_at, a_at, verdict", [
    ([2, 3, 2], [6, 7, 8], "reversed"),  # what digits shows: the standard kernel freezes first
    ([6, 7, 8], [2, 3, 2], "holds"),
    ([2, 6, 3], [6, 2, 3], "does not hold"),
])
def test_claim_3_verdicts(c_at, a_at, verdict):
    curves = [_curve("C", s, e) for s, e in enumerate(c_at)] + \
             [_curve("A", s, e) for s, e in enumerate(a_at)]
    claim = claim_3(curves, fraction=0.1)
    assert claim.verdict == verdict
    assert claim.numbers["a_minus_c_convergence_epochs"] == pytest.approx(
        np.mean(a_at) - np.mean(c_at))
    assert claim_3([c for c in curves if c.mode == "C"]).verdict == "not enough data"


def _store(root, mode: str, seed: int, kernels: list[np.ndarray]) -> KernelTrajectory:
    store = KernelTrajectory(root / f"{mode}{seed}")
    for epoch, k in enumerate(kernels):
        store.save(KernelRecord(k.astype(np.float32), np.arange(k.shape[-1]),
                                np.arange(k.shape[-1]) % 2,
                                {"epoch": float(epoch), "output": "classwise"}))
    return store


def _psd(rng, n=6, classes=2):
    a = rng.normal(size=(classes, n, n))
    return a @ a.transpose(0, 2, 1)


def test_kernel_evidence_from_stored_kernels(tmp_path):
    rng = np.random.default_rng(0)
    stores, finals = {}, {}
    for mode, freeze in (("C", 2), ("A", 5)):
        final = _psd(rng)
        for seed in (0, 1):
            # Seeds end near one kernel of their mode; kernels move until ``freeze``.
            end = final + 0.01 * _psd(rng)
            start = _psd(rng)
            ks = [start + (end - start) * min(t / freeze, 1.0) for t in range(8)]
            stores[(mode, seed)] = _store(tmp_path, mode, seed, ks)
            finals[(mode, seed)] = end
    curves, pairs = kernel_evidence(stores)
    by = {(c.mode, c.seed): c for c in curves}
    expected = [np.mean(distance(k, finals[("C", 0)]))
                for k in (stores[("C", 0)].load(e).kernel for e in range(8))]
    np.testing.assert_allclose(by[("C", 0)].to_final, expected, atol=1e-6)
    assert set(pairs) == {(a, b) for a in stores for b in stores if a < b}
    claims = evaluate([], curves, pairs, fraction=1e-3)
    assert _verdict(claims, "3") == "reversed"
    assert claims[3].numbers["convergence_epoch_C_seed0"] == 2.0
    assert claims[3].numbers["convergence_epoch_A_seed1"] == 5.0
    assert _verdict(claims, "3 (distinct kernels)") == "holds"
    assert {c.verdict for c in claims} <= set(VERDICTS)
    # Trajectories without kernels are left out, not errors.
    curves, _ = kernel_evidence({("C", 3): KernelTrajectory(tmp_path / "none")})
    assert curves == []


def test_distinct_kernels_needs_the_seed_to_seed_distance():
    same = {(("A", 0), ("C", 0)): 0.01, (("A", 0), ("A", 1)): 0.01, (("C", 0), ("C", 1)): 0.01}
    assert claim_distinct(same).verdict == "does not hold"
    assert claim_distinct({(("A", 0), ("C", 0)): 0.3}).verdict == "not enough data"
