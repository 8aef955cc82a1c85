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

from xrayfed.client.privacy import (
    BudgetExceeded,
    PrivacyLedger,
    ReleaseCache,
    StateLock,
    plan_dp,
    request_key,
    train_private_round,
    update_digest,
)
from xrayfed.common.checkpoint import load_weights, weights_version
from xrayfed.common.config import HospitalConfig, load_config
from xrayfed.common.errors import UserError
from xrayfed.common.model import build_model
from xrayfed.common.prediction import TaskSpec
from xrayfed.common.protocol.rounds import REFUSED, RESENT, TRAINED, RoundRequest
from xrayfed.common.train import evaluate, resolve_device

log = logging.getLogger(__name__)


@dataclass
class LocalData:
    train: Any
    val: Any
    skipped: int


@lru_cache(maxsize=2)
def _load_full(path: str, split: str, image_size: int, task_json: str):
    """The whole ``split`` at ``path`` (cached per process: in a simulation one worker process
    serves many hospitals that share a data file, each taking its own partition)."""
    from xrayfed.common import data

    task = TaskSpec.from_dict(json.loads(task_json))
    ds = data.load_dataset(Path(path), split=split, image_size=image_size, task=task)
    if ds.task.class_names != task.class_names or ds.task.kind != task.kind:
        raise UserError(
            f"data {path}: its classes {list(ds.task.class_names)} ({ds.task.kind}) differ from the federation's "
            f"{list(task.class_names)} ({task.kind})"
        )
    return ds


@lru_cache(maxsize=4)
def _load_local(path: str, split: str, image_size: int, task_json: str, val_fraction: float, partition: str | None,
                scheme: str, alpha: float, seed: int, size_skew: float = 0.0) -> LocalData:
    ds = _load_full(path, split, image_size, task_json)
    train, val = split_local(ds, val_fraction, partition, scheme, alpha, seed, size_skew)
    return LocalData(train=train, val=val, skipped=len(getattr(ds, "skipped", [])))


def split_local(ds, val_fraction: float, partition: str | None, scheme: str, alpha: float, seed: int,
                size_skew: float = 0.0):
    """This hospital's part of ``ds`` (``data.partition``), split into ``(train, val)``: the
    same split at `xrayfed client` start (N for the DP plan) and in every round."""
    from xrayfed.common import data

    if partition:
        i, n = (int(x) for x in partition.split("/"))
        if not 0 <= i < n:
            raise UserError(f"data.partition {partition!r}: part must be in 0..{n - 1}")
        ds = data.subset(ds, data.partition(ds, n, scheme, seed=seed, alpha=alpha, size_skew=size_skew)[i])
    return data.split_train_val(ds, val_fraction, seed)


def hospital_split(cfg: HospitalConfig, ds=None):
    """``(ds, train, val)``: this hospital's scans of ``data.split`` (decoded at
    :data:`~xrayfed.common.data.CHECK_SIZE` unless ``ds`` is given) split exactly as every round
    splits them. What `xrayfed client` and `xrayfed data check` plan the DP budget on."""
    from xrayfed.common import data

    d = cfg.data
    if ds is None:
        ds = data.load_dataset(Path(d.path), split=d.split, image_size=data.CHECK_SIZE)
    train, val = split_local(ds, d.val_fraction, d.partition, d.partition_scheme, d.dirichlet_alpha, d.seed,
                             d.size_skew)
    return ds, train, val


def load_local_data(cfg: HospitalConfig, image_size: int, task: TaskSpec) -> LocalData:
    """This hospital's scans at ``image_size`` px for the federation's ``task``: its partition,
    split into train and validation (cached per process)."""
    if cfg.data.path is None:
        raise UserError("data.path: not set (give --data PATH or [data] path in hospital.toml)")
    d = cfg.data
    return _load_local(
        str(d.path), d.split, image_size,
        json.dumps(task.to_dict()),
        d.val_fraction, d.partition, d.partition_scheme, d.dirichlet_alpha, d.seed, d.size_skew,
    )


