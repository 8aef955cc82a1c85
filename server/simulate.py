"""N hospitals in one process, for tuning sweeps (no SuperLink, no SuperNodes, no gRPC).

Every simulated hospital runs the real hospital code, :func:`xrayfed.client.hospital.train_round`
(its own partition and validation split, DP plan, privacy ledger in its own state folder,
Opacus DP-SGD, release records), and the global model is the example-weighted mean of the
updates — what Flower's FedAvg computes, or the median / trimmed mean of ``[federation]
aggregator`` — or FedAvgM (server momentum) or FedAdam when
``[federation] strategy`` says so (:class:`ServerOptimizer`, :class:`ServerAdam`), or the step
``auto`` chooses each round from the replies' DP plans (:func:`auto_step`). What it
skips is the transport: gRPC, TLS, SecAgg+, one process per request. On 2 cores that saves the
process start-ups of every round and lets a sweep try many settings; ``bench/federated.py
--engine inprocess`` and ``--engine processes`` run the same settings through both paths so
their figures can be compared.

``dp=False`` is a benchmark-only switch (not reachable from ``hospital.toml`` or any command):
the same code with noise σ = 0 and nothing charged, to show the price of privacy beside
each DP figure. Clipping to C stays (so the learning rate means the same thing).

``tan_scale=k`` is the other benchmark-only switch, for cheap tuning sweeps (Sander et al. 2023,
"TAN without a burn"): each hospital plans its round from its own budget as usual, then trains a
stand-in of that plan with batch B/k and noise σ/k at the same number of steps
(:func:`tan_plan`). The noise in each averaged step (σC/B) and the number of steps are the
plan's, so the accuracy tracks the real plan's while every step costs 1/k of the compute. Its
own privacy is far weaker than the plan's, so it is never a hospital's run: nothing is charged
and its replies report ε = ∞.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from xrayfed.common.config import FederationConfig, HospitalConfig
from xrayfed.common.model import build_model
from xrayfed.common.protocol.rounds import SENT_AN_UPDATE, RoundRequest
from xrayfed.server.aggregation import HospitalPlan, average_noise_ratio, num_parameters
from xrayfed.server.strategy import ServerStep, auto_server_step, pinned_plans, round_lr

if TYPE_CHECKING:
    from xrayfed.client.dp import DPPlan
    from xrayfed.server.model_plan import ModelAdvice

log = logging.getLogger(__name__)


@dataclass
class SimResult:
    """The global model after each round, with the hospitals' replies."""

    state_dict: dict[str, torch.Tensor]
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def tan_plan(plan: DPPlan, k: float) -> DPPlan:
    """Benchmark only: the stand-in of ``plan`` at 1/``k`` of its compute (TAN, Sander et al.
    2023): expected batch B/k (sample rate q/k) and noise multiplier σ/k, at the same number of
    steps. σ/B, the standard deviation of the noise in each averaged gradient (in units of C),
    and the steps are unchanged; the local epochs per round fall to 1/k."""
    if k < 1:
        raise ValueError(f"tan_scale = {k:g}: must be at least 1 (a smaller batch than the plan's)")
    return replace(plan, noise_multiplier=plan.noise_multiplier / k, sample_rate=plan.sample_rate / k,
                   expected_batch_size=max(1, round(plan.expected_batch_size / k)),
                   local_epochs=plan.local_epochs / k)


def _train_benchmark(h: HospitalConfig, req: RoundRequest, state: dict,
                     adjust: Callable[[DPPlan], DPPlan]) -> dict[str, Any]:
    """Benchmark only: the hospital's training code under ``adjust(plan)`` of its own plan (σ = 0
    for the no-DP reference, :func:`tan_plan` for a TAN sweep). No ledger: nothing is charged,
    and the reply's ε is ∞ (the run has no guarantee worth stating)."""
    from xrayfed.client.hospital import checked_model, load_local_data
    from xrayfed.client.dp import plan_for, train_private_round

    data = load_local_data(h, req.image_size, req.task)
    plan, units = plan_for(h, data.train)
    plan = adjust(plan)
    model = checked_model(h, req, state, torch.device("cpu"))
    out = train_private_round(model, units, h, plan, req.task, torch.device("cpu"), lr=req.lr)
    return {"status": "trained", "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "metrics": {"num-examples": plan.num_examples, "epsilon": float("inf"), "train_loss": out["loss"],
                        "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
                        "steps": plan.steps, "examples_seen": out["examples"], "max_grad_norm": plan.max_grad_norm,
                        "momentum": h.training.momentum}}


