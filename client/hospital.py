"""What a hospital does when the federation asks it to train or evaluate.

The hospital's scans are loaded here, inside the hospital's own process, and never leave it:
replies carry model weights (after DP-SGD), counts and privacy figures only. Every privacy
decision is delegated to :mod:`xrayfed.client.dp`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from xrayfed.client.dp import (
    BudgetExceeded,
    PrivacyLedger,
    ReleaseCache,
    StateLock,
    plan_for,
    request_key,
    train_private_round,
    update_digest,
)
from xrayfed.client.nodeconfig import SIM_HOSPITALS_ENV, hospital_config_from_node  # noqa: F401 - torch-free home
from xrayfed.common.checkpoint import load_weights, weights_version
from xrayfed.common.config import HospitalConfig, load_config
from xrayfed.common.errors import UserError
from xrayfed.common.logs import untrusted
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


def _decode(path: str, split: str, image_size: int, task_json: str, test_fraction: float = 0.0, seed: int = 0,
            labels: tuple[str, ...] | None = None, select=None):
    """``split`` at ``path`` for the federation's task (``select``: only the scans it picks, see
    :func:`xrayfed.common.data.load_dataset`). ``test_fraction``, ``seed``:
    ``data.local_test_fraction`` and ``data.seed``; ``labels``: ``data.labels``, which must name
    the federation's classes."""
    from xrayfed.common import data

    task = TaskSpec.from_dict(json.loads(task_json))
    if labels is not None and {x.upper() for x in labels} != {x.upper() for x in task.class_names}:
        raise UserError(f"data.labels {list(labels)}: the federation trains {list(task.class_names)}; "
                        "set data.labels to those or leave it unset")
    ds = data.load_dataset(Path(path), split=split, image_size=image_size, task=task, seed=seed,
                           test_fraction=test_fraction,
                           label_set=list(task.class_names) if labels is not None else None, select=select)
    if ds.task.class_names != task.class_names or ds.task.kind != task.kind:
        raise UserError(
            f"data {path}: its classes {list(ds.task.class_names)} ({ds.task.kind}) differ from the federation's "
            f"{list(task.class_names)} ({task.kind})"
        )
    return ds


@lru_cache(maxsize=2)
def _load_full(path: str, split: str, image_size: int, task_json: str, test_fraction: float = 0.0, seed: int = 0,
               labels: tuple[str, ...] | None = None):
    """The whole ``split`` at ``path`` (cached per process): a hospital's own data, or an ``.npz``
    that a simulation's hospitals share, each taking its own partition."""
    return _decode(path, split, image_size, task_json, test_fraction, seed, labels)


#: Scans kept decoded per process (:func:`load_local_data`), one entry per hospital and image size:
#: a hospital's own process keeps 4 (the image size is the server's to ask for, so a server cannot
#: make it keep more); a process that serves many hospitals (:func:`serve_many_hospitals`: a
#: simulation, round after round) keeps up to this many, whose parts of a shared folder add up to
#: the folder once.
MANY_HOSPITALS_CACHE = 256
_serves_many = False


def serve_many_hospitals() -> None:
    """This process serves many hospitals (an in-process simulation; Flower's Simulation Engine's
    workers are known by ``$XRAYFED_SIM_HOSPITALS``): keep up to :data:`MANY_HOSPITALS_CACHE`
    hospitals' scans decoded instead of 4."""
    global _serves_many
    _serves_many = True


def clear_data_caches() -> None:
    """Drop every hospital's decoded scans this process keeps (:func:`load_local_data`)."""
    _load_local.cache_clear()
    _load_local_many.cache_clear()
    _load_full.cache_clear()


def _load_local_uncached(path: str, split: str, image_size: int, task_json: str, val_fraction: float,
                         partition: str | None, scheme: str, alpha: float, seed: int, size_skew: float = 0.0,
                         test_fraction: float = 0.0, labels: tuple[str, ...] | None = None) -> LocalData:
    from xrayfed.common import data

    if partition and data.detect_format(path) != "npz":  # decode this hospital's part of the folder only
        ds = _decode(path, split, image_size, task_json, test_fraction, seed, labels,
                     select=part_select(partition, scheme, alpha, seed, size_skew))
        train, val = data.split_train_val(ds, val_fraction, seed)
    else:  # an .npz is read whole anyway: decoded once per process for all the hospitals sharing it
        ds = _load_full(path, split, image_size, task_json, test_fraction, seed, labels)
        train, val = split_local(ds, val_fraction, partition, scheme, alpha, seed, size_skew)
    return LocalData(train=train, val=val, skipped=len(getattr(ds, "skipped", [])))


