"""How much one hospital can move the global model: the server's bounds and robust aggregators.

A hospital's update is DP-SGD under a plan it reports with every reply (N, σ, q, steps, C)
and the learning rate the server sent. These defences follow, applied by the strategy
(:mod:`xrayfed.server.strategy`) before anything is aggregated (the in-process benchmark engine,
:mod:`xrayfed.server.simulate`, whose hospitals are all honest, applies the aggregator only):

* **The plan is pinned at a hospital's first reply** (:class:`HospitalPlan`): a later reply
  whose N, σ, q, steps or C differ is rejected, so a hospital cannot widen its own bounds
  during a run (its budget was planned once, for the whole run: an honest plan never changes).
* **A norm bound from the plan** (:func:`dp_update_bound`): the farthest a DP-SGD round of that
  plan can move the weights with SGD and momentum μ — every clipped per-sample gradient
  pointing the same way, plus the Gaussian noise at a high quantile. An update farther from
  the global model than that did not come from the plan it claims and is rejected. The
  federation's ``max_update_norm`` stays an absolute ceiling (and the only bound for Adam).
* **A cap on the weight a hospital can claim** (:func:`capped_weight`): ``num-examples`` at most
  the N of its pinned plan and at most ``[federation] max_examples_per_hospital``.
* **Optional robust aggregation** (:func:`robust_aggregate`, ``[federation] aggregator``):
  the coordinate-wise median or trimmed mean of the accepted updates (unweighted) instead of
  the example-weighted mean; what it costs in accuracy is in docs/benchmarks.md.

The same plans tell the server how noisy the mean of a round's updates is
(:func:`average_noise_ratio`): ``[federation] strategy = "auto"`` chooses the server's momentum
and learning rate from it (:func:`xrayfed.server.strategy.auto_server_step`).

What stays possible (docs/guarantees.md): a hospital can still move the model anywhere within
its bound every round, in the direction it likes (its updates are DP-noised, not verified). Under
SecAgg+ the server sees only the sum, so only the sum's finiteness and ``max_update_norm`` are
checked, the weight cap is SecAgg+'s ``max_weight``, and robust aggregation is refused.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass
from typing import Any, Iterable, Sequence

import numpy as np

#: How far above the mean a Poisson batch or a Gaussian norm is taken (standard deviations):
#: an honest round exceeds its bound with probability far below 1e-9.
TAIL_SDS = 6.0


@dataclass(frozen=True)
class HospitalPlan:
    """A hospital's DP plan as it reports it with a training reply (units in the names)."""

    num_examples: int  # N
    noise_multiplier: float  # σ
    sample_rate: float  # q = B / N
    steps: int  # DP-SGD steps per round
    max_grad_norm: float  # C
    momentum: float = 0.9  # SGD momentum μ (the hospital's training.momentum)
    adam: bool = False  # the hospital trains with Adam (no plan-derived bound)

    #: fields an honest hospital never changes during a run (N is pinned too, as the cap on its weight)
    PINNED = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "momentum", "adam")

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "HospitalPlan | None":
        """The plan in a metrics row (None when the reply did not carry one)."""
        try:
            plan = cls(num_examples=int(row["num_examples"]), noise_multiplier=float(row["noise_multiplier"]),
                       sample_rate=float(row["sample_rate"]), steps=int(row["steps"]),
                       max_grad_norm=float(row["max_grad_norm"]), momentum=float(row.get("momentum", 0.9)),
                       adam=bool(row.get("adam", False)))
        except (KeyError, TypeError, ValueError, OverflowError):
            return None
        if not (plan.num_examples >= 1 and plan.steps >= 1 and 0 < plan.sample_rate <= 1 and
                plan.noise_multiplier >= 0 and plan.max_grad_norm > 0 and 0 <= plan.momentum < 1
                and all(math.isfinite(v) for v in (plan.noise_multiplier, plan.max_grad_norm))):
            return None
        return plan

    def differences(self, other: "HospitalPlan") -> list[str]:
        """The pinned fields where ``other`` differs (``name a → b``)."""
        out = []
        for f in self.PINNED:
            a, b = getattr(self, f), getattr(other, f)
            if (a != b) if isinstance(a, (bool, int)) else not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12):
                out.append(f"{f} {a:g} → {b:g}")
        return out


def _momentum_gains(plan: HospitalPlan) -> list[float]:
    """a_k = (1 − μ^k)/(1 − μ), k = 1..T: how much step T − k + 1's gradient moves the weights by
    the end of the round under SGD with momentum μ (in units of the client learning rate)."""
    mu = plan.momentum
    return [(1 - mu ** k) / (1 - mu) for k in range(1, plan.steps + 1)]


def dp_update_bound(plan: HospitalPlan, lr: float, num_params: int) -> float:
    """The largest L2 distance ‖w_T − w_0‖₂ one round of ``plan`` can put between a hospital's
    update and the global model, at client learning rate ``lr`` over ``num_params`` weights
    (SGD with momentum μ; ``inf`` for Adam).

    After T steps of ``v ← μv + g``, ``w ← w − ηv``, the displacement is
    η Σ_k a_k g_{T−k+1} with a_k = (1 − μ^k)/(1 − μ). Each g is (Σ clipped per-sample
    gradients + N(0, σ²C²I))/B with B = qN: the clipped sums of all steps together are at most
    C × (examples sampled), below TB + 6√(TB) with overwhelming probability (Poisson sampling),
    and the noise part is Gaussian with norm below (η σ C / B) √(Σ a_k²) (√d + 6). The noise term
    is doubled so that an average of iterates (EMA) or the largest of them stays inside."""
    if plan.adam:
        return math.inf
    t = plan.steps
    a = _momentum_gains(plan)
    b = max(plan.sample_rate * plan.num_examples, 1e-12)
    sampled = (t * b + TAIL_SDS * math.sqrt(t * b)) / (t * b)  # ≥ 1: a heavier than expected draw
    signal = lr * plan.max_grad_norm * sum(a) * sampled
    noise = 2 * lr * plan.noise_multiplier * plan.max_grad_norm / b * math.sqrt(sum(x * x for x in a)) * (
        math.sqrt(num_params) + TAIL_SDS)
    return signal + noise


