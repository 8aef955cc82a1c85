"""The model width to plan a federation with, from its hospitals' DP plans.

The DP noise in the mean of a round's updates grows with the square root of the number of
weights d (:func:`xrayfed.server.aggregation.average_noise_ratio`), so for many small hospitals a
narrower model carries less of it; :func:`recommend_model` says which width, and
:class:`ModelAdvice` the line and the ``[model]`` key that fixes it. ``xrayfed simulate`` plans
its run's model with it (:func:`xrayfed.server.simulate.planned_model`), and the ``auto``
strategy tells the operator of a running federation, at the first round it aggregates (not again
after a resume), what a new run would plan (:class:`xrayfed.server.strategy.XrayAuto`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from xrayfed.common.modelspec import ModelSpec
from xrayfed.server.aggregation import HospitalPlan, sampled_noise_ratio

#: Above this noise ratio ρ of the mean update (the DP noise's norm over the largest norm its
#: signal can have: :func:`~xrayfed.server.aggregation.average_noise_ratio`),
#: :func:`recommend_model` narrows a ScatterNet XrayNet.
NARROW_NOISE_RATIO = 1.0
#: The narrowest width :func:`recommend_model` goes to (width 8 lost on validation at 100 hospitals).
NARROWEST_WIDTH = 16


def num_weights(spec: ModelSpec) -> int:
    """How many weights the model ``spec`` trains (d in the noise ratio; builds it on the CPU)."""
    from xrayfed.common.model import build_model

    return int(sum(p.numel() for p in build_model(spec).parameters() if p.requires_grad))


@dataclass(frozen=True)
class ModelAdvice:
    """The model to plan a federation with (:func:`recommend_model`): ``spec``, and ``ratio`` the
    noise ratio ρ of the mean update at its ``weights`` (nan when unknown); ``given``,
    ``given_ratio`` and ``given_weights`` the same for the model it was judged from."""

    spec: ModelSpec
    ratio: float
    weights: int
    given: ModelSpec
    given_ratio: float
    given_weights: int

    @property
    def changed(self) -> bool:
        return self.spec != self.given

    def describe(self) -> str:
        """One line: the model, and why."""
        if self.changed:
            return (f"XrayNet width {self.spec.width} ({self.weights:,} weights): DP noise in the mean update "
                    f"{self.ratio:.2f} × its largest signal, against {self.given_ratio:.2f} at width "
                    f"{self.given.width} ({self.given_weights:,} weights)"
                    + (f"; the narrowest planned, still above {NARROW_NOISE_RATIO:g}"
                       if self.ratio > NARROW_NOISE_RATIO else ""))
        what = (f"XrayNet width {self.given.width}" if self.given.arch == "xraynet" else self.given.arch) + \
            f" ({self.given_weights:,} weights) as configured"
        if not narrowable(self.given):
            return (f"{what}: its convolutions learn the features from the pixels, and a narrower one lost more "
                    "than the noise it saves")
        if not math.isfinite(self.ratio):
            return f"{what}: the noise in the mean update is unknown (no DP-SGD plan, or Adam hospitals)"
        if self.ratio <= NARROW_NOISE_RATIO:
            return (f"{what}: DP noise in the mean update {self.ratio:.2f} × its largest signal (narrowed only "
                    f"above {NARROW_NOISE_RATIO:g})")
        return (f"{what}, the narrowest planned: DP noise in the mean update {self.ratio:.2f} × its largest "
                "signal")

    def toml(self) -> str:
        """The ``[model]`` key that fixes this model in ``federation.toml``."""
        return f"[model] width = {self.spec.width}"


def narrowable(spec: ModelSpec) -> bool:
    """Whether :func:`recommend_model` may narrow ``spec``: an XrayNet with the ScatterNet front end."""
    return spec.arch == "xraynet" and spec.scattering


def recommend_model(spec: ModelSpec, plans: Sequence[tuple[HospitalPlan, float]],
                    per_round: int | None = None) -> ModelAdvice:
    """The model width to plan a federation of hospitals with DP plans and FedAvg weights
    ``plans`` with, starting from ``spec`` (the product's default model for the scan size, or the
    operator's); ``per_round``: how many of them each round aggregates (all when None), the noise
    ratio is that of such a round's mean (:func:`~xrayfed.server.aggregation.sampled_noise_ratio`).

    The DP noise in the mean update grows with the square root of the number of weights d, so a
    narrower model carries less of it. The rule narrows only an XrayNet with the fixed
    ScatterNet front end (the default below 56 px), whose convolutions are a head on fixed
    features: while ρ at its width is above :data:`NARROW_NOISE_RATIO`, its width halves, down to
    :data:`NARROWEST_WIDTH`. Measured (PneumoniaMNIST 28 px, ε = 8, 20 rounds; docs/benchmarks.md):
    100 hospitals of 42 scans (ρ 1.37 at width 32, 0.86 at width 16) climbed faster at width 16
    on validation (rounds 5–6) and ended equal, and width 8 was worse. A model whose convolutions
    learn the features from pixels keeps its width: 30 hospitals of about 75 patients at 224 px
    (ρ 2.06 at width 32) lost on validation at width 16 (0.934–0.950 against 0.961–0.968)."""
    plans = list(plans)
    d = num_weights(spec)
    rho = sampled_noise_ratio(plans, d, per_round)  # nan without plans
    best, best_rho, best_d = spec, rho, d
    if narrowable(spec):
        while math.isfinite(best_rho) and best_rho > NARROW_NOISE_RATIO and best.width // 2 >= NARROWEST_WIDTH:
            best = best.model_copy(update={"width": best.width // 2})
            best_d = num_weights(best)
            best_rho = sampled_noise_ratio(plans, best_d, per_round)
    return ModelAdvice(spec=best, ratio=best_rho, weights=best_d, given=spec, given_ratio=rho, given_weights=d)
