"""The hospital's DP plan: σ, q and steps per round so that its planned rounds fit its own (ε, δ)
(:func:`plan_dp`), and the automatic batch size and local epochs (:func:`auto_training`)."""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable

from xrayfed.client.dp import faults
from xrayfed.common.config import HospitalConfig
from xrayfed.common.errors import UserError
from xrayfed.common.privacy.accounting import compute_epsilon


class BudgetExceeded(UserError):
    """Another round would take the hospital past its (ε, δ) budget."""


@dataclass(frozen=True)
class DPPlan:
    """DP-SGD settings for one round of one hospital (units in the field names)."""

    noise_multiplier: float  # σ: noise std / clip norm
    sample_rate: float  # q: Poisson sampling probability per example per step
    steps: int  # DP-SGD steps per round
    max_grad_norm: float  # C: per-sample L2 clip norm
    expected_batch_size: int  # q·N
    num_examples: int  # N: training examples at this hospital
    epsilon_budget: float  # ε for the whole federation run
    delta: float  # δ
    max_rounds: int  # rounds the budget is planned for
    accountant: str
    local_epochs: float = 1.0  # passes over the data per round (steps = ⌈epochs / q⌉)
    settings_source: str = "hospital.toml"  # or "auto": B and epochs derived by auto_training
    unit: str = "scan"  # what N, B and the guarantee count: "patient" or "scan"
    num_scans: int = 0  # training scans behind the N units (= N for the scan unit)
    max_scans_per_patient: int = 1  # unit = patient: scans averaged into one contribution (≤ C)
    most_scans_of_one_patient: int | None = None  # when the data knows its patients (group privacy at the scan unit)

    @property
    def unit_plural(self) -> str:
        return "patients" if self.unit == "patient" else "scans"


#: The rule behind the automatic batch size and local epochs (chosen on validation sweeps with
#: the in-process simulation, docs/accuracy.md): large logical batches (a quarter of the
#: hospital's scans, at least 256 — all of them below that — at most 2048) and fewer passes
#: over the data per round at small ε, where each pass costs more noise.
AUTO_BATCH = {"fraction_of_n": 0.25, "min": 256, "max": 2048}
#: (ε below, local epochs over the whole plan): spread over ``max_rounds`` rounds, and over
#: :data:`AUTO_MIN_ROUNDS` when fewer are planned (a short plan does not train longer per round).
AUTO_EPOCHS = ((2.0, 10.0), (float("inf"), 25.0))
AUTO_MIN_ROUNDS = 5


def auto_training(num_examples: int, epsilon: float, batch_size: int | None = None,
                  local_epochs: float | None = None, max_rounds: int = AUTO_MIN_ROUNDS) -> tuple[int, float]:
    """``(batch size B, local epochs per round)`` for a hospital with ``num_examples`` training
    scans, budget ``epsilon`` planned for ``max_rounds`` rounds; a value the hospital set in
    ``hospital.toml`` is kept.

    A hospital states only its budget: B = clamp(N/4, 256, 2048) (≤ N), and 10 local epochs in
    all below ε = 2, else 25, spread evenly over the planned rounds (2 or 5 per round over 5
    rounds or fewer, 0.5 or 1.25 over 20). The same epochs over more rounds were better at
    ε = 1 and no worse at ε = 8 (docs/accuracy.md). Both are decided at the hospital, from its own
    N and plan, and recorded in every ``train`` line of the ledger (as q = B/N and steps)."""
    if batch_size is None:
        b = int(round(num_examples * AUTO_BATCH["fraction_of_n"]))
        batch_size = max(1, min(num_examples, max(AUTO_BATCH["min"], min(AUTO_BATCH["max"], b))))
    if local_epochs is None:
        total = next(e for below, e in AUTO_EPOCHS if epsilon < below)
        local_epochs = total / max(AUTO_MIN_ROUNDS, int(max_rounds))
    return int(batch_size), float(local_epochs)


#: Longest plan (max_rounds × steps per round) each accountant is asked to compose. Opacus' PRV
#: accountant's memory grows with the number of steps (1.4 GB at 60 k steps here); RDP's does not.
MAX_PLANNED_STEPS = {"prv": 50_000, "rdp": 10_000_000}


#: The largest σ the search tries before it calls a budget impossible.
MAX_SIGMA = 1e6


def smallest_sigma(eps_of: Callable[[float], float], target: float, tolerance: float = 0.01,
                   max_calls: int = 60) -> float:
    """A σ with ``eps_of(σ) ≤ target`` for a decreasing ``eps_of``, and as far as the search
    gets within ``max_calls``, ``eps_of(σ) ≥ target − tolerance`` (what Opacus'
    ``get_noise_multiplier`` returns, bisecting from σ = 10). The bracket is found by doubling
    or halving from σ = 1, then narrowed by regula falsi on (log σ, log ε), each point kept
    inside the middle 90 % of the bracket: about 6 calls of ``eps_of`` where bisection takes
    about 16 (each a PRV composition: tenths of a second). An ``eps_of`` that raises, or returns
    NaN, counts as ε = ∞: the σ returned was always seen to meet the target. Raises ValueError
    when even :data:`MAX_SIGMA` does not."""
    calls = 0

    def eps(sigma: float) -> float:
        nonlocal calls
        calls += 1
        try:
            e = float(eps_of(sigma))
        except (ValueError, OverflowError, FloatingPointError, ZeroDivisionError, MemoryError):
            return math.inf
        return e if e == e else math.inf  # NaN: not shown to meet anything

    hi, e_hi = 1.0, eps(1.0)
    lo, e_lo = 0.0, math.inf
    while e_hi > target:
        if hi >= MAX_SIGMA:
            raise ValueError(f"no σ up to {MAX_SIGMA:g} spends at most ε = {target:g}")
        lo, e_lo = hi, e_hi
        hi = min(hi * 2, MAX_SIGMA)
        e_hi = eps(hi)
    if lo == 0.0:
        while True:  # σ = 1 already meets the target: halve until it does not
            cand = hi / 2
            e = eps(cand)
            if e > target:
                lo, e_lo = cand, e
                break
            hi, e_hi = cand, e
            if hi < 1e-6 or calls >= max_calls:
                return hi
    while target - e_hi > tolerance and hi / lo > 1 + 1e-9 and calls < max_calls:
        a, b = math.log(lo), math.log(hi)
        x = (a + b) / 2
        if math.isfinite(e_lo) and e_lo > 0 and e_hi > 0:
            ya, yb = math.log(e_lo / target), math.log(e_hi / target)  # ya > 0 ≥ yb
            if ya != yb:
                x = a + (b - a) * ya / (ya - yb)
        x = min(max(x, a + 0.05 * (b - a)), b - 0.05 * (b - a))
        sigma = math.exp(x)
        e = eps(sigma)
        if e <= target:
            hi, e_hi = sigma, e
        else:
            lo, e_lo = sigma, e
    return hi