def average_noise_ratio(plans: Sequence[tuple[HospitalPlan, float]], num_params: int) -> float:
    """How much of the weighted mean of one round's updates is DP noise: the expected L2 norm of
    the noise in the mean, divided by the largest norm its signal can have (all clipped
    per-sample gradients of every hospital pointing the same way). Dimensionless; a pure
    function of the hospitals' plans (N, σ, q, steps, C, μ) and weights, which the server knows
    from their replies, and of the model's ``num_params`` weights. The client learning rate
    cancels.

    Hospital i's update carries, per weight, Gaussian noise of standard deviation
    s_i = σ_i C_i / B_i × √(Σ a_k²) and a signal of norm at most g_i = C_i Σ a_k (B_i = q_i N_i,
    a_k from :func:`_momentum_gains`). The mean with weights w_i (summing to 1) has noise of norm
    about √d × √(Σ w_i² s_i²) and signal at most Σ w_i g_i. Many hospitals of few units each
    raise it (each B_i is small); more hospitals of the same size lower it as 1/√N.
    Adam hospitals and an empty list give ``nan`` (nothing to judge)."""
    total = float(sum(w for _, w in plans if w > 0))
    if total <= 0 or any(p.adam for p, _ in plans):
        return math.nan
    var = signal = 0.0
    for plan, w in plans:
        if w <= 0:
            continue
        a = _momentum_gains(plan)
        b = max(plan.sample_rate * plan.num_examples, 1e-12)
        s = plan.noise_multiplier * plan.max_grad_norm / b * math.sqrt(sum(x * x for x in a))
        var += (w / total) ** 2 * s * s
        signal += (w / total) * plan.max_grad_norm * sum(a)
    return math.sqrt(num_params * var) / signal


def sampled_noise_ratio(plans: Sequence[tuple[HospitalPlan, float]], num_params: int, per_round: int | None = None,
                        draws: int = 1000, seed: int = 0) -> float:
    """:func:`average_noise_ratio` of the mean of one round when the strategy aggregates only
    ``per_round`` of the hospitals ``plans`` (Flower samples them afresh every round): the mean
    over ``draws`` random samples of that size, drawn from the plans in a fixed order with a
    fixed ``seed`` (the same answer for the same hospitals, in whatever order they are given).
    All of them when ``per_round`` is None or at least their number; ``nan`` as for the whole
    set when any hospital trains with Adam or none has a positive weight."""
    plans = sorted(plans, key=lambda pw: (float(pw[1]), astuple(pw[0])))
    whole = average_noise_ratio(plans, num_params)
    if per_round is None or per_round >= len(plans) or per_round < 1 or math.isnan(whole):
        return whole
    import random

    rng = random.Random(seed)
    ratios = [average_noise_ratio(rng.sample(plans, per_round), num_params) for _ in range(draws)]
    ratios = [r for r in ratios if not math.isnan(r)]  # a sample of weightless hospitals only
    return sum(ratios) / len(ratios) if ratios else math.nan


def capped_weight(claimed: float, plan: HospitalPlan | None, cap: float) -> float:
    """The FedAvg weight a hospital gets for claiming ``claimed`` examples: at most the N of its
    pinned ``plan`` and at most ``cap`` (``[federation] max_examples_per_hospital``)."""
    w = float(claimed) if math.isfinite(float(claimed)) and float(claimed) > 0 else 0.0
    if plan is not None:
        w = min(w, float(plan.num_examples))
    return min(w, float(cap))


def update_distance(update: dict[str, Any], reference: dict[str, Any]) -> float:
    """‖update − reference‖₂ over every floating-point array (name → array)."""
    sq = 0.0
    for k, ref in reference.items():
        u = np.asarray(update[k])
        if np.issubdtype(u.dtype, np.floating):
            sq += float(np.sum((u.astype(np.float64) - np.asarray(ref, dtype=np.float64)) ** 2))
    return math.sqrt(sq)


def robust_aggregate(updates: Sequence[dict[str, Any]], how: str, trim_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """The coordinate-wise ``median`` or ``trimmed_mean`` (dropping the ``trim_fraction`` largest
    and smallest values of each coordinate, at least one each when 3 or more updates) of
    ``updates`` (name → array), unweighted: one hospital moves each coordinate at most to the
    others' range, whatever its weight or norm."""
    if how not in ("median", "trimmed_mean"):
        raise ValueError(f"aggregator {how!r}: median or trimmed_mean")
    out: dict[str, np.ndarray] = {}
    n = len(updates)
    for k in updates[0]:
        stack = np.stack([np.asarray(u[k]) for u in updates]).astype(np.float64)
        if how == "median":
            agg = np.median(stack, axis=0)
        else:
            cut = min(max(int(math.floor(trim_fraction * n)), 1 if n >= 3 else 0), (n - 1) // 2)
            s = np.sort(stack, axis=0)
            agg = s[cut:n - cut].mean(axis=0)
        out[k] = agg.astype(np.asarray(updates[0][k]).dtype)
    return out


def num_parameters(reference: Iterable[Any]) -> int:
    """How many floating-point weights a model's arrays hold."""
    return int(sum(np.asarray(v).size for v in reference if np.issubdtype(np.asarray(v).dtype, np.floating)))
