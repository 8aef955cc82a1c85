"""The f-DP one-run lower bound on ε (Mahloujifar, Melis & Chaudhuri, "Auditing f-Differential
Privacy in One Run", ICML 2025), beside the (ε, δ) one of :mod:`xrayfed.common.privacy.audit`.

Same game: m canaries, each in training independently with probability 1/2; after training the
auditor makes r guesses (k₊ "in", k₋ "out"), v of them right. The null hypothesis is no longer
"(ε, δ)-DP" but "f-DP in each canary" for a whole tradeoff curve f (type II error ≥ f(type I
error) for every test of one canary's presence, whatever the other canaries): a curve carries
all of a mechanism's (ε, δ(ε)) pairs at once, so its test is not capped by one δ.

**The bound on P[≥ v right].** W = the number of right guesses. Fix canary i and the other
canaries' bits; the event "canary i guessed 'in', and ≥ j − 1 of the other guesses right" is a
test of canary i's presence, so f-DP bounds its probability with canary i in by 1 − f(its
probability with canary i out), and likewise for "out" guesses. Averaging over the two bits, the
other canaries and the m canaries (f is convex, so Jensen keeps the inequality):

    C_j ≤ 1 − f(N_j),   C_j = E[W·1{W ≥ j}] / m,   N_j = E[(r − W)·1{W ≥ j − 1}] / m,   j = 1 … r.

(C_j: the per-canary rate of right guesses in outcomes with at least j right; N_j: of wrong
guesses in outcomes with at least j − 1 right. For symmetric f this is N_j ≥ g(C_j) with
g(x) = f(1 − x).) Every f-DP mechanism and every guesser give a distribution p_w = P[W = w]
meeting these r constraints (g(0) = 0). If P[W ≥ v] ≥ τ, moving the mass above v down to v
keeps them met (for j ≤ v, C_j falls and N_j grows; above, C_j = 0). Moving mass from level w
one step down keeps every constraint met but the (w + 1)-th (for j ≤ w, C_j falls and N_j
grows), so, from level v − 1 down, each level can be cut to the least the
constraint above it needs, the excess pushed one level lower, without adding mass: the total
mass of any feasible distribution is at least that of this greedy one, which is the paper's
recursion (h_i: the least N_{i+1}, s_i: the C_i it implies):

    s_v = τ·v/m,  h_v = τ·(r − v)/m;   for i = v − 1 … 0:
    h_i = max(h_{i+1}, g(s_{i+1})),  s_i = s_{i+1} + i/(r − i)·(h_i − h_{i+1});
    total mass = (m/r)·(s_0 + h_0).

A total above 1 means no f-DP mechanism reaches P[W ≥ v] ≥ τ: the observation rejects f at
level τ (:func:`rejects`); the p-value is the least such τ (:func:`p_value`). Only g's
monotonicity is used after the averaging, so any lower bound on g (a curve from fewer (ε, δ)
pairs, a pessimistic δ(ε), a grid rounded down) keeps the test valid, only less sharp. With the
pure ε-DP curve the test is never sharper than the binomial tail of Steinke et al. (which is
exact there) and equals it for one canary; its gain is for curves such as DP-SGD's, where the
(ε, δ) test has to fix one δ.

**The family.** A rejection of one curve says "this run is less private than that curve";
:func:`search_dp_sgd` and :func:`search_gaussian` scan a one-parameter family and reports the ε (at the claimed δ) of
the least private member still rejected:

* :class:`DpSgdCurve` (the default, :func:`audit`): DP-SGD itself with the claimed sample rate q
  and step count T and noise multiplier σ′, its curve from the privacy profile δ(ε) of
  dp-accounting's pessimistic PLD (Poisson-subsampled Gaussian, add-or-remove, both
  directions): f(α) = sup_ε max(0, 1 − δ(ε) − e^ε·α, e^{−ε}·(1 − δ(ε) − α)). The bound is the ε
  (at the claimed δ) of the smallest σ′ still rejected: "this run is less private than DP-SGD
  with (σ′, q, T) would be". That is a statement about the whole curve, not about one (ε, δ)
  pair: a run can be (ε, δ)-DP and still fail DP-SGD(σ′)'s curve, so the number is "ε of the
  DP-SGD this run is less private than", not a lower bound on the run's own ε at δ. Above the
  claimed ε it proves that the run is not the mechanism its accountant accounted for (the
  accountant's ε is derived from exactly that curve). A correct run is f_σ-DP for its own σ, so
  σ is rejected with probability at most β and the bound stays below the ε its accountant
  states (up to the accountants' tolerance: the claim is Opacus PRV's ε, the bound the PLD's).
* :class:`GaussianCurve` (μ-GDP, the paper's experiments): a rejection says "not μ-GDP". A
  correct DP-SGD run is not exactly μ-GDP for the μ whose ε(δ) equals its claim, so this family
  is used only where the mechanism is Gaussian (the tests' simulated canaries).

Guess counts: as in :func:`xrayfed.common.privacy.audit.audit`, a fixed grid, β split over it.
Pure numpy/scipy plus dp-accounting (itself numpy/scipy): no torch.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import special

# EPS_MAX: the largest ε a bound reports, as the (ε, δ) audit's
from xrayfed.common.privacy.audit import EPS_MAX, GUESS_FRACTIONS, guess_counts, ranked

#: The ε grid of a DP-SGD curve's (ε, δ(ε)) pairs: a sup over fewer pairs is a lower curve (valid).
EPS_GRID = np.linspace(0.0, 80.0, 1601)
#: The rates x at which a DP-SGD curve's g(x) = f(1 − x) is tabulated: log-spaced near 0 and near 1
#: (steps of at most 1.4 % of x and 1.9 % of 1 − x), plus 0 and 1.
X_GRID = np.unique(np.concatenate([[0.0, 1.0], np.logspace(-18, 0, 3001), 1.0 - np.logspace(-12, -0.3, 1501)]))
#: PLD value discretization at σ ≥ 1, ×σ⁻² below (the losses spread as σ⁻²; dp-accounting's pessimistic
#: estimate over-states δ(ε) at any discretization, so a coarser one is valid, only less sharp).
PLD_DISCRETIZATION = 1e-3
#: The σ′ search: from σ·2^-LO_OCTAVES to σ·2^HI_OCTAVES, to a relative precision of 2^-STEPS·(range).
LO_OCTAVES, HI_OCTAVES, SEARCH_STEPS = 4, 6, 16


class Curve:
    """A symmetric tradeoff curve f, given by g(x) = f(1 − x): the least per-canary rate of wrong
    guesses that goes with a rate x of right ones (increasing, g(0) = 0)."""

    name = "curve"

    def g(self, x: float) -> float:
        raise NotImplementedError

    def f(self, alpha: float) -> float:
        """f(α): the least type II error at type I error α."""
        return self.g(1.0 - alpha)

    def epsilon(self, delta: float) -> float:
        """The ε at which this curve is (ε, ``delta``)-DP (the least, up to its accountant)."""
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


class GaussianCurve(Curve):
    """μ-GDP: f(α) = Φ(Φ⁻¹(1 − α) − μ), g(x) = Φ(Φ⁻¹(x) − μ)."""

    name = "gaussian"

    def __init__(self, mu: float) -> None:
        if not mu >= 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        self.mu = float(mu)

    def g(self, x: float) -> float:
        if x <= 0.0:
            return 0.0
        if x >= 1.0:
            return 1.0
        return float(special.ndtr(special.ndtri(x) - self.mu))

    def epsilon(self, delta: float) -> float:
        return gaussian_epsilon(self.mu, delta)

    def describe(self) -> dict:
        return {"family": "gaussian", "mu": self.mu}


class EpsDeltaCurve(Curve):
    """(ε, δ)-DP: f(α) = max(0, 1 − δ − e^ε·α, e^{−ε}·(1 − δ − α))."""

    name = "eps-delta"

    def __init__(self, epsilon: float, delta: float = 0.0) -> None:
        self.eps, self.delta = float(epsilon), float(delta)

    def g(self, x: float) -> float:
        return max(0.0, math.exp(-self.eps) * (x - self.delta), 1.0 - self.delta - math.exp(self.eps) * (1.0 - x))

    def epsilon(self, delta: float) -> float:
        return self.eps  # one (ε, δ) pair: its ε

    def describe(self) -> dict:
        return {"family": "eps-delta", "epsilon": self.eps, "delta": self.delta}


def gaussian_delta(mu: float, epsilon: float) -> float:
    """δ(ε) of μ-GDP: Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2) (Dong, Roth & Su, Corollary 2.13)."""
    if mu <= 0:
        return 0.0
    a, b = -epsilon / mu + mu / 2, -epsilon / mu - mu / 2
    return float(special.ndtr(a) - math.exp(epsilon + special.log_ndtr(b)))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The least ε with δ(ε) ≤ ``delta`` for μ-GDP (bisection to 10⁻⁹; capped at :data:`EPS_MAX`)."""
    if mu <= 0 or gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, EPS_MAX
    if gaussian_delta(mu, hi) > delta:
        return EPS_MAX
    while hi - lo > 1e-9:
        mid = (lo + hi) / 2
        if gaussian_delta(mu, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def dp_sgd_pld(sigma: float, q: float, steps: int):
    """dp-accounting's pessimistic privacy loss distribution of ``steps`` steps of DP-SGD with
    noise multiplier ``sigma`` and Poisson rate ``q`` (add-or-remove one unit; discretization
    :data:`PLD_DISCRETIZATION`, finer below σ = 1)."""
    from dp_accounting.pld import privacy_loss_distribution as pld_mod

    return pld_mod.from_gaussian_mechanism(
        float(sigma), sensitivity=1.0, sampling_prob=float(q),
        value_discretization_interval=PLD_DISCRETIZATION * max(1.0, float(sigma) ** -2),
        pessimistic_estimate=True).self_compose(int(steps))


class DpSgdCurve(Curve):
    """The curve of T steps of DP-SGD with Poisson rate q and noise multiplier σ (add-or-remove
    one unit), from dp-accounting's pessimistic PLD: g is tabulated on :data:`X_GRID` as the
    sup over :data:`EPS_GRID` of the (ε, δ(ε)) curves and read rounded down (a lower g: valid)."""

    name = "dp-sgd"

    def __init__(self, sigma: float, q: float, steps: int) -> None:
        if not (sigma > 0 and 0 < q <= 1 and steps >= 1):
            raise ValueError(f"need sigma > 0, 0 < q <= 1, steps >= 1; got {sigma}, {q}, {steps}")
        self.sigma, self.q, self.steps = float(sigma), float(q), int(steps)
        self._pld = dp_sgd_pld(self.sigma, self.q, self.steps)
        deltas = np.clip(np.asarray(self._pld.get_delta_for_epsilon(EPS_GRID), dtype=np.float64), 0.0, 1.0)
        g = np.zeros_like(X_GRID)
        for eps, d in zip(EPS_GRID, deltas):  # f(1 − x) ≥ e^{−ε}(x − δ) and 1 − δ − e^ε(1 − x)
            np.maximum(g, math.exp(-eps) * (X_GRID - d), out=g)
            np.maximum(g, 1.0 - d - math.exp(eps) * (1.0 - X_GRID), out=g)
        self._x = X_GRID.tolist()
        self._g = np.maximum.accumulate(g).tolist()  # already increasing; guards rounding

    def g(self, x: float) -> float:
        if x <= 0.0:
            return 0.0
        k = bisect.bisect_right(self._x, x) - 1  # the grid point at or below x
        return self._g[k]

    def epsilon(self, delta: float) -> float:
        return min(EPS_MAX, float(self._pld.get_epsilon_for_delta(delta)))

    def describe(self) -> dict:
        return {"family": "dp-sgd", "noise_multiplier": self.sigma, "sample_rate": self.q, "steps": self.steps}


@functools.lru_cache(maxsize=32)
def dp_sgd_curve(sigma: float, q: float, steps: int) -> DpSgdCurve:
    """:class:`DpSgdCurve`, cached (searches for the same plan revisit the same σ′)."""
    return DpSgdCurve(sigma, q, steps)


def least_mass(curve: Curve, m: int, r: int, v: int, tau: float) -> float:
    """The least total probability a distribution of W can have while meeting every f-DP
    constraint (module doc) with P[W ≥ v] ≥ ``tau``: above 1, no f-DP mechanism gets there. (The
    recursion stops once the mass is over 1: the value returned is then above 1, not the least.)"""
    if not (0 <= v <= r <= m and r >= 1):
        raise ValueError(f"need 0 <= v <= r <= m, r >= 1, got v={v}, r={r}, m={m}")
    limit = r / m  # s_0 + h_0 of a distribution of total mass 1
    s, h = tau * v / m, tau * (r - v) / m
    g = curve.g
    for i in range(v - 1, -1, -1):
        need = g(s)
        if need <= h:  # nothing below needs more mass: s and h stay as they are
            break
        s += i / (r - i) * (need - h)
        h = need
        if s + h > limit * (1 + 1e-12):
            break  # already over: rejected
    return (s + h) / limit


def rejects(curve: Curve, m: int, r: int, v: int, beta: float) -> bool:
    """Whether ``v`` or more right of ``r`` guesses on ``m`` canaries rejects ``curve`` at level
    ``beta``: every ``curve``-DP mechanism gives P[≥ v right] < ``beta``."""
    if v == 0:
        return False
    return least_mass(curve, m, r, v, beta) > 1.0 + 1e-12


def p_value(curve: Curve, m: int, r: int, v: int, tol: float = 1e-9) -> float:
    """An upper bound (to ``tol``) on P[≥ ``v`` right of ``r`` guesses] over every mechanism that
    is ``curve``-DP in each of ``m`` canaries."""
    if v == 0 or not rejects(curve, m, r, v, 1.0):
        return 1.0
    lo, hi = 0.0, 1.0  # hi: rejected (infeasible), lo: feasible
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if rejects(curve, m, r, v, mid):
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class FdpBound:
    """The f-DP audited lower bound and the curve that gave it."""

    epsilon_lower_bound: float
    confidence: float
    delta: float
    family: str
    curve: dict | None  # the least private member still rejected (None: none was)
    guesses: int
    correct: int

    def to_dict(self) -> dict:
        return asdict(self)


def _first_rejecting(curve, candidates: Sequence[tuple[int, int, int]], level: float) -> tuple[int, int] | None:
    """(r, v) of the first candidate (m, r, v) whose observation rejects ``curve`` at ``level``."""
    for m, r, v in candidates:
        if v and rejects(curve, m, r, v, level):
            return r, v
    return None


def _least_private_rejected(make_curve, candidates, level: float, safe: float, unsafe: float,
                            steps: int | None = None, tol: float = 1e-6):
    """Bisection over a one-parameter family ``make_curve(t)`` that grows less private from
    ``safe`` to ``unsafe`` (t may run either way): the t nearest ``unsafe`` still rejected by some
    candidate, with that candidate's (r, v); ``(None, None)`` when even ``safe`` is not rejected.
    ``steps`` bisection steps, or until the bracket is below ``tol``."""
    best = _first_rejecting(make_curve(safe), candidates, level)
    if best is None:
        return None, None
    top = _first_rejecting(make_curve(unsafe), candidates, level)
    if top is not None:
        return unsafe, top
    done = 0
    while (done < steps) if steps is not None else abs(unsafe - safe) > tol:  # safe rejected, unsafe not
        mid = (safe + unsafe) / 2
        got = _first_rejecting(make_curve(mid), candidates, level)
        if got is None:
            unsafe = mid
        else:
            safe, best = mid, got
        done += 1
    return safe, best


def search_dp_sgd(candidates: Sequence[tuple[int, int, int]], sigma: float, q: float, steps: int, delta: float,
                  beta: float, tests: int | None = None) -> FdpBound:
    """The smallest σ′ (to 2⁻¹⁶ of the 10 searched octaves around ``sigma``) whose DP-SGD(σ′, ``q``,
    ``steps``) curve some candidate (m, r, v) rejects at ``beta`` / ``tests`` (default: one test
    per candidate; more when the candidates are some of a larger grid); its ε at ``delta``. Below
    σ·2⁻⁴ the search stops: a bound from there is that member's ε."""
    level = beta / (tests or len(candidates))
    log2_sigma, best = _least_private_rejected(lambda t: dp_sgd_curve(2.0 ** t, q, steps), candidates, level,
                                               safe=math.log2(sigma) + HI_OCTAVES,
                                               unsafe=math.log2(sigma) - LO_OCTAVES, steps=SEARCH_STEPS)
    if best is None:
        return FdpBound(0.0, 1 - beta, delta, "dp-sgd", None, 0, 0)
    curve = dp_sgd_curve(2.0 ** log2_sigma, q, steps)
    return FdpBound(curve.epsilon(delta), 1 - beta, delta, "dp-sgd", curve.describe(), *best)


def search_gaussian(candidates: Sequence[tuple[int, int, int]], delta: float, beta: float,
                    tests: int | None = None, mu_max: float = 40.0) -> FdpBound:
    """The largest μ whose μ-GDP curve some candidate rejects at ``beta`` / ``tests`` (default: one
    per candidate), to 10⁻⁶; its ε at ``delta``."""
    level = beta / (tests or len(candidates))
    mu, best = _least_private_rejected(GaussianCurve, candidates, level, safe=0.0, unsafe=mu_max)
    if best is None:
        return FdpBound(0.0, 1 - beta, delta, "gaussian", None, 0, 0)
    return FdpBound(gaussian_epsilon(mu, delta), 1 - beta, delta, "gaussian", {"family": "gaussian", "mu": mu},
                    *best)


def search_eps_delta(candidates: Sequence[tuple[int, int, int]], delta: float, beta: float,
                     tests: int | None = None) -> FdpBound:
    """The largest ε whose (ε, ``delta``) curve some candidate rejects at ``beta`` / ``tests``
    (default: one per candidate), to 10⁻⁶: a lower bound on ε at ``delta`` in the (ε, δ) sense
    (rejecting that curve is rejecting (ε, δ)-DP), from the f-DP analysis instead of Steinke et
    al.'s δ term."""
    level = beta / (tests or len(candidates))
    eps, best = _least_private_rejected(lambda e: EpsDeltaCurve(e, delta), candidates, level, safe=0.0,
                                        unsafe=EPS_MAX)
    if best is None:
        return FdpBound(0.0, 1 - beta, delta, "eps-delta", None, 0, 0)
    return FdpBound(eps, 1 - beta, delta, "eps-delta", EpsDeltaCurve(eps, delta).describe(), *best)


def observed(scores: Sequence[float], included: Sequence[bool],
             fractions: Sequence[float] = GUESS_FRACTIONS) -> list[tuple[int, int, int]]:
    """(m, r, v) for each guess count of the grid, with the same ranking (and tie-breaking) as
    :func:`xrayfed.common.privacy.audit.audit`."""
    order, inc = ranked(scores, included)
    m = len(order)
    out = []
    for kp, km in guess_counts(m, fractions):
        top, bottom = order[m - kp:], order[:km]
        out.append((m, kp + km, int(inc[top].sum() + (~inc[bottom]).sum())))
    return out


def audit(scores: Sequence[float], included: Sequence[bool], delta: float, claimed: tuple[float, float, int],
          confidence: float = 0.95, fractions: Sequence[float] = GUESS_FRACTIONS) -> FdpBound:
    """The f-DP one-run bound against the DP-SGD family of the ``claimed`` (σ, q, T): the ε at
    ``delta`` of the least private DP-SGD(σ′, q, T) that the canaries' guesses reject, at
    ``confidence`` over the guess-count grid (Bonferroni, as the (ε, δ) audit)."""
    sigma, q, steps = claimed
    return search_dp_sgd(observed(scores, included, fractions), sigma, q, steps, delta, 1.0 - confidence)