_load_local = lru_cache(maxsize=4)(_load_local_uncached)
_load_local_many = lru_cache(maxsize=MANY_HOSPITALS_CACHE)(_load_local_uncached)


def _part(partition: str) -> tuple[int, int]:
    i, n = (int(x) for x in partition.split("/"))
    if not 0 <= i < n:
        raise UserError(f"data.partition {partition!r}: part must be in 0..{n - 1}")
    return i, n


def part_select(partition: str | None, scheme: str, alpha: float, seed: int, size_skew: float = 0.0):
    """``data.partition`` as a :data:`~xrayfed.common.data.dataset.Select` (None without one): the
    part :func:`split_local` keeps of the decoded scans, chosen from the listed files before any
    is decoded. The two are the same scans when every listed file is readable; otherwise the
    parts are of the listed files, each hospital skipping the unreadable ones of its own part."""
    from xrayfed.common import data

    if not partition:
        return None
    i, n = _part(partition)
    return lambda index: data.partition(index, n, scheme, seed=seed, alpha=alpha, size_skew=size_skew)[i]


def split_local(ds, val_fraction: float, partition: str | None, scheme: str, alpha: float, seed: int,
                size_skew: float = 0.0):
    """This hospital's part of ``ds`` (``data.partition``), split into ``(train, val)``: the
    same split at `xrayfed client` start (N for the DP plan) and in every round."""
    from xrayfed.common import data

    if partition:
        i, n = _part(partition)
        ds = data.subset(ds, data.partition(ds, n, scheme, seed=seed, alpha=alpha, size_skew=size_skew)[i])
    return data.split_train_val(ds, val_fraction, seed)


def hospital_split(cfg: HospitalConfig, ds=None):
    """``(ds, train, val)``: this hospital's scans of ``data.split`` (decoded at
    :data:`~xrayfed.common.data.CHECK_SIZE` unless ``ds`` is given) split exactly as every round
    splits them. What `xrayfed client` and `xrayfed data check` plan the DP budget on. Without
    ``ds`` and with ``data.partition``, only this hospital's part is decoded and ``ds`` is that part;
    with ``ds`` (the whole split, decoded) the part is the same: cut from the listed files."""
    from xrayfed.common import data

    d = cfg.data
    select = part_select(d.partition, d.partition_scheme, d.dirichlet_alpha, d.seed, d.size_skew)
    if ds is None:
        ds = data.load_dataset(Path(d.path), split=d.split, image_size=data.CHECK_SIZE, label_set=d.labels,
                               seed=d.seed, test_fraction=d.local_test_fraction, select=select)
        if select is not None:
            return (ds, *data.split_train_val(ds, d.val_fraction, d.seed))
    elif select is not None:  # decoded whole already: keep the part of the listed files, as a round does
        index = data.listed_index(Path(d.path), d.split, label_set=d.labels, seed=d.seed,
                                  test_fraction=d.local_test_fraction)
        if index is not None:  # compared as real paths: the two may spell the folder differently
            mine = {os.path.realpath(index.files[i]) for i in data.selected(select, index)}
            keep = [i for i, f in enumerate(ds.files) if os.path.realpath(f) in mine]
            if not keep:
                raise UserError(f"data {d.path}: no usable scan in part {d.partition} ({d.partition_scheme})")
            part = data.subset(ds, keep)
            part.patient_ids_known = index.patient_ids_known  # every listed file's, as the rounds decide it
            return ds, *data.split_train_val(part, d.val_fraction, d.seed)
    train, val = split_local(ds, d.val_fraction, d.partition, d.partition_scheme, d.dirichlet_alpha, d.seed,
                             d.size_skew)
    return ds, train, val


def load_local_data(cfg: HospitalConfig, image_size: int, task: TaskSpec) -> LocalData:
    """This hospital's scans at ``image_size`` px for the federation's ``task``: its partition,
    split into train and validation (cached per process; of a shared folder, only the partition
    is decoded)."""
    if cfg.data.path is None:
        raise UserError("data.path: not set (give --data PATH or [data] path in hospital.toml)")
    d = cfg.data
    load = _load_local_many if _serves_many or os.environ.get(SIM_HOSPITALS_ENV) else _load_local
    return load(
        str(d.path), d.split, image_size,
        json.dumps(task.to_dict()),
        d.val_fraction, d.partition, d.partition_scheme, d.dirichlet_alpha, d.seed, d.size_skew,
        d.local_test_fraction, tuple(d.labels) if d.labels is not None else None,
    )


class RequestRefused(UserError):
    """A round request the hospital will not act on (checked before anything is charged). The
    message goes back to the server, so it names nothing on the hospital's machine."""


