"""The f-DP one-run bound (:mod:`xrayfed.client.audit_fdp`): exact where the answer is
known in closed form, never sharper than what a mechanism attains, valid in simulated guessing
games (the true curve is rejected at most at the stated rate), and able to exceed a claimed
ε = 8 at δ = 10⁻⁵, which the (ε, δ) bound cannot.

Seed policy: the simulated games are seeded; their margins are wide (the true curve's rejection
rate was 0 at β = 0.05 and far below β at β = 0.5 in the runs that set them)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from xrayfed.client import audit_fdp as fdp
from xrayfed.common.privacy.audit import audit, epsilon_lower_bound, guess_counts, p_value

#: The PneumoniaMNIST plan audited at a claimed ε = 8 (δ = 10⁻⁵): σ, q, T = 21 steps × 5 rounds.
PLAN_EPS_8 = (1.746826171875, 0.24982307147912244, 105)


def test_one_canary_bound_is_the_best_single_guess():
    # one canary, one guess: the most likely right guess of a μ-GDP mechanism is Φ(μ/2), of an
    # ε-DP one e^ε/(1+e^ε) (Steinke et al.'s binomial with r = 1); the bound is exactly that
    for mu in (0.5, 1.0, 2.0, 3.0):
        assert fdp.p_value(fdp.GaussianCurve(mu), 1, 1, 1) == pytest.approx(stats.norm.cdf(mu / 2), abs=1e-8)
    for eps in (0.5, 1.0, 2.0):
        assert fdp.p_value(fdp.EpsDeltaCurve(eps), 1, 1, 1) == pytest.approx(p_value(1, 1, 1, eps, 0.0), abs=1e-8)


def test_pure_dp_curve_is_never_sharper_than_the_binomial_tail():
    """ε-DP randomized response attains Steinke et al.'s binomial tail exactly, so no valid bound
    on P[≥ v right] can be below it; with every canary guessed and every guess right the f-DP
    bound equals it (p_ε^r)."""
    for m, r, v, eps in ((1000, 200, 150, 1.0), (50, 10, 3, 0.5), (10, 10, 9, 1.0), (2000, 400, 390, 3.0)):
        assert fdp.p_value(fdp.EpsDeltaCurve(eps), m, r, v) >= p_value(m, r, v, eps, 0.0) * (1 - 1e-9)
    for r, eps in ((100, 3.0), (20, 1.0), (1000, 6.0)):
        assert fdp.p_value(fdp.EpsDeltaCurve(eps), r, r, r) == pytest.approx(p_value(r, r, r, eps, 0.0), rel=1e-6)


def test_eps_delta_curve_bound_is_at_least_steinkes_where_delta_matters():
    """Rejecting the (ε, δ) curve is rejecting (ε, δ)-DP, so the f-DP test gives an (ε, δ) bound too;
    on these counts (the stored audits' and every guess right) it is at least Steinke et al.'s,
    whose δ term is looser, and equal with δ = 0 and every canary guessed right."""
    cases = [(10_000, 7000, 7000, 1e-5), (10_000, 1000, 975, 1e-5), (1000, 700, 700, 1e-5), (10_000, 2000, 1989, 1e-5),
             (10_000, 1000, 653, 1e-5)]
    for m, r, v, delta in cases:
        ours = fdp.search_eps_delta([(m, r, v)], delta, 0.05, tests=7).epsilon_lower_bound
        assert ours >= epsilon_lower_bound(m, r, v, delta, 0.05 / 7) - 1e-5
    assert fdp.search_eps_delta([(10_000, 7000, 7000)], 1e-5, 0.05, tests=7).epsilon_lower_bound == pytest.approx(
        7.255, abs=0.01)  # Steinke et al.: 5.86
    assert fdp.search_eps_delta([(100, 100, 100)], 0.0, 0.05).epsilon_lower_bound == pytest.approx(
        epsilon_lower_bound(100, 100, 100, 0.0, 0.05), abs=1e-5)


def test_bound_is_monotone_in_the_level_and_the_curve():
    m, r, v = 1000, 200, 190
    masses = [fdp.least_mass(fdp.GaussianCurve(2.0), m, r, v, tau) for tau in (0.001, 0.01, 0.1, 0.5)]
    assert masses == sorted(masses)
    # a less private curve (larger μ) needs less mass: harder to reject
    by_mu = [fdp.least_mass(fdp.GaussianCurve(mu), m, r, v, 0.01) for mu in (1.0, 2.0, 3.0, 4.0)]
    assert by_mu == sorted(by_mu, reverse=True)
    p = fdp.p_value(fdp.GaussianCurve(2.0), m, r, v)
    assert fdp.rejects(fdp.GaussianCurve(2.0), m, r, v, p * 1.001)
    assert not fdp.rejects(fdp.GaussianCurve(2.0), m, r, v, p * 0.999)
    # the GDP curve's ε(δ) inverts its δ(ε)
    for mu in (0.5, 1.0, 3.0):
        eps = fdp.gaussian_epsilon(mu, 1e-5)
        assert fdp.gaussian_delta(mu, eps) == pytest.approx(1e-5, rel=1e-4)


def _rejection_rates(curves, m, r, vs, betas):
    return {(i, b): float(np.mean([fdp.rejects(c, m, r, int(v), b) for v in vs]))
            for i, c in enumerate(curves) for b in betas}


def test_gaussian_guessing_game_rejects_the_true_curve_at_most_at_its_level():
    """Canary scores N(μ·included, 1): each canary's inclusion is exactly μ-GDP. The auditor guesses
    the top and bottom k; the μ-GDP curve must be rejected in at most a β share of the runs (plus
    Monte Carlo slack), and μ/2-GDP (more private than the truth) in most of them."""
    rng = np.random.default_rng(0)
    m, mu, k, n = 1000, 2.0, 100, 400
    vs = []
    for _ in range(n):
        inc = rng.random(m) < 0.5
        order = np.argsort(mu * inc + rng.normal(size=m))
        vs.append(inc[order[-k:]].sum() + (~inc[order[:k]]).sum())
    betas = (0.05, 0.5, 0.9)
    rate = _rejection_rates([fdp.GaussianCurve(mu), fdp.GaussianCurve(mu / 2)], m, 2 * k, vs, betas)
    for b in betas:
        assert rate[0, b] <= b + 3 * math.sqrt(b * (1 - b) / n)
    assert rate[1, 0.05] > 0.9
    # every canary guessed by the Bayes rule: W ~ Binomial(r, Φ(μ/2)) exactly, whose tail the bound covers
    for r in (10, 50):
        for v in range(r // 2, r + 1):
            assert fdp.p_value(fdp.GaussianCurve(1.0), r, r, v) >= stats.binom.sf(v - 1, r, stats.norm.cdf(0.5)) - 1e-9


def test_dp_sgd_canaries_reject_the_claimed_curve_at_most_at_its_level():
    """The white-box game itself, simulated: T steps, each included canary Poisson-sampled at q,
    every coordinate noised with σ, scored by the log-likelihood ratio. The DP-SGD(σ, q, T) curve
    must be rejected in at most a β share of runs; DP-SGD(2σ, q, T) in most of them."""
    rng = np.random.default_rng(1)
    sigma, q, steps, m, k, n = 1.0, 0.25, 20, 1000, 50, 300
    vs = []
    for _ in range(n):
        inc = rng.random(m) < 0.5
        x = (rng.random((steps, m)) < q) * inc + sigma * rng.normal(size=(steps, m))
        llr = np.logaddexp(math.log1p(-q), math.log(q) + (x - 0.5) / sigma**2).sum(axis=0)
        order = np.argsort(llr)
        vs.append(inc[order[-k:]].sum() + (~inc[order[:k]]).sum())
    betas = (0.05, 0.5, 0.9)
    curves = [fdp.DpSgdCurve(sigma, q, steps), fdp.DpSgdCurve(2 * sigma, q, steps)]
    rate = _rejection_rates(curves, m, 2 * k, vs, betas)
    for b in betas:
        assert rate[0, b] <= b + 3 * math.sqrt(b * (1 - b) / n)
    assert rate[1, 0.05] > 0.7


def test_dp_sgd_curve_is_a_valid_tradeoff_curve():
    c = fdp.DpSgdCurve(*PLAN_EPS_8)
    assert c.epsilon(1e-5) == pytest.approx(7.99, abs=0.05)  # the PLD's ε, within the PRV claim's tolerance
    alphas = np.linspace(0, 1, 101)
    f = np.array([c.f(a) for a in alphas])
    assert f[0] <= 1 and f[-1] == 0 and np.all(np.diff(f) <= 1e-15) and np.all(f <= 1 - alphas + 1e-12)
    # above the (ε, δ) curve of its own ε at δ = 10⁻⁵ (f-DP implies that), and not above the curve of a
    # smaller ε (it claims no more privacy than its accountant)
    alphas = np.concatenate([np.logspace(-12, -1, 200), alphas])
    f = np.array([c.f(a) for a in alphas])

    def eps_delta(e, a):
        return np.maximum(0, np.maximum(1 - 1e-5 - math.exp(e) * a, math.exp(-e) * (1 - 1e-5 - a)))

    eps = c.epsilon(1e-5)
    up = alphas + 0.02 * np.minimum(alphas, 1 - alphas)  # f is read on a grid, at α rounded up by < 2 %
    assert np.all(f >= eps_delta(eps, up) - 1e-9)
    assert not np.all(f >= eps_delta(eps - 0.1, alphas) - 1e-9)


def test_all_right_guesses_exceed_a_claimed_eps_8_where_the_eps_delta_bound_cannot():
    sigma, q, steps = PLAN_EPS_8
    claimed = fdp.DpSgdCurve(sigma, q, steps).epsilon(1e-5)
    for m in (1000, 10_000):
        grid = [(m, 2 * k, 2 * k) for k, _ in guess_counts(m)]  # every guess right, every grid size
        bound = fdp.search_dp_sgd(grid, sigma, q, steps, 1e-5, 0.05)
        steinke = max(epsilon_lower_bound(m, r, v, 1e-5, 0.05 / len(grid)) for _, r, v in grid)
        assert steinke < 6.5 < claimed < bound.epsilon_lower_bound
        assert fdp.rejects(fdp.DpSgdCurve(sigma, q, steps), m, bound.guesses, bound.correct, 0.05 / len(grid))
    # what the correct code scored at this plan (975 of 1000 guesses right of 10 000 canaries) stays below
    ok = fdp.search_dp_sgd([(10_000, 1000, 975)], sigma, q, steps, 1e-5, 0.05, tests=7)
    assert 3.0 < ok.epsilon_lower_bound < claimed


def test_audit_ranks_as_the_eps_delta_audit_and_finds_separated_canaries():
    rng = np.random.default_rng(2)
    inc = rng.random(2000) < 0.5
    scores = inc.astype(float) + rng.random(2000) * 0.1
    cands = fdp.observed(scores, inc)
    assert [(r, v) for _, r, v in cands][:2] == [(2 * k, 2 * k) for k, _ in guess_counts(2000)][:2]
    best = audit(scores, inc, delta=1e-5)
    assert (2000, best.guesses, best.correct) in cands
    got = fdp.audit(scores, inc, 1e-5, (1.0, 0.25, 20))
    assert got.epsilon_lower_bound > fdp.DpSgdCurve(1.0, 0.25, 20).epsilon(1e-5)
    coin = fdp.audit(rng.normal(size=2000), inc, 1e-5, (1.0, 0.25, 20))
    assert coin.epsilon_lower_bound < 0.5
