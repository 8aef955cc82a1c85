"""A second opinion on every ε: recompute it with an accountant independent of training.

Hospitals train with Opacus' accountants (PRV by default, RDP selectable; :func:`compute_epsilon`,
the one function every ε of training comes from). Reports recompute every ε from the logged
(σ, q, steps) with Google's ``dp-accounting`` package, a separate implementation of the
same mathematics, and show both numbers:

* **PLD** (privacy-loss distribution, ``dp_accounting.pld.PLDAccountant``, pessimistic
  discretisation 10⁻³, an upper bound): near-tight, like PRV. It is the independent value for a hospital that
  trained with PRV.
* **RDP** (Rényi DP, ``dp_accounting.rdp.RdpAccountant``, its default orders): an upper
  bound that is looser than PRV/PLD. It is the independent value for a hospital that trained
  with RDP.

The event per DP-SGD step is ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` under
add/remove-one adjacency (what Opacus accounts for), self-composed ``steps`` times per round.

Agreement (the tolerance is stated in every report):

* ``tolerance(ε) = max(0.05, 0.02·ε)``. Observed gaps are far smaller: Opacus' PRV returns
  its upper estimate (estimate + 0.01) and PLD lands ≈ 0.01 below it (a coarser 10⁻²
  discretisation would add up to 0.03 over 1000 steps); Opacus' and Google's RDP differ only by
  their grids of orders (< 0.5 %).
* training accountant PRV: ``|PLD − PRV| ≤ tolerance`` and ``RDP ≥ PRV − tolerance`` (an
  upper bound may not be below a tight value).
* training accountant RDP: ``|RDP_google − RDP_opacus| ≤ tolerance`` and
  ``PLD ≤ RDP_opacus + tolerance``.

Every ε a ledger or the server states (one per round) is checked against its like-for-like
independent value; ε spent (the recomputed total) is checked against both. Anything else is a
disagreement and is flagged in the report.

Histories are lists ``[(σ, q, steps), ...]`` (one entry per round); consecutive rounds with the
same σ and q are merged into one entry with the summed steps before Opacus sees them: the
composition is the same (results match to 10⁻⁹) and the PRV accountant is much faster.
"""

from __future__ import annotations

import functools
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Sequence

History = Sequence[tuple[float, float, int]]

TOL_ABS = 0.05
TOL_REL = 0.02
PLD_DISCRETIZATION = 1e-3

TOLERANCE_TEXT = (
    "Agreement: tolerance(ε) = max(0.05, 0.02·ε). Trained with PRV: the independent PLD must satisfy "
    "|PLD − PRV| ≤ tolerance (every ε), and the looser RDP upper bound RDP ≥ PRV − tolerance (ε spent). "
    "Trained with RDP: the independent RDP must satisfy |RDP − RDP_opacus| ≤ tolerance (every ε), and "
    "PLD ≤ RDP_opacus + tolerance (ε spent)."
)


def tolerance(epsilon: float) -> float:
    """Largest gap between two accountants that still counts as agreement (see module doc)."""
    return max(TOL_ABS, TOL_REL * abs(float(epsilon)))