def weighted_mean(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    return {k: sum(s[k].double() * (w / total) for s, w in zip(states, weights)).to(states[0][k].dtype)
            for k in states[0]}


def aggregate(states: list[dict[str, torch.Tensor]], weights: list[float], how: str = "mean",
              trim_fraction: float = 0.1) -> dict[str, torch.Tensor]:
    """``[federation] aggregator`` over the updates: the example-weighted mean, or the coordinate-
    wise median / trimmed mean of :func:`xrayfed.server.aggregation.robust_aggregate`."""
    if how == "mean":
        return weighted_mean(states, weights)
    from xrayfed.server.aggregation import robust_aggregate

    agg = robust_aggregate([{k: v.numpy() for k, v in s.items()} for s in states], how, trim_fraction)
    return {k: torch.from_numpy(v) for k, v in agg.items()}


class ServerOptimizer:
    """FedAvg (momentum 0) or FedAvgM: ``v ← βv + Δ; w ← w + η v`` with Δ the mean update."""

    def __init__(self, momentum: float = 0.0, server_lr: float = 1.0) -> None:
        self.momentum, self.lr, self.v = momentum, server_lr, None

    def step(self, w: dict[str, torch.Tensor], mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.momentum <= 0 and self.lr == 1.0:
            return mean
        delta = {k: mean[k].double() - w[k].double() for k in w}
        if self.v is None:
            self.v = delta
        else:
            self.v = {k: self.momentum * self.v[k] + delta[k] for k in w}
        return {k: (w[k].double() + self.lr * self.v[k]).to(w[k].dtype) for k in w}


class ServerAdam:
    """FedAdam exactly as Flower's ``flwr.serverapp.strategy.FedAdam`` computes it (Reddi et al.
    2021): with Δ the mean update of round t, ``m ← β₁m + (1 − β₁)Δ``, ``v ← β₂v + (1 − β₂)Δ²``,
    ``w ← w + η_t m / (√v + τ)``, ``η_t = η √(1 − β₂^(t+1)) / (1 − β₁^(t+1))``; η is the server lr
    (``[federation] server_lr``, 0.1 by default), β₁ = 0.9, β₂ = 0.99, τ = 1e-3 (Flower's defaults)."""

    def __init__(self, eta: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> None:
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau
        self.t, self.m, self.v = 0, None, None

    def step(self, w: dict[str, torch.Tensor], mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.t += 1
        delta = {k: mean[k].double() - w[k].double() for k in w}
        if self.m is None:
            self.m = {k: torch.zeros_like(d) for k, d in delta.items()}
            self.v = {k: torch.zeros_like(d) for k, d in delta.items()}
        b1, b2 = self.beta_1, self.beta_2
        self.m = {k: b1 * self.m[k] + (1 - b1) * delta[k] for k in w}
        self.v = {k: b2 * self.v[k] + (1 - b2) * delta[k] ** 2 for k in w}
        eta_t = self.eta * (1 - b2 ** (self.t + 1)) ** 0.5 / (1 - b1 ** (self.t + 1))
        return {k: (w[k].double() + eta_t * self.m[k] / (self.v[k].sqrt() + self.tau)).to(w[k].dtype) for k in w}


def auto_step(replies: list[dict[str, Any]], plans: dict[str, HospitalPlan], num_params: int) -> ServerStep:
    """``[federation] strategy = "auto"``: the server's step for this round's replies, as the
    federation's strategy chooses it (:meth:`xrayfed.server.strategy.XrayAuto.choose_step`):
    from each hospital's plan pinned at its first update and its FedAvg weight."""
    rows = [{**x, "num_examples": x.get("num-examples")} for x in replies if x["status"] in SENT_AN_UPDATE]
    pinned_plans(rows, plans)
    chosen = [(plans[str(x["hospital"])], float(x["num_examples"])) for x in rows if str(x["hospital"]) in plans]
    return auto_server_step(average_noise_ratio(chosen, num_params) if chosen else math.nan)


def simulate(cfg: FederationConfig, hospitals: list[HospitalConfig], *, dp: bool = True, tan_scale: float = 1.0,
             initial: dict[str, torch.Tensor] | None = None,
             on_round: Callable[[int, dict[str, torch.Tensor], list[dict]], None] | None = None) -> SimResult:
    """Run ``cfg.federation.rounds`` rounds with ``hospitals`` (each config names its own
    ``state_dir``); ``on_round(round, global_state, replies)`` after each aggregation. ``dp=False``
    and ``tan_scale`` > 1 are the benchmark-only switches of the module docstring."""
    from xrayfed.client import hospital as H

    H.serve_many_hospitals()
    H.clear_data_caches()  # another federation's scans, if this process ran one before: memory for one at a time
    torch.manual_seed(cfg.federation.seed)
    state = initial if initial is not None else build_model(cfg.model).state_dict()
    fed = cfg.federation
    servers = {"fedavg": ServerOptimizer,
               "fedavgm": lambda: ServerOptimizer(fed.server_momentum, fed.effective_server_lr()),
               "fedadam": lambda: ServerAdam(fed.effective_server_lr()),
               "auto": ServerOptimizer}  # its step is chosen every round below (auto_server_step)
    if fed.strategy not in servers:
        from xrayfed.common.errors import UserError

        raise UserError(f"federation.strategy = {fed.strategy!r}: the in-process simulation runs "
                        f"{', '.join(servers)}")
    server = servers[fed.strategy]()
    plans: dict[str, HospitalPlan] = {}
    if not dp:
        adjust: Callable[[DPPlan], DPPlan] | None = lambda plan: replace(plan, noise_multiplier=0.0)
    elif tan_scale != 1:
        adjust = functools.partial(tan_plan, k=tan_scale)
    else:
        adjust = None  # the product: train_round with its ledger
    res = SimResult(state_dict=state)
    t0 = time.time()
    for r in range(1, cfg.federation.rounds + 1):
        req = RoundRequest(federation=cfg.federation.name, round=r, model=cfg.model, task=cfg.task,
                           image_size=cfg.image_size, lr=round_lr(cfg, r))
        replies, states, weights = [], [], []
        for h in hospitals:
            Path(h.hospital.state_dir).mkdir(parents=True, exist_ok=True)
            reply = H.train_round(h, req.to_config(), state) if adjust is None else _train_benchmark(h, req, state, adjust)
            replies.append({"hospital": h.hospital.name, "status": reply["status"], **reply["metrics"]})
            if reply["status"] in SENT_AN_UPDATE:
                states.append(reply["state_dict"])
                weights.append(float(reply["metrics"]["num-examples"]))
        step = None
        if fed.strategy == "auto":
            step = auto_step(replies, plans, num_parameters(v.numpy() for v in state.values()
                                                             if torch.is_floating_point(v)))
            server.momentum, server.lr = step.momentum, step.lr
        if states:
            state = server.step(state, aggregate(states, weights, fed.aggregator, fed.trim_fraction))
        res.rows.append({"round": r, "hospitals": replies,
                         **({"server_step": {"momentum": step.momentum, "lr": step.lr, "noise_ratio": step.ratio}}
                            if step is not None else {})})
        if on_round is not None:
            on_round(r, state, replies)
    res.state_dict, res.seconds = state, time.time() - t0
    return res


def hospital_plans(fed: FederationConfig, hospitals: list[HospitalConfig]) -> list[tuple[HospitalPlan, float]]:
    """Each hospital's DP plan for ``fed``'s rounds, as its first training reply would report it,
    with the FedAvg weight the server will give it (N in its privacy unit, at most ``[federation]
    max_examples_per_hospital``): what a federation of these hospitals will pin. Decodes each
    hospital's partition (this process's data cache is cleared afterwards). A hospital whose plan
    would be refused is named in the one-line :class:`UserError`."""
    from xrayfed.client import hospital as H
    from xrayfed.client.dp import plan_for
    from xrayfed.common.errors import UserError

    cap = float(fed.federation.max_examples_per_hospital)
    out = []
    try:
        for h in hospitals:
            try:
                plan, _ = plan_for(h, H.load_local_data(h, fed.image_size, fed.task).train)
            except UserError as e:
                err = UserError(f"hospital {h.hospital.name}: {e}")
                err.exit_code = e.exit_code
                raise err from None
            adam = h.training.optimizer == "adam"
            out.append((HospitalPlan(num_examples=plan.num_examples, noise_multiplier=plan.noise_multiplier,
                                     sample_rate=plan.sample_rate, steps=plan.steps,
                                     max_grad_norm=plan.max_grad_norm,
                                     momentum=0.0 if adam else h.training.momentum, adam=adam),
                        min(float(plan.num_examples), cap)))
    finally:
        H.clear_data_caches()
    return out


def planned_model(fed: FederationConfig, hospitals: list[HospitalConfig]) -> ModelAdvice:
    """The model to run ``fed`` with for these hospitals (:func:`xrayfed.server.model_plan.recommend_model`
    from their plans, for a round's mean over as many hospitals as the strategy samples). Plans
    are only computed for a model the rule can narrow."""
    from xrayfed.server.model_plan import narrowable, recommend_model
    from xrayfed.server.stability import per_round

    if not narrowable(fed.model):
        return recommend_model(fed.model, [])
    k = per_round(fed.federation.fraction_train, fed.federation.min_clients, len(hospitals))
    return recommend_model(fed.model, hospital_plans(fed, hospitals), per_round=k)