def _model_from(req: RoundRequest, state_dict: dict, device: torch.device):
    model = build_model(req.model)
    load_weights(model, state_dict, what="global model from the server")
    return model.to(device)


def train_round(cfg: HospitalConfig, config: dict[str, Any], state_dict: dict, atrest_key=None) -> dict[str, Any]:
    """Handle one training request. Returns a reply dict:

    ``{"status": "trained"|"resent"|"refused", "state_dict": ... (absent when refused),
    "metrics": {numbers}, "reason": str, "ledger": {"seq", "head"}}``.

    Every update that leaves is either charged in the ledger (``train`` line before training,
    ``release`` line with its digest before replying) or a byte-identical resend of one that
    was; a repeated request whose update cannot be resent byte-identically is refused. The
    whole decision runs under the state folder's lock (:class:`~.privacy.StateLock`).

    ``atrest_key`` (:class:`~xrayfed.common.security.atrest.AtRestKey`): the privacy ledger's lines and
    the cached released updates are written encrypted with it (and need it to be read).
    """
    req = RoundRequest.from_config(config)
    device = resolve_device(cfg.hospital.device)
    data = load_local_data(cfg, req.image_size, req.task)
    with StateLock(Path(cfg.hospital.state_dir)):
        return _train_locked(cfg, req, data, state_dict, device, atrest_key)


def _train_locked(cfg: HospitalConfig, req: RoundRequest, data: LocalData, state_dict: dict, device,
                  atrest_key) -> dict[str, Any]:
    from xrayfed.common.privacy.ledger import check_anchor

    state_dir = Path(cfg.hospital.state_dir)
    ledger = PrivacyLedger(state_dir, cfg, key=atrest_key)  # verifies the keyed chain and the local head anchor

    def reply(status: str, metrics: dict, **extra) -> dict[str, Any]:
        seq, head = ledger.head()
        return {"status": status, "metrics": dict(metrics, ledger_seq=seq), "ledger": {"seq": seq, "head": head},
                **extra}

    def refuse(reason: str, metrics: dict) -> dict[str, Any]:
        log.warning("%s", reason)
        return reply(REFUSED, dict(metrics, epsilon=ledger.spent(), train_loss=0.0), reason=reason)

    try:
        plan = plan_dp(cfg, len(data.train))
    except UserError as e:  # also refused at `xrayfed client` start; a backstop, never a traceback
        return refuse(f"hospital {cfg.hospital.name}: round {req.round} refused: {e}",
                      {"num-examples": len(data.train)})
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
    anchor = req.anchor_for(cfg.hospital.name)
    if anchor is not None:
        problem = check_anchor(ledger.records, *anchor)
        if problem:
            log.error("privacy ledger %s: %s", ledger.path, problem)
            return refuse(f"hospital {cfg.hospital.name}: round {req.round} refused: privacy ledger check failed: "
                          f"{problem}; no training until the ledger is restored", base_metrics)
    ledger.ensure_header(plan)
    cache = ReleaseCache(state_dir, key=atrest_key)
    key = request_key(req.federation, req.round, weights_version(state_dict))

    released = ledger.release_of(key)
    if released is not None:
        try:
            cached = cache.get(key)
            why = "is no longer in the release cache (evicted by newer rounds, or deleted)" if cached is None else ""
        except UserError as e:
            cached, why = None, f"its cached copy cannot be read ({e})"
        if cached is not None and update_digest(cached["state_dict"]) != released["digest"]:
            cached, why = None, "its cached copy differs from the update that was released (modified)"
        if cached is not None:
            ledger.note("resend", federation=req.federation, round=req.round, request=key)
            log.info("round %d: sending the update already released for this request (no new privacy spend)",
                     req.round)
            return reply(RESENT, cached["metrics"], state_dict=cached["state_dict"])
        ledger.note("refused_resend", federation=req.federation, round=req.round, request=key, reason=why)
        return refuse(f"hospital {cfg.hospital.name}: round {req.round} refused: this request's update was already "
                      f"released ({released.get('time')}) and {why}; training again would release a second "
                      "update without a new privacy charge, so nothing was sent", base_metrics)

    charge = ledger.find(key)
    if charge is not None:
        ledger.note("retry", federation=req.federation, round=req.round, request=key)
        log.info("round %d: retraining after an interrupted attempt (its spend is recorded, nothing was released)",
                 req.round)
    else:
        try:
            charge = ledger.charge(plan, federation=req.federation, server_round=req.round, key=key)
        except BudgetExceeded as e:
            return refuse(str(e), base_metrics)
    model = _model_from(req, state_dict, device)
    out = train_private_round(
        model, data.train, cfg, plan, req.task, device, lr=req.lr, prox_mu=req.proximal_mu,
        desc=f"{cfg.hospital.name} round {req.round}",
    )
    new_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    metrics = dict(base_metrics, epsilon=ledger.spent(), train_loss=float(out["loss"]))
    cache.put(key, {"state_dict": new_state, "metrics": metrics})
    ledger.record_release(charge, update_digest(new_state))  # durable before the reply leaves
    log.info("round %d: trained %d DP-SGD steps (σ=%.3f, q=%.4f); ε spent %.3f of %.3g",
             req.round, plan.steps, plan.noise_multiplier, plan.sample_rate, metrics["epsilon"], plan.epsilon_budget)
    return reply(TRAINED, metrics, state_dict=new_state)


