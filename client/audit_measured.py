"""The measured-mechanism figure of the white-box audit: the ε of the DP-SGD that the gradient
canaries show was run, as a lower confidence bound.

The white-box auditor reads, at each of the T steps, every canary's coordinate of the noised sum
minus the other units' clipped contributions (:class:`xrayfed.client.audit.GradientCanaries`),
in units of C. DP-SGD's code makes that observation

    x = c·b + s·z,   b ~ Bernoulli(q) for an included canary (0 for an excluded one), z ~ N(0, 1),

with c the canary's clipped contribution (1 when clipping works), s the noise's standard
deviation (σ when the noise is right) and q the rate at which a unit is actually sampled. The
privacy the run gives a canary is then exactly that of DP-SGD with noise multiplier s / c, rate q
and T steps, whatever its accountant was told. Its moments identify the three parameters:

    excluded:  E[x²] = s²;     included:  E[x] = q·c,   E[x²] − s² = q·c²,

so q = (q·c)² / (q·c²), c = (q·c²) / (q·c) and s = √s². :func:`measure` estimates the three
moments from the canaries (each canary's mean over the T steps is one independent sample;
normal-approximation confidence intervals over thousands of canaries; Bonferroni over the
intervals' ends, so all hold at once with probability ≥ ``confidence``) and reports the least ε,
at the claimed δ, of DP-SGD over every (s, q, c) the intervals allow (dp-accounting's PLD, as the
f-DP figure; :func:`_least_epsilon`): a lower confidence bound on the ε of the mechanism that ran.

**What it assumes, unlike the f-DP figure** (:mod:`xrayfed.client.audit_fdp`, which assumes
nothing about the mechanism): that each step's release has this form — one clipped contribution
of a fixed size, sampled independently at each step, plus Gaussian noise of one scale on every
coordinate. That is the form of the code under audit (the white-box auditor reads it), and it is
the form the accountant assumes too; a fault that changes the form (noise missing on one
parameter group only, a correlated sampler) is the f-DP figure's to catch. Within the form it is
sharp: it measures the mechanism rather than bounding what a guesser can do, so a run whose
accountant was told half its sample rate shows about the ε it really spends (twice or more the
claim), where the one-run f-DP figure, limited by the number of canaries, lands near the claim.

Pure numpy/scipy plus dp-accounting: no torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats

from xrayfed.client.audit_fdp import dp_sgd_pld
from xrayfed.common.privacy.audit import EPS_MAX

#: The confidence of the measured figure when none is given: the one of the signal check, so
#: the white-box decision's false-alarm rate stays the f-DP test's β plus 0.1 %.
CONFIDENCE = 0.999
#: One-sided tails of the three intervals (q·c from below, q·c² + s² and s² both sides): β is split
#: over them (Bonferroni), so all hold at once with probability ≥ the confidence.
TAILS = 5
#: The grid of sample rates the least ε is taken over (:func:`_least_epsilon`): neighbours at most
#: this ratio apart, unless that needs more than :data:`Q_POINTS` pieces (then fewer, coarser ones).
Q_RATIO, Q_POINTS = 1.05, 40
#: Below this noise multiplier ε is evaluated here instead (ε falls as σ grows, so the figure
#: stays a valid lower bound, only capped): far above any claim, and the PLD stays small.
SIGMA_FLOOR = 0.2


@dataclass(frozen=True)
class MeasuredMechanism:
    """What the canaries measured, per step and in units of C: ``noise`` (s), ``contribution``
    (c) and ``sample_rate`` (q) as point estimates, and (``*_bound``) the upper end of s's interval
    with the (q, c) the least ε was evaluated at, over ``steps`` steps; ``epsilon_lower_bound``:
    that least ε at ``delta`` of DP-SGD(s/c, q, T) over the intervals (0 when the included
    canaries show no signal), at ``confidence``; ``epsilon_estimate``: ε at the point estimates."""

    noise: float
    contribution: float
    sample_rate: float
    noise_bound: float
    contribution_bound: float
    sample_rate_bound: float
    steps: int
    delta: float
    confidence: float
    epsilon_lower_bound: float
    epsilon_estimate: float

    @property
    def noise_multiplier(self) -> float:
        """s / c at the point estimates: the noise multiplier the run really used."""
        return self.noise / self.contribution if self.contribution > 0 else math.inf

    def to_dict(self) -> dict:
        return {**asdict(self), "noise_multiplier": self.noise_multiplier}


def dp_sgd_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """ε at ``delta`` of ``steps`` steps of DP-SGD with noise multiplier ``sigma`` and Poisson
    rate ``q`` (dp-accounting's pessimistic PLD; σ below :data:`SIGMA_FLOOR` is evaluated at the
    floor; capped at :data:`EPS_MAX`; the PLD of :func:`xrayfed.client.audit_fdp.dp_sgd_pld`, as
    the f-DP figure's). 0 when ``q`` or 1/``sigma`` is 0."""
    if not (q > 0 and sigma < math.inf and steps >= 1):
        return 0.0
    pld = dp_sgd_pld(max(float(sigma), SIGMA_FLOOR), min(float(q), 1.0), steps)
    return min(EPS_MAX, float(pld.get_epsilon_for_delta(delta)))


def _mean_interval(values: np.ndarray, z: float) -> tuple[float, float, float]:
    mean = float(values.mean())
    half = z * float(values.std(ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def measure(sums: Sequence[float], sums_sq: Sequence[float], included: Sequence[bool], steps: int,
            delta: float, confidence: float = CONFIDENCE) -> MeasuredMechanism:
    """:class:`MeasuredMechanism` from each canary's sum of its ``steps`` observations and sum of
    their squares (units of C) and whether it was ``included`` (module doc)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    inc = np.asarray(included, dtype=bool)
    a = np.asarray(sums, dtype=np.float64) / steps  # each canary's mean observation
    b = np.asarray(sums_sq, dtype=np.float64) / steps  # and mean squared observation
    if inc.sum() < 2 or (~inc).sum() < 2:
        raise ValueError("the measured figure needs at least 2 included and 2 excluded canaries")
    z = float(stats.norm.ppf(1.0 - (1.0 - confidence) / TAILS))
    m1, m1_lo, _ = _mean_interval(a[inc], z)  # q·c
    e2, e2_lo, e2_hi = _mean_interval(b[inc], z)  # q·c² + s²
    v0, v0_lo, v0_hi = _mean_interval(b[~inc], z)  # s²
    m2, m2_lo, m2_hi = e2 - v0, e2_lo - v0_hi, e2_hi - v0_lo  # q·c²
    s, s_b = math.sqrt(max(v0, 0.0)), math.sqrt(max(v0_hi, 0.0))
    if m1 > 0 and m2 > 0:
        q, c = min(1.0, m1 * m1 / m2), m2 / m1
        estimate = dp_sgd_epsilon(s / c, q, steps, delta)
    else:
        q = c = estimate = 0.0
    if not (m1_lo > 0 and m2_hi > 0):
        return MeasuredMechanism(s, c, q, s_b, 0.0, 0.0, int(steps), float(delta), float(confidence), 0.0, estimate)
    lo, q_b, c_b = _least_epsilon(m1_lo, m2_lo, m2_hi, s_b, steps, delta)
    return MeasuredMechanism(s, c, q, s_b, c_b, q_b, int(steps), float(delta), float(confidence), lo, estimate)


def _least_epsilon(qc: float, qc2_lo: float, qc2_hi: float, s: float, steps: int,
                   delta: float) -> tuple[float, float, float]:
    """The least ε over every (q, c) with q·c ≥ ``qc``, q·c² in [``qc2_lo``, ``qc2_hi``], q ≤ 1
    and noise s ≤ ``s``, and the (q, c) it was evaluated at.

    ε falls as s grows and as q·c falls with q fixed (c falls, so s/c grows), so s = ``s`` and
    q·c = ``qc``: c = qc/q, and q runs over [qc²/qc2_hi, min(1, qc²/qc2_lo)]. On a piece
    [q_i, q_i+1] of a geometric grid over it (ratio :data:`Q_RATIO` or finer, at most
    :data:`Q_POINTS` pieces), the noise multiplier s·q/qc is at most s·q_i+1/qc and the rate at
    least q_i, so ε(s·q_i+1/qc, q_i) is below every ε of the piece: the least of these over the
    pieces is a lower bound on the whole range, not a sample of it."""
    q_lo = min(1.0, qc * qc / qc2_hi)
    q_hi = 1.0 if qc2_lo <= qc * qc else qc * qc / qc2_lo
    n = max(1, min(Q_POINTS, math.ceil(math.log(q_hi / q_lo) / math.log(Q_RATIO)))) if q_hi > q_lo else 1
    grid = np.geomspace(q_lo, q_hi, n + 1) if q_hi > q_lo else np.array([q_lo, q_lo])
    best = (math.inf, q_lo, qc / q_lo)
    for qa, qb in zip(grid[:-1], grid[1:]):
        e = dp_sgd_epsilon(s * qb / qc, qa, steps, delta)
        if e < best[0]:
            best = (e, float(qa), float(qc / qb))
    return best
