"""An empirical lower bound on ε from one training run (Steinke, Nasr & Jagielski, "Privacy
auditing with one (1) training run", NeurIPS 2023).

m canaries are each included in training independently with probability 1/2. After training an
auditor scores every canary, guesses "in" for the k₊ highest scores and "out" for the k₋
lowest and abstains on the rest: r = k₊ + k₋ guesses, v of them correct. If training is
(ε, δ)-DP with respect to one canary (one privacy unit), the number of correct guesses is
stochastically dominated by Binomial(r, e^ε / (1 + e^ε)) up to a δ term (their Theorem 3.1 and
Algorithm 3 / Proposition 5.7), so the p-value of observing ≥ v correct is at most

    β(ε, δ) = P[Binomial(r, p_ε) ≥ v] + 2·m·δ·max_{1≤i≤v} P[v − i ≤ Binomial(r, p_ε) < v] / i,
    p_ε = e^ε / (1 + e^ε).

The audited lower bound at confidence 1 − β is the largest ε whose p-value is still below β:
the run is then *not* (ε, δ)-DP, except with probability β. It is a lower bound — evidence of a
bug when it exceeds the claimed ε, never a proof that there is none when it does not.

Guess counts: choosing k₊, k₋ after seeing which choice gives the largest bound would be a
multiple test, so :func:`audit` tries a fixed grid of :data:`GUESS_FRACTIONS` and splits β
over it (Bonferroni): each candidate is judged at β / len(grid), and the largest of their
bounds is reported at the stated confidence 1 − β.

Pure numpy/scipy: no torch, no training (the canaries and their scores are the hospital's,
:mod:`xrayfed.client.audit`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats

#: Fractions f of the canaries guessed on: k₊ = k₋ = ⌊f·m / 2⌋ (the top and bottom scores).
GUESS_FRACTIONS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0)
#: The file an audit result is written to (a hospital's ``state_dir``) and where reports look for it.
AUDIT_FILE = "audit.json"
#: The largest ε the bisection considers (beyond it every p-value is 1 up to float precision).
EPS_MAX = 60.0


def exceeds_claim(claimed: float, figure: float | None) -> bool:
    """Whether an audit figure (the f-DP figure, or the measured ε) is above the ``claimed`` ε by
    more than the accountants' tolerance (:func:`xrayfed.common.privacy.accounting.tolerance`):
    the claim is the training accountant's ε of (σ, q, T) (Opacus PRV, or RDP), the figures are
    dp-accounting PLD's; a correct run's figure is at most PLD's ε of its own (σ, q, T) except with
    the test's β, and the project's accountants agree to within the tolerance. ``None`` (no such
    figure): not exceeded."""
    from xrayfed.common.privacy.accounting import tolerance

    return figure is not None and figure > claimed + tolerance(claimed)


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[≥ v of r guesses correct] when training is (``epsilon``, ``delta``)-DP
    in each of ``m`` canaries included independently with probability 1/2 (module formula)."""
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, p))  # P[Binomial(r, p) ≥ v]
    alpha = 0.0
    if delta > 0:
        below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[B = v−1], P[B = v−2], …, P[B = 0]
        alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05) -> float:
    """The largest ε (to 10⁻⁶) whose :func:`p_value` is below ``beta``: with probability at
    least 1 − ``beta`` training is not (ε, ``delta``)-DP for any smaller ε. 0 when even ε = 0
    cannot be rejected."""
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, EPS_MAX  # p_value(lo) < beta, p_value grows with ε
    if p_value(m, r, v, hi, delta) < beta:
        return hi
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class AuditBound:
    """The audited lower bound and how it was reached (counts in canaries)."""

    epsilon_lower_bound: float  # the audited lower bound on ε
    confidence: float  # 1 − β
    delta: float  # δ of the null hypothesis (the claimed δ)
    canaries: int  # m
    included: int  # canaries that were in training
    guesses: int  # r = k₊ + k₋ of the best grid candidate
    correct: int  # v
    k_plus: int
    k_minus: int

    def to_dict(self) -> dict:
        return asdict(self)