@functools.lru_cache(maxsize=64)
def _noise_for_budget(epsilon: float, delta: float, q: float, steps: int, max_rounds: int, accountant: str) -> float:
    """The smallest σ (searched to ε − 0.01, :func:`smallest_sigma`) for which ``max_rounds``
    rounds of ``steps`` DP-SGD steps at sample rate ``q`` spend at most (``epsilon``, ``delta``),
    checked with the exact round-by-round composition the ledger uses. A pure function of its
    arguments, so cached: a hospital plans every round with the same inputs (the search costs
    seconds)."""
    def eps_of(sigma: float) -> float:
        return compute_epsilon([(sigma, q, steps)] * max_rounds, delta, accountant)

    try:
        with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha" (PRV is used)
            warnings.simplefilter("ignore")
            sigma = smallest_sigma(eps_of, epsilon, tolerance=0.01)
    except (ValueError, OverflowError, MemoryError, FloatingPointError):
        raise UserError(
            f"privacy.epsilon = {epsilon:g} (δ = {delta:g}) cannot be met by {max_rounds} round(s) of "
            f"{steps} DP-SGD steps at q = {q:.3g}, even with noise σ = 10⁶; raise epsilon, or lower max_rounds "
            "or training.local_epochs") from None
    while not eps_of(sigma) <= epsilon:  # the search's own check, kept as the plan's guard (NaN included)
        sigma *= 1.01
    return sigma


def plan_dp(cfg: HospitalConfig, num_examples: int, unit: str = "scan", num_scans: int | None = None) -> DPPlan:
    """σ, q and steps for one round so that ``max_rounds`` rounds fit the hospital's (ε, δ).

    ``num_examples`` is N in the privacy ``unit`` (patients or scans, :func:`privacy_units`):
    B, q = B/N, the epochs and δ < 1/N all count units. Refuses (one-line :class:`UserError`,
    before anything trains) a δ at or above 1/N, a plan longer than the accountant can compose
    (:data:`MAX_PLANNED_STEPS`) and a budget that no σ can meet.
    """
    word = "patients" if unit == "patient" else "scans"
    if num_examples < 2:
        raise UserError(f"data: {num_examples} training {word}; DP training needs at least 2")
    p, t = cfg.privacy, cfg.training
    if p.delta >= 1.0 / num_examples:
        suggest = 10 ** math.floor(math.log10(0.1 / num_examples))
        raise UserError(f"privacy.delta = {p.delta:g}: must be below 1/N = {1.0 / num_examples:.3g} for this "
                        f"hospital's N = {num_examples} training {word} (with δ ≥ 1/N the guarantee allows "
                        f"releasing a {word[:-1]} outright); use e.g. δ = {suggest:g}")
    batch_size, local_epochs = auto_training(num_examples, p.epsilon, t.batch_size, t.local_epochs, p.max_rounds)
    q = min(1.0, batch_size / num_examples)
    steps = max(1, math.ceil(local_epochs / q))
    total = steps * p.max_rounds
    if total > MAX_PLANNED_STEPS[p.accountant]:
        raise UserError(
            f"privacy.max_rounds = {p.max_rounds} × {steps} DP-SGD steps per round = {total} steps: more than the "
            f"{p.accountant.upper()} accountant composes here ({MAX_PLANNED_STEPS[p.accountant]}); lower "
            "max_rounds or training.local_epochs, raise training.batch_size"
            + (", or use privacy.accountant = \"rdp\"" if p.accountant == "prv" else ""))
    sigma = p.noise_multiplier
    if sigma is None:
        sigma = _noise_for_budget(float(p.epsilon), float(p.delta), float(faults.accountant_rate(q)), int(steps),
                                  int(p.max_rounds), p.accountant)
    return DPPlan(
        noise_multiplier=float(sigma),
        sample_rate=float(q),
        steps=int(steps),
        max_grad_norm=float(p.max_grad_norm),
        expected_batch_size=max(1, int(round(q * num_examples))),
        num_examples=int(num_examples),
        epsilon_budget=float(p.epsilon),
        delta=float(p.delta),
        max_rounds=int(p.max_rounds),
        accountant=p.accountant,
        local_epochs=float(local_epochs),
        settings_source="auto" if (t.batch_size is None or t.local_epochs is None) else "hospital.toml",
        unit=unit,
        num_scans=int(num_scans if num_scans is not None else num_examples),
        max_scans_per_patient=int(p.max_scans_per_patient) if unit == "patient" else 1,
    )
