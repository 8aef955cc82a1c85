"""Round-to-round stability of a federation's global model, and the server step to plan with.

A federation of many small hospitals can reach a good AUC in one round and lose it in the next
(the mean update is mostly DP noise): the last round's AUC alone does not say whether the model
an operator would deploy is a good one. :func:`round_stability` measures it from the AUC after
every round; :func:`recommend_step` gives the server step ``[federation] strategy = "auto"``
takes for the hospitals of a run (from the DP plans in their replies), and the ``[federation]``
keys that fix it. (The model width to plan such a federation with:
:mod:`xrayfed.server.model_plan`.)
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from xrayfed.server.aggregation import HospitalPlan, sampled_noise_ratio
from xrayfed.server.strategy import ServerStep, auto_server_step, pinned_plans

#: The rounds a model needs to settle are not judged: the first quarter of the run, at most 5.
SETTLE_ROUNDS = 5


@dataclass(frozen=True)
class RoundStability:
    """How steady the global model's AUC was over rounds (AUC in [0, 1]; rounds 1-based).

    ``after``: the rounds judged are those after this one (the first quarter of the run, at
    most :data:`SETTLE_ROUNDS`); ``min_auc`` the lowest AUC among them, ``max_drop`` the largest
    fall from one round to the next among them, ``std_last`` the standard deviation over the
    last ``last`` rounds (0 with fewer than 2)."""

    rounds: int
    after: int
    min_auc: float
    max_drop: float
    std_last: float
    last: int

    def line(self) -> str:
        return (f"round-to-round stability (AUC after round {self.after}): lowest {self.min_auc:.3f}, largest fall "
                f"between two rounds {self.max_drop:.3f}, std of the last {self.last} rounds {self.std_last:.3f}")

    def to_dict(self) -> dict[str, float]:
        return {"after_round": self.after, "min_auc": self.min_auc, "max_drop": self.max_drop,
                "std_last": self.std_last, "last_rounds": self.last}


def round_stability(aucs: Sequence[float], last: int = 5) -> RoundStability:
    """:class:`RoundStability` of the AUC after each round (``aucs[0]`` is round 1's)."""
    aucs = [float(a) for a in aucs]
    if not aucs:
        raise ValueError("no rounds")
    after = min(SETTLE_ROUNDS, len(aucs) // 4)
    drops = [aucs[i - 1] - aucs[i] for i in range(max(after, 1), len(aucs))]  # into each judged round
    tail = aucs[-last:]
    return RoundStability(rounds=len(aucs), after=after, min_auc=min(aucs[after:]), max_drop=max([0.0, *drops]),
                          std_last=statistics.pstdev(tail) if len(tail) > 1 else 0.0, last=len(tail))


def recommend_step(rows: Iterable[dict[str, Any]], num_params: int, per_round: int | None = None,
                   max_weight: float = math.inf) -> ServerStep:
    """The step ``strategy = "auto"`` takes for the hospitals in metrics rows ``rows`` (each
    with ``hospital``, ``status``, ``num_examples`` and its DP plan): their plans pinned at
    their first update, weighted by their N (at most ``max_weight``, the federation's
    ``max_examples_per_hospital``), ``per_round`` of them aggregated per round (all when None)."""
    return auto_server_step(sampled_noise_ratio(hospital_weights(rows, max_weight), num_params, per_round))


def hospital_weights(rows: Iterable[dict[str, Any]], max_weight: float = math.inf
                     ) -> list[tuple[HospitalPlan, float]]:
    """Each hospital's plan pinned at its first update in metrics rows ``rows``, with the FedAvg
    weight the server gives it (its N, at most ``max_weight``)."""
    return [(p, min(float(p.num_examples), float(max_weight))) for p in pinned_plans(list(rows)).values()]


def per_round(fraction: float, min_clients: int, n: int) -> int:
    """How many of ``n`` connected hospitals Flower's strategy samples each round:
    ``max(⌊fraction × n⌋, min_clients)``, at most ``n``."""
    return max(1, min(n, max(int(n * fraction), min_clients)))