def guess_counts(m: int, fractions: Sequence[float] = GUESS_FRACTIONS) -> list[tuple[int, int]]:
    """The (k₊, k₋) grid for ``m`` canaries: ⌊f·m/2⌋ top and bottom guesses for each fraction f
    (duplicates and empty guesses dropped)."""
    out: list[tuple[int, int]] = []
    for f in fractions:
        k = int(f * m // 2)
        if k >= 1 and (k, k) not in out:
            out.append((k, k))
    return out


def ranked(scores: Sequence[float], included: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """The canaries in ascending order of score (ties broken at random, seeded by the scores, so
    the order is a function of its inputs) and the inclusion bits as a boolean array."""
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    if s.shape != inc.shape or s.ndim != 1 or len(s) < 2:
        raise ValueError("scores and included must be equally long 1-d sequences of at least 2 canaries")
    if not np.all(np.isfinite(s)):
        raise ValueError("canary scores must be finite")
    seed = int.from_bytes(hashlib.sha256(s.tobytes()).digest()[:8], "little")
    tie = np.random.default_rng(seed).random(len(s))
    return np.lexsort((tie, s)), inc


def audit(scores: Sequence[float], included: Sequence[bool], delta: float, confidence: float = 0.95,
          fractions: Sequence[float] = GUESS_FRACTIONS) -> AuditBound:
    """The one-run lower bound from canary ``scores`` (higher = "more likely in") and whether
    each canary was ``included``: for every (k₊, k₋) of :func:`guess_counts`, guess, count the
    correct guesses and bound ε at β / (grid size); the largest bound is returned (valid at
    ``confidence`` = 1 − β by the union bound). Ties in score are broken at random (seeded by
    the scores, so the result is a function of its inputs)."""
    order, inc = ranked(scores, included)
    m = len(order)
    grid = guess_counts(m, fractions)
    beta = 1.0 - confidence
    best = AuditBound(0.0, confidence, delta, m, int(inc.sum()), 0, 0, 0, 0)
    for kp, km in grid:
        top, bottom = order[m - kp:], order[:km]
        v = int(inc[top].sum() + (~inc[bottom]).sum())
        eps = epsilon_lower_bound(m, kp + km, v, delta, beta / len(grid))
        if eps > best.epsilon_lower_bound:
            best = AuditBound(eps, confidence, delta, m, int(inc.sum()), kp + km, v, kp, km)
    return best


def attack_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of a membership-inference attack whose score is higher for members (e.g. minus
    the loss): P[member score > non-member score] + ½·P[equal] (Mann–Whitney U / (n₁·n₀))."""
    a = np.asarray(member_scores, dtype=np.float64)
    b = np.asarray(nonmember_scores, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("attack AUC needs members and non-members")
    ranks = stats.rankdata(np.concatenate([a, b]))
    u = ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2
    return float(u / (len(a) * len(b)))


@dataclass(frozen=True)
class SignalCheck:
    """The canaries' measured signal-to-noise against what the accountant's inputs imply.

    A canary's summed observations over T steps are q·T·s + N(0, T·σ²) (s: its clipped
    contribution per sampled step, C = 1). The measured strength μ̂ = (mean of the included
    canaries' sums − mean of the excluded) / (std of the excluded) estimates q·√T·s/σ; the
    accountant's inputs (σ, q, T, s = 1) imply μ = q·√T/σ. A lower confidence bound on μ̂ above μ
    means the training gives a canary more weight than the accountant was told (too little
    noise, no clipping, a sample rate above the one accounted for). It assumes the mechanism is
    a sum of clipped contributions plus Gaussian noise (unlike :func:`audit`, which assumes
    nothing), and checks the accountant's inputs, not its arithmetic."""

    measured: float  # μ̂
    measured_lower: float  # its lower confidence bound
    implied: float  # μ from the accountant's inputs
    confidence: float

    @property
    def ratio_lower(self) -> float:
        """``measured_lower / implied``: above 1, the accountant was told too little."""
        return self.measured_lower / self.implied if self.implied > 0 else math.inf

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio_lower": self.ratio_lower, "exceeds": self.ratio_lower > 1.0}


def signal_check(sums: Sequence[float], included: Sequence[bool], implied: float,
                 confidence: float = 0.999) -> SignalCheck:
    """:class:`SignalCheck` from the canaries' summed observations (units of C). The lower
    bound is one-sided at ``confidence`` (normal approximation of the difference of means; the
    excluded canaries' std is estimated from thousands of them)."""
    s = np.asarray(sums, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    a, b = s[inc], s[~inc]
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the signal check needs at least 2 included and 2 excluded canaries")
    sd = float(b.std(ddof=1))
    if sd <= 0:
        return SignalCheck(math.inf, math.inf, float(implied), confidence)
    diff = float(a.mean() - b.mean())
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    z = float(stats.norm.ppf(confidence))
    return SignalCheck(diff / sd, (diff - z * se) / sd, float(implied), confidence)