def check_request(cfg: HospitalConfig, req: RoundRequest) -> None:
    """Refuse (:class:`RequestRefused`) a request whose settings are outside what this hospital
    accepts (``[hospital] max_*``, which may only tighten the project's limits): a learning rate
    or FedProx μ that is not finite or out of range, a scan size too large to decode, a model
    that names a file to load. Runs before the hospital's scans are loaded, so it costs nothing."""
    h = cfg.hospital
    if req.model.pretrained_path is not None:
        raise RequestRefused("the round's model names a file to load (pretrained_path); a hospital never opens "
                             "a file the server names (the server sends the weights themselves)")
    if not (math.isfinite(req.lr) and 0 < req.lr <= h.max_server_lr):
        raise RequestRefused(f"learning rate {req.lr:g} is outside (0, {h.max_server_lr:g}] "
                             "(hospital.max_server_lr)")
    if not (math.isfinite(req.proximal_mu) and 0 <= req.proximal_mu <= h.max_proximal_mu):
        raise RequestRefused(f"FedProx μ {req.proximal_mu:g} is outside [0, {h.max_proximal_mu:g}] "
                             "(hospital.max_proximal_mu)")
    if not 8 <= req.image_size <= h.max_image_size:
        raise RequestRefused(f"scan size {req.image_size} px is outside [8, {h.max_image_size}] "
                             "(hospital.max_image_size)")
    if req.round < 1:
        raise RequestRefused(f"round number {req.round}: rounds count from 1")


