"""The white-box audit's measured-mechanism figure: the moments of the canaries' observations
identify DP-SGD's noise, clipped contribution and sample rate, and the ε of the mechanism they
show is a lower confidence bound that stays below a correct run's ε and exceeds a broken run's
claim.

The canaries' observations are drawn here exactly as the white-box auditor reads them from a
training step (x = c·Bernoulli(q) + N(0, s²) per step for an included canary, N(0, s²) for an
excluded one; :class:`xrayfed.client.audit.GradientCanaries`), seeded; the whole audit on real
training is tested in tests/test_audit.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xrayfed.client.audit_measured import SIGMA_FLOOR, _least_epsilon, dp_sgd_epsilon, measure
from xrayfed.common.privacy.accounting import compute_epsilon, tolerance

DELTA = 1e-5


def observe(m: int, s: float, c: float, q: float, steps: int, seed: int):
    """Each canary's sum and sum of squares of its ``steps`` observations, and which were included."""
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    sums, sums_sq = np.zeros(m), np.zeros(m)
    for _ in range(steps):
        x = c * (included & (rng.random(m) < q)) + rng.normal(0.0, s, m)
        sums += x
        sums_sq += x * x
    return sums, sums_sq, included


def test_the_moments_recover_the_mechanism_and_its_epsilon():
    s, c, q, steps = 1.5, 1.0, 0.3, 40
    r = measure(*observe(40_000, s, c, q, steps, seed=1), steps, DELTA)
    assert r.noise == pytest.approx(s, rel=0.01)
    assert r.contribution == pytest.approx(c, rel=0.08)
    assert r.sample_rate == pytest.approx(q, rel=0.08)
    true = dp_sgd_epsilon(s / c, q, steps, DELTA)
    assert r.epsilon_estimate == pytest.approx(true, rel=0.1)
    assert r.noise_bound >= r.noise and r.epsilon_lower_bound < r.epsilon_estimate
    # the measured noise multiplier and the conservative ends are what the figure was evaluated at
    assert r.noise_multiplier == pytest.approx(r.noise / r.contribution)
    assert dp_sgd_epsilon(r.noise_bound / r.contribution_bound, r.sample_rate_bound, steps, DELTA) == pytest.approx(
        r.epsilon_lower_bound, rel=1e-6)


def test_its_pld_epsilon_agrees_with_the_training_accountant():
    for sigma, q, steps in ((1.75, 0.25, 105), (6.56, 0.25, 45), (1.07, 0.125, 105)):
        claimed = compute_epsilon([(sigma, q, steps)], DELTA, "prv")
        assert abs(dp_sgd_epsilon(sigma, q, steps, DELTA) - claimed) <= tolerance(claimed)
    assert dp_sgd_epsilon(1.0, 0.0, 10, DELTA) == 0.0 and dp_sgd_epsilon(math.inf, 0.5, 10, DELTA) == 0.0
    # below the floor ε is evaluated at the floor: smaller (ε falls as σ grows), so still a lower bound
    assert dp_sgd_epsilon(0.05, 0.25, 10, DELTA) == dp_sgd_epsilon(SIGMA_FLOOR, 0.25, 10, DELTA)
    assert dp_sgd_epsilon(SIGMA_FLOOR, 0.25, 10, DELTA) > dp_sgd_epsilon(2 * SIGMA_FLOOR, 0.25, 10, DELTA)


@pytest.mark.parametrize("sigma,q,steps", [(1.75, 0.25, 105), (6.56, 0.25, 45)])
def test_a_correct_run_is_measured_below_its_true_epsilon(sigma, q, steps):
    true = compute_epsilon([(sigma, q, steps)], DELTA, "prv")
    lows = [measure(*observe(8_000, sigma, 1.0, q, steps, seed), steps, DELTA).epsilon_lower_bound
            for seed in range(8)]
    assert max(lows) <= true + tolerance(true)  # 99.9 % confidence each: a false alarm here is a bug
    assert min(lows) > 0.3 * true  # and the figure is not vacuous


@pytest.mark.parametrize("fault", ["accountant_half_q", "noise_0.1", "no_clipping"])
@pytest.mark.parametrize("sigma_claimed,steps", [(1.07, 105), (3.46, 45)])
def test_each_broken_configuration_is_measured_above_its_claim(fault, sigma_claimed, steps):
    q = 0.25
    s, c, q_told = {"accountant_half_q": (sigma_claimed, 1.0, q / 2), "noise_0.1": (0.1 * sigma_claimed, 1.0, q),
                    "no_clipping": (sigma_claimed, 10.0, q)}[fault]
    claimed = compute_epsilon([(sigma_claimed, q_told, steps)], DELTA, "prv")
    r = measure(*observe(20_000, s, c, q, steps, seed=3), steps, DELTA)
    assert r.epsilon_lower_bound > claimed + tolerance(claimed), (fault, r)
    assert r.sample_rate_bound > q_told or r.noise_bound / max(r.contribution_bound, 1e-9) < sigma_claimed


def test_included_canaries_that_are_never_sampled_give_no_bound():
    sums, sums_sq, included = observe(4_000, 1.0, 1.0, 0.0, 20, seed=0)
    r = measure(sums, sums_sq, included, 20, DELTA)
    assert r.epsilon_lower_bound == 0.0 and r.contribution_bound == 0.0
    with pytest.raises(ValueError, match="at least 2 included and 2 excluded"):
        measure(sums[:3], sums_sq[:3], [True, True, True], 20, DELTA)


def test_the_least_epsilon_is_below_every_mechanism_the_intervals_allow():
    qc, lo, hi, s, steps = 0.24, 0.2, 0.3, 1.2, 30
    least, q_at, c_at = _least_epsilon(qc, lo, hi, s, steps, DELTA)
    assert q_at * c_at <= qc * (1 + 1e-9)
    for q in np.linspace(qc * qc / hi, min(1.0, qc * qc / lo), 7):
        for scale in (1.0, 1.1):  # q·c at or above its lower end
            c = scale * qc / q
            assert least <= dp_sgd_epsilon(s / c, q, steps, DELTA) + 1e-9