def evaluate_round(cfg: HospitalConfig, config: dict[str, Any], state_dict: dict) -> dict[str, float]:
    """Evaluate the global model on this hospital's local validation split (aggregate metrics only).

    Only scans that were never trained on are evaluated: with no validation split
    (``val_fraction = 0``, or too few scans) the reply carries ``num-examples = 0`` and no
    metric. Validation metrics are released to the server *without* DP (they are aggregates
    of scans outside the DP-protected training set).
    """
    req = RoundRequest.from_config(config)
    device = resolve_device(cfg.hospital.device)
    data = load_local_data(cfg, req.image_size, req.task)
    if data.val is None or len(data.val) == 0:
        log.info("round %d: no validation scans (data.val_fraction = %g): no evaluation metrics are sent",
                 req.round, cfg.data.val_fraction)
        return {"num-examples": 0}
    m = evaluate(_model_from(req, state_dict, device), data.val, req.task, device)
    return {"num-examples": len(data.val), **{k: float(v) for k, v in m.items()
                                               if k in ("auc", "accuracy", "loss", "sensitivity", "specificity")}}


#: Set by ``xrayfed simulate`` for its Simulation Engine workers: the folder of the simulated
#: hospitals' configs (``hospital-NNN.toml`` by ``partition-id``). Never read when the node
#: names its own config (every real SuperNode started by ``xrayfed client`` does).
SIM_HOSPITALS_ENV = "XRAYFED_SIM_HOSPITALS"


def hospital_config_from_node(node_config: dict[str, Any]) -> HospitalConfig:
    """The hospital's own config, named by the hospital when it started its SuperNode; in a
    simulation (no ``config``, a ``partition-id`` from Flower's Simulation Engine), the simulated
    hospital's config that ``xrayfed simulate`` wrote."""
    import os

    path = node_config.get("config")
    if not path and "partition-id" in node_config and os.environ.get(SIM_HOSPITALS_ENV):
        path = Path(os.environ[SIM_HOSPITALS_ENV]) / f"hospital-{int(node_config['partition-id']):03d}.toml"
    if not path:
        raise UserError("node config: no 'config' path (start the client with `xrayfed client`)")
    return load_config(HospitalConfig, str(path))