def checked_model(cfg: HospitalConfig, req: RoundRequest, state_dict: dict, device: torch.device):
    """The global model of ``req`` with the weights ``state_dict``, after checking everything the
    hospital can check before it trains: the architecture's size (``[hospital]
    max_model_parameters``), the same names, shapes and dtypes as the architecture's own, and
    finite values. :class:`RequestRefused` otherwise."""
    try:
        model = build_model(req.model)
    except Exception as e:  # noqa: BLE001 - a hostile spec: one line back, nothing charged
        raise RequestRefused(f"the round's model cannot be built ({type(e).__name__})") from None
    n = sum(p.numel() for p in model.parameters())
    if n > cfg.hospital.max_model_parameters:
        raise RequestRefused(f"the round's model has {n} weights, more than {cfg.hospital.max_model_parameters} "
                             "(hospital.max_model_parameters)")
    own = model.state_dict()
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise RequestRefused(f"global model array {untrusted(k, 80)!r} is not a tensor")
        if k in own and v.dtype != own[k].dtype:
            raise RequestRefused(f"global model array {untrusted(k, 80)!r} is {v.dtype}, the architecture's is "
                                 f"{own[k].dtype}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise RequestRefused(f"global model array {untrusted(k, 80)!r} holds NaN or Inf")
    try:
        load_weights(model, state_dict, what="global model from the server")
    except UserError as e:
        raise RequestRefused(untrusted(e)) from None
    return model.to(device)


def charged_plan(charge: dict[str, Any], plan):
    """The plan a ``train`` line charged (unit, σ, q, steps, C, expected batch), to retrain exactly it
    after a crash whatever ``hospital.toml`` says now. :class:`RequestRefused` naming what is
    missing when the line does not state it."""
    need = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm")
    missing = [k for k in need if not isinstance(charge.get(k), (int, float))]
    if missing:
        raise RequestRefused(f"the charge of this round (ledger line {charge.get('seq', -1) + 1}) does not state "
                             f"{', '.join(missing)}, so the retry cannot train exactly what was charged")
    charged_unit = str(charge.get("unit", "scan"))
    if charged_unit != plan.unit:
        raise RequestRefused(f"this round was charged at the {charged_unit} unit (ledger line {int(charge['seq']) + 1}) "
                             f"but the hospital now trains at the {plan.unit} unit, so the retry cannot train "
                             "exactly what was charged")
    return replace(plan, noise_multiplier=float(charge["noise_multiplier"]),
                   sample_rate=float(charge["sample_rate"]), steps=int(charge["steps"]),
                   max_grad_norm=float(charge["max_grad_norm"]),
                   expected_batch_size=int(charge.get("expected_batch_size") or plan.expected_batch_size))


def plan_differences(a, b) -> list[str]:
    """``name a → b`` for the DP settings where plans ``a`` and ``b`` differ."""
    out = []
    for f, label in (("noise_multiplier", "σ"), ("sample_rate", "q"), ("steps", "steps"), ("max_grad_norm", "C")):
        x, y = getattr(a, f), getattr(b, f)
        if not math.isclose(float(x), float(y), rel_tol=1e-9):
            out.append(f"{label} {x:g} → {y:g}")
    return out


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
    try:
        check_request(cfg, req)  # before the scans are decoded at the size the request names
    except RequestRefused as e:
        return _refused_unchecked(cfg, req, str(e), atrest_key)
    device = resolve_device(cfg.hospital.device)
    data = load_local_data(cfg, req.image_size, req.task)
    with StateLock(Path(cfg.hospital.state_dir)):
        return _train_locked(cfg, req, data, state_dict, device, atrest_key)


def _refused_unchecked(cfg: HospitalConfig, req: RoundRequest, why: str, atrest_key) -> dict[str, Any]:
    """The reply to a request refused before anything else (no charge, no ledger line)."""
    with StateLock(Path(cfg.hospital.state_dir)):
        ledger = PrivacyLedger(Path(cfg.hospital.state_dir), cfg, key=atrest_key)
        seq, head = ledger.head()
        reason = f"hospital {cfg.hospital.name}: round {req.round} refused: {why}; nothing was charged"
        log.warning("%s", reason)
        return {"status": REFUSED, "metrics": {"epsilon": ledger.spent(), "train_loss": 0.0, "ledger_seq": seq},
                "ledger": {"seq": seq, "head": head}, "reason": reason}


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
        plan, units = plan_for(cfg, data.train)
    except UserError as e:  # also refused at `xrayfed client` start; a backstop, never a traceback
        return refuse(f"hospital {cfg.hospital.name}: round {req.round} refused: {e}",
                      {"num-examples": len(data.train)})

    def metrics_of(plan) -> dict[str, Any]:
        return {
            "num-examples": plan.num_examples,  # N in the privacy unit: the FedAvg weight
            "num_scans": plan.num_scans,
            "patient_unit": int(plan.unit == "patient"),
            "delta": plan.delta,
            "epsilon_budget": plan.epsilon_budget,
            "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.sample_rate,
            "steps": plan.steps,
            "max_grad_norm": plan.max_grad_norm,
            "momentum": 0.0 if cfg.training.optimizer == "adam" else cfg.training.momentum,
            "adam": int(cfg.training.optimizer == "adam"),
            "secure_rng": int(cfg.privacy.secure_rng),
            "secure_mode": 0,  # Opacus' own secure_mode (torchcsprng) is not available; see client/dp/noise.py
        }

    base_metrics = metrics_of(plan)
    anchor = req.anchor_for(cfg.hospital.name)
    if anchor is not None:
        problem = check_anchor(ledger.records, *anchor)
        if problem:
            log.error("privacy ledger %s: %s", ledger.path, problem)
            return refuse(f"hospital {cfg.hospital.name}: round {req.round} refused: privacy ledger check failed: "
                          f"{problem}; no training until the ledger is restored", base_metrics)
    try:  # everything that can be checked is checked before anything is charged
        model = checked_model(cfg, req, state_dict, device)
    except RequestRefused as e:
        return refuse(f"hospital {cfg.hospital.name}: round {req.round} refused: {e}; nothing was charged",
                      base_metrics)
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
        # A retry trains exactly what was charged, whatever hospital.toml says now.
        try:
            charged = charged_plan(charge, plan)
        except RequestRefused as e:
            return refuse(f"hospital {cfg.hospital.name}: round {req.round} refused: {e}", base_metrics)
        diff = plan_differences(charged, plan)
        if diff:
            log.warning("round %d: hospital.toml now plans %s; the retry trains the plan this round was charged "
                        "for (ledger line %d)", req.round, ", ".join(diff), int(charge["seq"]) + 1)
        plan, base_metrics = charged, metrics_of(charged)
        ledger.note("retry", federation=req.federation, round=req.round, request=key)
        log.info("round %d: retraining after an interrupted attempt (its spend is recorded, nothing was released)",
                 req.round)
    else:
        try:
            charge = ledger.charge(plan, federation=req.federation, server_round=req.round, key=key)
        except BudgetExceeded as e:
            return refuse(str(e), base_metrics)
    out = train_private_round(
        model, units, cfg, plan, req.task, device, lr=req.lr, prox_mu=req.proximal_mu,
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
    check_request(cfg, req)  # the same limits as training (an evaluation spends no ε)
    device = resolve_device(cfg.hospital.device)
    data = load_local_data(cfg, req.image_size, req.task)
    if data.val is None or len(data.val) == 0:
        log.info("round %d: no validation scans (data.val_fraction = %g): no evaluation metrics are sent",
                 req.round, cfg.data.val_fraction)
        return {"num-examples": 0}
    m = evaluate(checked_model(cfg, req, state_dict, device), data.val, req.task, device)
    return {"num-examples": len(data.val), **{k: float(v) for k, v in m.items()
                                               if k in ("auc", "accuracy", "loss", "sensitivity", "specificity")}}