def merge_history(history: Iterable[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Merge consecutive entries with equal (σ, q) into one entry with the summed steps."""
    out: list[tuple[float, float, int]] = []
    for s, q, n in history:
        s, q, n = float(s), float(q), int(n)
        if n <= 0:
            continue
        if out and out[-1][0] == s and out[-1][1] == q:
            out[-1] = (s, q, out[-1][2] + n)
        else:
            out.append((s, q, n))
    return out


def compute_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str = "prv") -> float:
    """ε at ``delta`` after composing ``history`` = [(σ, q, steps), ...] with Opacus' accountant
    (PRV or RDP): what the hospital's ledger records and checks before every round."""
    if not history:
        return 0.0
    # Consecutive rounds with equal (σ, q) compose into one entry: same ε, constant cost per call.
    return _opacus_epsilon(tuple(merge_history(history)), float(delta), accountant)


@functools.lru_cache(maxsize=1024)
def _opacus_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """:func:`compute_epsilon`'s accountant call on a merged history. A pure function of its
    arguments, so cached: a hospital asks for the same ε several times a round (what it spent,
    what the round would spend, its budget's check), and hospitals with the same plan in one
    process (a simulation) ask for the same ones; each call costs PRV tenths of a second."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():
        # Opacus PRV: log(0) at q = 1, and its RDP-based domain bound's "largest alpha" hint: harmless,
        # and never a line in a hospital's, the server's or data check's output.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta))


def training_epsilon(history: History, delta: float, accountant: str = "prv") -> float:
    """ε at ``delta`` with the training accountant (Opacus, exactly as the hospital computes it)."""
    return compute_epsilon(merge_history(history), delta, accountant)


def _step_event(sigma: float, q: float, steps: int):
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(float(q), dp_accounting.GaussianDpEvent(float(sigma))), int(steps)
    )


def _pld_accountant(discretization: float = PLD_DISCRETIZATION):
    import dp_accounting
    from dp_accounting import pld

    return pld.PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                             value_discretization_interval=discretization)


def _rdp_accountant():
    import dp_accounting
    from dp_accounting import rdp

    return rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)


def _epsilons_at(history: History, ks: Iterable[int], delta: float, method: str) -> dict[int, float]:
    """``{k: ε after history[:k]}`` with one incremental dp-accounting accountant.

    Between two requested prefixes the rounds are merged before composing, so asking only for
    the final ε costs one composition per distinct (σ, q).
    """
    acc = _pld_accountant() if method == "pld" else _rdp_accountant()
    out: dict[int, float] = {}
    prev, composed = 0, False
    with _quiet_absl():  # RDP: small orders that fail to converge are dropped with a log line each
        for k in sorted(set(int(k) for k in ks)):
            for s, q, n in merge_history(history[prev:k]):
                acc.compose(_step_event(s, q, n))
                composed = True
            prev = max(prev, k)
            out[k] = float(acc.get_epsilon(delta)) if composed else 0.0
    return out


def pld_epsilons(history: History, delta: float) -> list[float]:
    """ε after each entry of ``history`` (cumulative), with dp-accounting's PLD accountant."""
    e = _epsilons_at(history, range(1, len(history) + 1), delta, "pld")
    return [e[k] for k in range(1, len(history) + 1)]


def rdp_epsilons(history: History, delta: float) -> list[float]:
    """ε after each entry of ``history`` (cumulative), with dp-accounting's RDP accountant."""
    e = _epsilons_at(history, range(1, len(history) + 1), delta, "rdp")
    return [e[k] for k in range(1, len(history) + 1)]


@contextmanager
def _quiet_absl():
    log = logging.getLogger("absl")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


@dataclass(frozen=True)
class Opinion:
    """The second opinion on one ε (cumulative, at one δ)."""

    training_accountant: str  # "prv" | "rdp"
    epsilon: float  # the ε being checked (training accountant, as logged / reported / recomputed)
    independent_method: str  # "pld" | "rdp" (dp-accounting)
    independent_epsilon: float  # the like-for-like independent value
    pld_epsilon: float | None  # dp-accounting PLD (near-tight); None when not computed
    rdp_epsilon: float | None  # dp-accounting RDP (upper bound); None when not computed
    tolerance: float
    agrees: bool
    reason: str  # empty when they agree

    @property
    def difference(self) -> float:
        return self.independent_epsilon - self.epsilon


def judge(epsilon: float, pld_eps: float | None, rdp_eps: float | None, accountant: str) -> Opinion:
    """Compare a training-accountant ε with the dp-accounting values (rules in the module doc).

    The like-for-like value (PLD for PRV, RDP for RDP) is required; the other one is checked
    when given.
    """
    tol = tolerance(epsilon)
    reasons = []
    if accountant == "rdp":
        if rdp_eps is None:
            raise ValueError("an RDP-trained ε needs the independent RDP value")
        indep_method, indep = "rdp", rdp_eps
        if abs(rdp_eps - epsilon) > tol:
            reasons.append(f"dp-accounting RDP ε = {rdp_eps:.4f} differs from the training RDP ε = {epsilon:.4f} "
                           f"by more than {tol:.3f}")
        if pld_eps is not None and pld_eps > epsilon + tol:
            reasons.append(f"the tight PLD ε = {pld_eps:.4f} exceeds the RDP upper bound ε = {epsilon:.4f} "
                           f"by more than {tol:.3f}")
    else:
        if pld_eps is None:
            raise ValueError("a PRV-trained ε needs the independent PLD value")
        indep_method, indep = "pld", pld_eps
        if abs(pld_eps - epsilon) > tol:
            reasons.append(f"dp-accounting PLD ε = {pld_eps:.4f} differs from the training PRV ε = {epsilon:.4f} "
                           f"by more than {tol:.3f}")
        if rdp_eps is not None and rdp_eps < epsilon - tol:
            reasons.append(f"the RDP upper bound ε = {rdp_eps:.4f} is below the PRV ε = {epsilon:.4f} "
                           f"by more than {tol:.3f}")
    return Opinion(
        training_accountant=accountant,
        epsilon=float(epsilon),
        independent_method=indep_method,
        independent_epsilon=float(indep),
        pld_epsilon=None if pld_eps is None else float(pld_eps),
        rdp_epsilon=None if rdp_eps is None else float(rdp_eps),
        tolerance=tol,
        agrees=not reasons,
        reason="; ".join(reasons),
    )


class EpsilonClaim(NamedTuple):
    """An ε to check: ``epsilon`` claimed after the first ``rounds`` entries of a history, at
    ``delta``, by the ``accountant`` that trained; ``both``: also apply the other rule."""

    rounds: int
    epsilon: float
    delta: float
    accountant: str
    both: bool = False


def second_opinions(history: History, checks: Sequence[EpsilonClaim | tuple]) -> list[Opinion]:
    """One :class:`Opinion` per check ``(k, claimed ε, δ, training accountant[, both])``.

    ``claimed`` is a cumulative ε after the first ``k`` entries of ``history`` (``k = 0``: no
    spend yet, the independent ε is 0). Each check gets its like-for-like independent value
    (PLD for PRV, RDP for RDP); with ``both`` true it also gets the other one and both rules
    apply. The dp-accounting accountants run incrementally, once per distinct δ.
    """
    claims = [EpsilonClaim(*c) for c in checks]
    out: list[Opinion | None] = [None] * len(claims)
    for d in sorted({float(c.delta) for c in claims}):
        idx = [i for i, c in enumerate(claims) if float(c.delta) == d]
        need: dict[str, set[int]] = {"pld": set(), "rdp": set()}
        for i in idx:
            c = claims[i]
            need["rdp" if c.accountant == "rdp" else "pld"].add(int(c.rounds))
            if c.both:
                need["pld" if c.accountant == "rdp" else "rdp"].add(int(c.rounds))
        vals = {m: (_epsilons_at(history, ks, d, m) if ks else {}) for m, ks in need.items()}
        for i in idx:
            c = claims[i]
            out[i] = judge(c.epsilon, vals["pld"].get(int(c.rounds)), vals["rdp"].get(int(c.rounds)), c.accountant)
    return out  # type: ignore[return-value]


def second_opinion(history: History, epsilon: float, delta: float, accountant: str = "prv") -> Opinion:
    """The second opinion (both rules) on one cumulative ε after the whole ``history``."""
    return second_opinions(history, [(len(history), epsilon, delta, accountant, True)])[0]


def rounds_that_fit(history: History, next_round: tuple[float, float, int], delta: float, budget: float,
                    accountant: str = "prv", cap: int = 10_000, guess: int | None = None) -> int:
    """Largest k ≤ ``cap`` such that ``history`` + k × ``next_round`` stays within ``budget``.

    The same test the hospital applies before each round (``PrivacyLedger.charge``), with the
    training accountant. The search starts from ``guess`` — by default the answer of a coarse
    PLD accountant, which is within a round or two — and gallops outwards, so it usually takes
    two or three evaluations of the (slow) training accountant.
    """
    hist = list(history)
    s, q, n = next_round
    fits = _fits_within(lambda k: training_epsilon(hist + [(s, q, int(n) * k)], delta, accountant), budget)
    if guess is None:
        guess = _coarse_guess(hist, next_round, delta, budget, cap)
    return _gallop(fits, max(1, min(cap, int(guess))), cap)


def _fits_within(epsilon_after: Callable[[int], float], budget: float) -> Callable[[int], bool]:
    """``fits(k)``: do k more rounds keep ε (``epsilon_after(k)``) within ``budget``? Memoised;
    k ≤ 0 always fits."""
    seen: dict[int, bool] = {}

    def fits(k: int) -> bool:
        if k <= 0:
            return True
        if k not in seen:
            seen[k] = epsilon_after(k) <= budget
        return seen[k]

    return fits


def _gallop(fits, g: int, cap: int) -> int:
    step = 1
    if fits(g):
        lo = g
        while True:
            hi = lo + step
            if hi > cap:
                return cap if fits(cap) else _bisect(fits, lo, cap)
            if not fits(hi):
                return _bisect(fits, lo, hi)
            lo, step = hi, step * 2
    hi = g
    while True:
        lo = max(0, hi - step)
        if fits(lo):
            return _bisect(fits, lo, hi)
        hi, step = lo, step * 2


def _coarse_guess(hist: list, next_round: tuple[float, float, int], delta: float, budget: float, cap: int) -> int:
    """Rounds that fit under a fast, coarse PLD accountant (discretisation 10⁻²): a guess."""
    s, q, n = next_round

    def coarse_epsilon(k: int) -> float:
        acc = _pld_accountant(1e-2)
        for e in merge_history(hist + [(s, q, int(n) * k)]):
            acc.compose(_step_event(*e))
        return acc.get_epsilon(delta)

    return _gallop(_fits_within(coarse_epsilon, budget), 1, cap)


def _bisect(fits, lo: int, hi: int) -> int:
    """``fits(lo)`` is true and ``fits(hi)`` false: the largest k in [lo, hi) that fits."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
