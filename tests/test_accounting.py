"""The second opinion: dp-accounting (Google) against the Opacus accountants used in training."""

from __future__ import annotations

import pytest

from xrayfed.client.dp import compute_epsilon
from xrayfed.common.privacy.accounting import (
    TOL_ABS,
    TOL_REL,
    judge,
    merge_history,
    pld_epsilons,
    rdp_epsilons,
    rounds_that_fit,
    second_opinion,
    second_opinions,
    tolerance,
    training_epsilon,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Opacus PRV at q = 1: log(0), harmless

DELTA = 1e-5
# (σ, q, steps): small and large q, few and many steps, ε from ~0.5 to ~12.
CASES = [
    (1.1, 0.064, 48),  # 3 rounds of 16 steps at B = 64, N = 1000: ε ≈ 2.7
    (0.8, 0.01, 1000),  # small q, many steps: ε ≈ 3.2
    (0.6, 0.02, 500),  # ε ≈ 10
    (5.0, 0.25, 8),  # ε < 1
    (1.0, 1.0, 3),  # full batch (q = 1)
]


def test_tolerance_is_the_stated_rule():
    assert (TOL_ABS, TOL_REL) == (0.05, 0.02)
    assert tolerance(1.0) == 0.05 and tolerance(2.5) == 0.05 and tolerance(8.0) == pytest.approx(0.16)


@pytest.mark.parametrize("sigma,q,steps", CASES)
def test_pld_agrees_with_training_prv(sigma, q, steps):
    prv = compute_epsilon([(sigma, q, steps)], DELTA, "prv")
    pld = pld_epsilons([(sigma, q, steps)], DELTA)[-1]
    assert abs(pld - prv) <= tolerance(prv), (prv, pld)
    # Both are near-tight: observed gap is ~0.01 (Opacus returns its upper estimate = estimate + 0.01).
    assert abs(pld - prv) <= 0.03
    op = second_opinion([(sigma, q, steps)], prv, DELTA, "prv")
    assert op.agrees, op.reason
    assert op.rdp_epsilon >= prv - tolerance(prv)  # RDP is an upper bound


@pytest.mark.parametrize("sigma,q,steps", CASES[:3])
def test_independent_rdp_agrees_with_training_rdp(sigma, q, steps):
    rdp_opacus = compute_epsilon([(sigma, q, steps)], DELTA, "rdp")
    rdp_google = rdp_epsilons([(sigma, q, steps)], DELTA)[-1]
    assert abs(rdp_google - rdp_opacus) <= tolerance(rdp_opacus), (rdp_opacus, rdp_google)
    assert second_opinion([(sigma, q, steps)], rdp_opacus, DELTA, "rdp").agrees


def test_heterogeneous_history_per_round():
    """σ changes mid-run (a hospital re-planned): every cumulative ε still agrees."""
    hist = [(1.2, 0.05, 20), (1.2, 0.05, 20), (0.9, 0.08, 13)]
    claimed = [training_epsilon(hist[: k + 1], DELTA) for k in range(len(hist))]
    ops = second_opinions(hist, [(k + 1, e, DELTA, "prv") for k, e in enumerate(claimed)])
    assert all(op.agrees for op in ops), [op.reason for op in ops]
    assert [op.independent_epsilon for op in ops] == sorted(op.independent_epsilon for op in ops)


@pytest.mark.parametrize("factor", [0.8, 1.2])
def test_disagreement_is_flagged(factor):
    """A wrong ε (20 % off) is beyond the tolerance and is flagged with a reason."""
    sigma, q, steps = CASES[0]
    prv = compute_epsilon([(sigma, q, steps)], DELTA)
    op = second_opinion([(sigma, q, steps)], prv * factor, DELTA, "prv")
    assert not op.agrees and "PLD" in op.reason
    # An RDP "upper bound" below the tight value is impossible: flagged.
    assert not judge(5.0, pld_eps=5.0, rdp_eps=4.0, accountant="prv").agrees
    assert not judge(5.0, pld_eps=5.5, rdp_eps=5.0, accountant="rdp").agrees


def test_merged_history_is_the_same_composition():
    hist = [(1.1, 0.064, 16)] * 3
    assert merge_history(hist) == [(1.1, 0.064, 48)]
    assert training_epsilon(hist, DELTA) == pytest.approx(compute_epsilon(hist, DELTA), rel=1e-8)


def test_rounds_that_fit_is_the_hospitals_own_test():
    """k more rounds fit: k rounds keep ε ≤ budget and k + 1 do not (the test in PrivacyLedger.charge;
    identical rounds composed as one entry, which test_merged_history_is_the_same_composition allows)."""
    s, q, n = 1.1, 0.064, 16
    hist = [(s, q, n)] * 2
    assert rounds_that_fit(hist, hist[-1], DELTA, 2.5) == 0  # a third round would reach 2.7365
    k = rounds_that_fit(hist, hist[-1], DELTA, 4.0)
    assert k == 5
    assert compute_epsilon([(s, q, n * (2 + k))], DELTA) <= 4.0
    assert compute_epsilon([(s, q, n * (3 + k))], DELTA) > 4.0
