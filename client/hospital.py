"""What a hospital does when the federation asks it to train or evaluate.

The hospital's scans are loaded here, inside the hospital's own process, and never leave it:
replies carry model weights (after DP-SGD), counts and privacy figures only. Every privacy
decision is delegated to :mod:`xrayfed.client.privacy`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from xrayfed.common.checkpoint import load_weights, weights_version
from xrayfed.common.config import HospitalConfig, load_config
from xrayfed.common.errors import UserError
from xrayfed.common.model import ModelSpec, build_model
from xrayfed.common.tasks import TaskSpec
from xrayfed.common.train import evaluate, resolve_device

from .privacy import BudgetExceeded, PrivacyLedger, ReleaseCache, plan_dp, request_key, train_private_round

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundRequest:
    """What the server sends with a round (no privacy parameter among them)."""

    federation: str
    round: int
    model: ModelSpec
    task: TaskSpec
    image_size: int
    lr: float
    proximal_mu: float = 0.0

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> "RoundRequest":
        try:
            task = json.loads(str(c["task"]))
            return cls(
                federation=str(c["federation"]),
                round=int(c["round"]),
                model=ModelSpec(**json.loads(str(c["model"]))),
                task=TaskSpec(kind=task["kind"], class_names=tuple(task["class_names"])),
                image_size=int(c["image-size"]),
                lr=float(c["lr"]),
                proximal_mu=float(c.get("proximal-mu", 0.0)),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"round request from the server is malformed ({type(e).__name__}: {e})") from None


@dataclass
class LocalData:
    train: Any
    val: Any
    skipped: int


@lru_cache(maxsize=4)
def _load_local(path: str, split: str, image_size: int, task_json: str, val_fraction: float, partition: str | None,
                scheme: str, alpha: float, seed: int) -> LocalData:
    from xrayfed.common import data as D

    t = json.loads(task_json)
    task = TaskSpec(kind=t["kind"], class_names=tuple(t["class_names"]))
    ds = D.load_dataset(Path(path), split=split, image_size=image_size, task=task)
    if ds.task.class_names != task.class_names or ds.task.kind != task.kind:
        raise UserError(
            f"data {path}: its classes {list(ds.task.class_names)} ({ds.task.kind}) differ from the federation's "
            f"{list(task.class_names)} ({task.kind})"
        )
    if partition:
        i, n = (int(x) for x in partition.split("/"))
        if not 0 <= i < n:
            raise UserError(f"data.partition {partition!r}: part must be in 0..{n - 1}")
        ds = D.subset(ds, D.partition(ds, n, scheme, seed=seed, alpha=alpha)[i])
    train, val = D.split_train_val(ds, val_fraction, seed)
    return LocalData(train=train, val=val, skipped=len(getattr(ds, "skipped", [])))


def load_local_data(cfg: HospitalConfig, image_size: int, task: TaskSpec) -> LocalData:
    """This hospital's scans at ``image_size`` px for the federation's ``task``: its partition,
    split into train and validation (cached per process)."""
    if cfg.data.path is None:
        raise UserError("data.path: not set (give --data PATH or [data] path in hospital.toml)")
    d = cfg.data
    return _load_local(
        str(d.path), d.split, image_size,
        json.dumps({"kind": task.kind, "class_names": list(task.class_names)}),
        d.val_fraction, d.partition, d.partition_scheme, d.dirichlet_alpha, d.seed,
    )


def _model_from(req: RoundRequest, state_dict: dict, device: torch.device):
    model = build_model(req.model)
    load_weights(model, state_dict, what="global model from the server")
    return model.to(device)


def train_round(cfg: HospitalConfig, config: dict[str, Any], state_dict: dict, atrest_key=None) -> dict[str, Any]:
    """Handle one training request. Returns a reply dict:

    ``{"status": "trained"|"resent"|"refused", "state_dict": ... (absent when refused),
    "metrics": {numbers}, "reason": str}``.

    ``atrest_key`` (:class:`~xrayfed.common.atrest.AtRestKey`): the privacy ledger's lines and
    the cached released updates are written encrypted with it (and need it to be read).
    """
    req = RoundRequest.from_config(config)
    device = resolve_device(cfg.hospital.device)
    data = load_local_data(cfg, req.image_size, req.task)
    plan = plan_dp(cfg, len(data.train))
    state_dir = Path(cfg.hospital.state_dir)
    ledger = PrivacyLedger(state_dir, cfg, key=atrest_key)
    ledger.ensure_header(plan)
    cache = ReleaseCache(state_dir, key=atrest_key)
    key = request_key(req.federation, req.round, weights_version(state_dict))

    base_metrics = {
        "num-examples": len(data.train),
        "delta": plan.delta,
        "epsilon_budget": plan.epsilon_budget,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "steps": plan.steps,
        "max_grad_norm": plan.max_grad_norm,
        "secure_rng": int(cfg.privacy.secure_rng),
        "secure_mode": 0,  # Opacus' own secure_mode (torchcsprng) is not available; see privacy.py
    }
    cached = cache.get(key)
    if cached is not None:
        ledger.note("resend", federation=req.federation, round=req.round, request=key)
        log.info("round %d: sending the update already released for this request (no new privacy spend)", req.round)
        return {"status": "resent", "state_dict": cached["state_dict"], "metrics": cached["metrics"]}

    if ledger.find(key) is not None:
        ledger.note("retry", federation=req.federation, round=req.round, request=key)
        log.info("round %d: retraining after an interrupted attempt (its spend is already recorded)", req.round)
    else:
        try:
            ledger.charge(plan, federation=req.federation, server_round=req.round, key=key)
        except BudgetExceeded as e:
            log.warning("%s", e)
            return {
                "status": "refused",
                "reason": str(e),
                "metrics": dict(base_metrics, epsilon=ledger.spent(), train_loss=0.0),
            }
    model = _model_from(req, state_dict, device)
    out = train_private_round(
        model, data.train, cfg, plan, req.task, device, lr=req.lr, prox_mu=req.proximal_mu,
        desc=f"{cfg.hospital.name} round {req.round}",
    )
    new_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    metrics = dict(base_metrics, epsilon=ledger.spent(), train_loss=float(out["loss"]))
    cache.put(key, {"state_dict": new_state, "metrics": metrics})  # released from here on
    log.info("round %d: trained %d DP-SGD steps (σ=%.3f, q=%.4f); ε spent %.3f of %.3g",
             req.round, plan.steps, plan.noise_multiplier, plan.sample_rate, metrics["epsilon"], plan.epsilon_budget)
    return {"status": "trained", "state_dict": new_state, "metrics": metrics}


def evaluate_round(cfg: HospitalConfig, config: dict[str, Any], state_dict: dict) -> dict[str, float]:
    """Evaluate the global model on this hospital's local validation split (aggregate metrics only)."""
    req = RoundRequest.from_config(config)
    device = resolve_device(cfg.hospital.device)
    data = load_local_data(cfg, req.image_size, req.task)
    ds = data.val if data.val is not None and len(data.val) > 0 else data.train
    m = evaluate(_model_from(req, state_dict, device), ds, req.task, device)
    return {"num-examples": len(ds), **{k: float(v) for k, v in m.items() if k in ("auc", "accuracy", "loss",
                                                                                   "sensitivity", "specificity")}}


def hospital_config_from_node(node_config: dict[str, Any]) -> HospitalConfig:
    """The hospital's own config, named by the hospital when it started its SuperNode."""
    path = node_config.get("config")
    if not path:
        raise UserError("node config: no 'config' path (start the client with `xrayfed client`)")
    return load_config(HospitalConfig, str(path))
