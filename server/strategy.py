"""Aggregation strategies (Flower Message API) with the hooks xrayfed needs.

:func:`make_strategy` returns FedAvg (weighted by example counts), FedAvgM, FedProx or FedAdam
from ``flwr.serverapp.strategy``, or ``auto`` (the default: FedAvgM whose momentum and server
learning rate are chosen each round from the DP noise of the mean update, :class:`XrayAuto`),
combined with :class:`XrayStrategyMixin`, which extends it to

* number rounds globally (a resumed run continues at the checkpoint's round + 1),
* send the federation's model/task description and the round's learning rate to hospitals,
* record every hospital's reply (trained / refused / resent / failed, with its reported ε),
* aggregate only updates that were actually trained; a hospital that refused because its
  privacy budget is spent contributes nothing (and is not counted as a failure);
* wait for ``min_clients`` connected hospitals before each round with a server line every 30 s,
  and stop the run (:class:`HospitalsMissing`, resumable from the last checkpoint) when they are
  not there within ``[federation] join_timeout_s``; a hospital that joins late is simply
  sampled once it is connected;
* reject a malformed update before it is aggregated (:func:`check_update`: other keys or
  shapes than the global model, NaN/Inf, or an L2 distance from the global model above
  ``[federation] max_update_norm`` or above what one DP-SGD round of the hospital's pinned plan
  can reach, :mod:`xrayfed.server.aggregation`): the hospital's row says ``rejected`` and why, a
  warning is logged, and the round goes on with the others. Under SecAgg+ the server only sees
  the sum, so the check applies to the sum: one malformed update voids that round's aggregate;
* cap each hospital's FedAvg weight, and aggregate with the median or trimmed mean when
  ``[federation] aggregator`` says so;
* bind every reply to the hospital its key was registered as (a reply naming another hospital
  is rejected), and keep each hospital's ledger anchor moving forward only
  (:func:`ledger_anchors`);
* log another party's text (names, reasons) escaped to one line and quoted as theirs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from flwr.app import ConfigRecord, Message
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from xrayfed.common.config import FederationConfig
from xrayfed.common.logs import untrusted
from xrayfed.common.privacy.ledger import anchor_id
from xrayfed.common.protocol.rounds import (
    FAILED,
    NUM_EXAMPLES,
    REFUSED,
    REJECTED,
    RESENT,
    TRAINED,
    RoundRequest,
    has_update,
    reply_row,
)
from xrayfed.server.aggregation import (
    HospitalPlan,
    average_noise_ratio,
    capped_weight,
    dp_update_bound,
    num_parameters,
    robust_aggregate,
    update_distance,
)

log = logging.getLogger(__name__)


class HospitalsMissing(RuntimeError):
    """Fewer than ``min_clients`` hospitals were connected within ``join_timeout_s``."""


def await_hospitals(grid, need: int, timeout_s: float, global_round: int, say: Callable[[str], None],
                    every_s: float = 30.0) -> int:
    """Block until ``need`` hospitals are connected to ``grid`` (returns how many are), telling the
    operator through ``say`` every ``every_s``; :class:`HospitalsMissing` after ``timeout_s``."""
    t0 = time.monotonic()
    said = None
    while True:
        n = len(list(grid.get_node_ids()))
        waited = time.monotonic() - t0
        if n >= need:
            if said is not None:
                say(f"starting round {global_round}: {n} hospitals connected after {waited:.0f} s")
            return n
        if waited >= timeout_s:
            raise HospitalsMissing(
                f"before round {global_round}: only {n} of the {need} hospitals needed (min_clients) connected within "
                f"join_timeout_s = {timeout_s:g} s; the run stops here. Start `xrayfed server` again to resume from "
                "the last checkpoint once the hospitals are back")
        if said is None or waited - said >= every_s:
            say(f"waiting for hospitals before round {global_round}: {n} of {need} connected "
                f"(gives up after {timeout_s:g} s)")
            said = waited
        time.sleep(0.5)


def check_update(update: dict[str, Any], reference: dict[str, Any], max_norm: float,
                 plan_bound: float = math.inf) -> str | None:
    """Why the update ``update`` (name → numpy array) cannot be aggregated with the global model
    ``reference``, or None when it can: keys and shapes must match, every value must be finite,
    and ‖update − reference‖₂ (over all arrays) must not exceed ``max_norm`` nor ``plan_bound``
    (what a DP-SGD round of the hospital's plan can reach, :func:`~xrayfed.server.aggregation.dp_update_bound`)."""
    import numpy as np

    if set(update) != set(reference):
        extra, missing = sorted(set(update) - set(reference)), sorted(set(reference) - set(update))
        return f"arrays differ from the global model's (unexpected {extra[:3]}, missing {missing[:3]})"
    for k, ref in reference.items():
        u = np.asarray(update[k])
        if u.shape != np.shape(ref):
            return f"array {k!r} has shape {list(u.shape)}, the global model's is {list(np.shape(ref))}"
        if not np.all(np.isfinite(u)):
            return f"array {k!r} holds NaN or Inf"
    norm = update_distance(update, reference)
    if not norm <= max_norm:
        return f"update norm ‖Δ‖₂ = {norm:.3g} exceeds max_update_norm {max_norm:g}"
    if not norm <= plan_bound:
        return (f"update norm ‖Δ‖₂ = {norm:.3g} exceeds {plan_bound:.3g}, the most a DP-SGD round of the "
                "hospital's own plan (N, σ, q, steps, C, momentum, at this round's lr) can reach")
    return None


def _map_arrays(v: Any, fn: Callable[[Any], Any]) -> Any:
    """``v`` (arrays nested in dicts and lists, as Flower's strategies keep them) with ``fn``
    applied to every array."""
    if isinstance(v, dict):
        return {k: _map_arrays(x, fn) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_map_arrays(x, fn) for x in v]
    return fn(v)


#: Replies whose ledger head becomes the hospital's anchor: an update left the hospital (trained,
#: resent, or trained and then rejected by the server's checks).
ADVANCES_ANCHOR = (TRAINED, RESENT, REJECTED)


def ledger_anchors(rows: Iterable[dict[str, Any]], anchors: dict[str, tuple[int, str]] | None = None,
                   findings: list[str] | None = None) -> dict[str, tuple[int, str]]:
    """Advance ``{hospital: (seq, head)}`` with the ledger heads reported in metrics rows.

    An anchor only moves forward, and only with a reply that sent an update
    (:data:`ADVANCES_ANCHOR`): a refusal never moves it. A head *behind* the anchor (a lower
    ``seq``, or the same ``seq`` with another hash) means the hospital's ledger was rolled back:
    it is a finding (appended to ``findings``, and the row gets ``ledger_rollback``), never the
    new anchor, so every later request still carries the anchor the rolled-back ledger lacks and
    the hospital keeps refusing until its ledger is restored. A row whose claimed name did not
    match its key (``claimed_hospital``) moves nothing."""
    anchors = {} if anchors is None else anchors
    for r in rows:
        if r.get("claimed_hospital") or not r.get("ledger_head") or r.get("ledger_seq") is None:
            continue
        name, seq, head = str(r["hospital"]), int(r["ledger_seq"]), str(r["ledger_head"])
        old = anchors.get(name)
        if old is not None and (seq < old[0] or (seq == old[0] and head != old[1])):
            why = (f"hospital {untrusted(name, 64)} reported ledger line {seq + 1}, behind line {old[0] + 1} that it "
                   "reported before: its privacy ledger was rolled back or replaced (the anchor is kept; the "
                   "hospital refuses to train until the ledger is restored)")
            r["ledger_rollback"] = why
            if findings is not None:
                findings.append(why)
            continue
        if r.get("status") in ADVANCES_ANCHOR:
            anchors[name] = (seq, head)
    return anchors


def pinned_plans(rows: Iterable[dict[str, Any]], plans: dict[str, HospitalPlan] | None = None
                 ) -> dict[str, HospitalPlan]:
    """``{hospital: plan}``: the DP plan of each hospital's first reply that sent an update (what
    :mod:`xrayfed.server.aggregation` bounds its updates and weight with). Later rows never
    change it."""
    plans = {} if plans is None else plans
    for r in rows:
        if r.get("claimed_hospital") or r.get("status") not in ADVANCES_ANCHOR or str(r.get("hospital")) in plans:
            continue
        plan = HospitalPlan.from_row(r)
        if plan is not None:
            plans[str(r["hospital"])] = plan
    return plans


def round_lr(cfg: FederationConfig, server_round: int) -> float:
    """The client learning rate of global round ``server_round`` (1-based) under ``[federation]
    lr_schedule``: ``constant`` (``lr``) or ``cosine`` (from ``lr`` down to ``lr × lr_final_fraction``
    at the last round)."""
    fed = cfg.federation
    if fed.lr_schedule == "cosine" and fed.rounds > 1:
        frac = min(1.0, (server_round - 1) / (fed.rounds - 1))
        return float(fed.lr * (fed.lr_final_fraction + (1 - fed.lr_final_fraction) * 0.5 * (1 + math.cos(math.pi * frac))))
    return float(fed.lr)


#: ``[federation] strategy = "auto"``: up to this noise-to-signal ratio of the averaged update
#: (:func:`~xrayfed.server.aggregation.average_noise_ratio`) the server steps as FedAvgM with
#: :data:`AUTO_LOW_NOISE` (momentum, lr); above it, without momentum and with the server learning
#: rate ``(AUTO_NOISE_RATIO / ratio)⁴`` (see :func:`auto_server_step`; figures in docs/training.md).
AUTO_NOISE_RATIO = 3.0
AUTO_LOW_NOISE = (0.5, 1.0)
#: The lowest server learning rate ``auto`` steps with, however noisy the mean.
AUTO_MIN_SERVER_LR = 0.1


@dataclass(frozen=True)
class ServerStep:
    """How the server steps from the mean update: ``w ← w + lr·v``, ``v ← momentum·v + Δ``
    (FedAvgM; momentum 0 and lr 1 is plain FedAvg). ``ratio``: the noise-to-signal ratio of the
    mean it was chosen for (nan when unknown)."""

    momentum: float
    lr: float
    ratio: float = math.nan

    def describe(self) -> str:
        """One line: what the server does, and why."""
        how = ("FedAvg" if self.momentum == 0 and self.lr == 1 else
               f"FedAvgM (server momentum {self.momentum:g}, server lr {self.lr:.2g})" if self.momentum else
               f"FedAvg with server lr {self.lr:.2g}")
        if not math.isfinite(self.ratio):
            return how
        return f"{how}: DP noise in the mean update {self.ratio:.2f} × its largest signal"

    def toml(self) -> str:
        """The ``[federation]`` keys that fix this step."""
        if self.momentum == 0 and self.lr == 1:
            return 'strategy = "fedavg"'
        return f'strategy = "fedavgm", server_momentum = {self.momentum:g}, server_lr = {self.lr:.2g}'


def auto_server_step(ratio: float) -> ServerStep:
    """``[federation] strategy = "auto"``: the server's step for a mean update whose DP noise is
    ``ratio`` × its largest signal (:func:`~xrayfed.server.aggregation.average_noise_ratio`).

    Up to ``ratio`` = :data:`AUTO_NOISE_RATIO`: FedAvgM with momentum 0.5 and lr 1, chosen on
    validation sweeps of 3 hospitals and kept where the mean is noisier: at 100 hospitals of 42
    scans (ratio 1.37 over 20 rounds) it led every step tried on validation, where a server lr
    shrunk to 0.36 left the model short of its AUC after 20 rounds; at 30 hospitals of about 75
    patients at 224 px (ratio 2.06) it climbed steadily where FedAvg at lr 0.91 swung every other
    round. Beyond it the mean is mostly noise, and momentum or a large step carries each round's
    noise into the model (30 hospitals of 10 scans, ratio 5.4: validation AUC swung by 0.2 between
    rounds at lr 0.37 without momentum): no momentum, and a server lr that falls steeply with the
    noise, ``(AUTO_NOISE_RATIO / ratio)⁴`` (1 at the threshold, at least
    :data:`AUTO_MIN_SERVER_LR`). Unknown noise (no plan reported yet, or Adam hospitals): the
    low-noise step."""
    if not math.isfinite(ratio) or ratio <= AUTO_NOISE_RATIO:
        return ServerStep(*AUTO_LOW_NOISE, ratio=ratio)
    return ServerStep(0.0, max(AUTO_MIN_SERVER_LR, (AUTO_NOISE_RATIO / ratio) ** 4), ratio=ratio)


def flower_kwargs(cfg: FederationConfig) -> dict[str, Any]:
    """The arguments of the configured Flower strategy (``[federation] strategy``)."""
    fed = cfg.federation
    kwargs: dict[str, Any] = dict(
        fraction_train=fed.fraction_train,
        # Hospitals evaluate on their own validation split only when the server has no held-out
        # set (each request starts a ClientApp process: no need to pay for it twice per round).
        fraction_evaluate=0.0 if cfg.eval.path is not None else 1.0,
        min_train_nodes=fed.min_clients,
        min_evaluate_nodes=fed.min_clients,
        min_available_nodes=fed.min_clients,
    )
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    if fed.strategy == "fedadam":
        kwargs["eta"] = fed.effective_server_lr()
    if fed.strategy == "fedavgm":
        kwargs["server_learning_rate"] = fed.effective_server_lr()
        kwargs["server_momentum"] = fed.server_momentum
    if fed.strategy == "auto":  # the step is chosen each round (XrayAuto); this one until replies tell
        kwargs["server_momentum"], kwargs["server_learning_rate"] = AUTO_LOW_NOISE
    return kwargs


class XrayStrategyMixin:
    """xrayfed's round hooks (see the module's text) on top of a Flower strategy: list it before
    the Flower class (``class XrayFedAvg(XrayStrategyMixin, FedAvg)``), so that its
    ``configure_*`` and ``aggregate_*`` run first and hand on to Flower's with ``super()``.

    ``round_offset``: the checkpoint's round a resumed run continues from (Flower counts each run
    from 1). ``anchors``, ``say``, ``plans``: see :func:`make_strategy`. The other keyword
    arguments go to the Flower strategy (:func:`flower_kwargs`).
    """

    #: Flower's attributes that carry the server optimizer across rounds (FedAvgM, FedAdam).
    STATE = ("momentum_vector", "m_t", "v_t")

    def __init__(self, cfg: FederationConfig, *, round_offset: int = 0,
                 anchors: dict[str, tuple[int, str]] | None = None, say: Callable[[str], None] = log.info,
                 plans: dict[str, HospitalPlan] | None = None, **flower: Any) -> None:
        super().__init__(**flower)
        self.cfg, self.fed, self.say = cfg, cfg.federation, say
        self.round_offset = round_offset
        self.train_rows: dict[int, list[dict[str, Any]]] = {}
        self.client_eval: dict[int, dict[str, float]] = {}
        self.anchors: dict[str, tuple[int, str]] = dict(anchors or {})
        self.reference: dict[str, Any] | None = None
        self.requests: list[Message] = []  # this round's training requests (their ids are set when sent)
        self.names: dict[int, str] = {}  # node id -> the hospital name it reported
        self.registered: dict[int, str] = {}  # node id -> the name its key was registered under
        self.plans: dict[str, HospitalPlan] = dict(plans or {})

    def global_round(self, server_round: int) -> int:
        return self.round_offset + server_round

    # -- requests ---------------------------------------------------------------------------

    def _with_info(self, server_round: int, config: ConfigRecord, anchors: bool = False) -> ConfigRecord:
        """``config`` with the round request: the federation's model and task, the round and its
        learning rate, and (``anchors``) every hospital's ledger anchor."""
        cfg, fed = self.cfg, self.fed
        request = RoundRequest(
            # the operator's pretrained_path is read here, into the round-0 model; a hospital
            # never opens a file the server names
            federation=fed.name, round=self.global_round(server_round),
            model=cfg.model.model_copy(update={"pretrained_path": None}), task=cfg.task,
            image_size=int(cfg.image_size), lr=round_lr(cfg, self.global_round(server_round)),
            ledger_anchors=tuple((anchor_id(fed.name, h), seq, head)
                                 for h, (seq, head) in sorted(self.anchors.items())) if anchors else ())
        c = ConfigRecord(dict(config))
        c.update(request.to_config())
        return c

    def configure_train(self, server_round, arrays, config, grid):
        await_hospitals(grid, self.fed.min_clients, self.fed.join_timeout_s, self.global_round(server_round),
                        self.say)
        self.reference = {k: v.numpy() for k, v in arrays.items()}  # what this round's updates must match
        self._learn_names(grid)
        self.requests = list(super().configure_train(
            server_round, arrays, self._with_info(server_round, config, anchors=True), grid))
        return self.requests

    def configure_evaluate(self, server_round, arrays, config, grid):
        return super().configure_evaluate(server_round, arrays, self._with_info(server_round, config), grid)

    # -- who replied --------------------------------------------------------------------------

    def _learn_names(self, grid) -> None:
        """Names the operator registered the hospitals' keys under (``flwr supernode register
        --name``; none in insecure mode), so a hospital that fails before it ever replied is named."""
        try:
            for n in grid.get_nodes():
                if getattr(n, "name", ""):
                    self.registered[int(n.node_id)] = str(n.name)
                    self.names[int(n.node_id)] = str(n.name)
        except Exception as e:  # noqa: BLE001 - naming is a convenience; the ids are still recorded
            log.debug("node names unavailable: %s", e)

    def _name_rows(self, replies: list[Message], rows: list[dict[str, Any]]) -> None:
        """Name every row by its hospital. An error reply (the hospital died, or timed out) comes
        from the SuperLink, not from the hospital: its node is the one the request went to."""
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self.requests}
        for m, r in zip(replies, rows):
            if r["status"] == FAILED:
                r["node_id"] = int(sent_to.get(m.metadata.reply_to_message_id, r["node_id"]))
                r["hospital"] = self.names.get(r["node_id"], f"node-{r['node_id']}")
            elif not str(r["hospital"]).startswith("node-"):
                self.names.setdefault(r["node_id"], str(r["hospital"]))

    def _bind_names(self, server_round: int, rows: list[dict[str, Any]]) -> None:
        """A reply speaks for the hospital its key was registered as (``flwr supernode register
        --name``, read from the SuperLink): a reply that names another hospital is rejected, its
        row is filed under the registered name with the claimed one beside it, and it moves no
        anchor and no plan. (Without hospital authentication, ``--insecure``, names are the
        hospitals' own claims: there is no key to bind them to.)"""
        for r in rows:
            registered = self.registered.get(int(r["node_id"]))
            if r["status"] == FAILED or registered is None or r["hospital"] == registered:
                continue
            claimed = r["hospital"]
            r.update(claimed_hospital=claimed, hospital=registered, status=REJECTED,
                     reason=f"the reply names hospital \"{claimed}\" but its key is registered as "
                            f"\"{registered}\"")
            log.warning("round %d: reply of node %d rejected, not aggregated: it names hospital \"%s\" but its "
                        "key is registered as \"%s\"", self.global_round(server_round), r["node_id"], claimed,
                        registered)

    # -- which updates count, and how much ----------------------------------------------------

    def _bound(self, server_round: int, r: dict[str, Any]) -> tuple[float, str | None]:
        """``(plan bound, problem)`` for a reply's update: its plan must be the one pinned at the
        hospital's first update, and the bound is what a DP-SGD round of it can reach."""
        plan, pinned = HospitalPlan.from_row(r), self.plans.get(str(r["hospital"]))
        if plan is None or pinned is None:
            return math.inf, "the reply does not state its DP plan (N, σ, q, steps, C)"
        diff = pinned.differences(plan)
        if diff:
            return math.inf, (f"its DP plan differs from the one of its first update in this run "
                              f"({'; '.join(diff)}): a hospital's plan is fixed for the whole run")
        n = num_parameters(self.reference.values()) if self.reference is not None else 0
        return dp_update_bound(pinned, round_lr(self.cfg, self.global_round(server_round)), n), None

    def _screen(self, server_round: int, replies: list[Message], rows: list[dict[str, Any]]) -> list[Message]:
        """The replies whose update is aggregated (:func:`check_update` against the plan bound);
        every other trained reply's row becomes ``rejected`` with the reason."""
        ok = []
        secagg = self.fed.secure_aggregation
        for m, r in zip(replies, rows):
            if not has_update(m) or r["status"] not in (TRAINED, RESENT):
                continue
            rec = next(iter(m.content.array_records.values()))
            bound, problem = (math.inf, None) if secagg else self._bound(server_round, r)
            if problem is None and self.reference is not None:
                problem = check_update({k: v.numpy() for k, v in rec.items()}, self.reference,
                                       self.fed.max_update_norm, bound)
            if problem is None:
                self._cap_weight(m, r)
                ok.append(m)
                continue
            log.warning("round %d: update of %s rejected, not aggregated: %s", self.global_round(server_round),
                        r["hospital"], problem)
            r["status"], r["reason"] = REJECTED, problem
        return ok

    def _cap_weight(self, m: Message, r: dict[str, Any]) -> None:
        """The reply's FedAvg weight, capped (:func:`~xrayfed.server.aggregation.capped_weight`);
        the row records the weight used when it is lower than the claim."""
        if self.fed.secure_aggregation:
            return  # the weight travels masked with the update; SecAgg+'s max_weight caps it
        for rec in m.content.metric_records.values():
            if NUM_EXAMPLES in rec:
                claimed = float(rec[NUM_EXAMPLES])
                w = capped_weight(claimed, self.plans.get(str(r["hospital"])), self.fed.max_examples_per_hospital)
                if w != claimed:
                    rec[NUM_EXAMPLES] = w
                    r["weight"] = w

    def _robust(self, updates: list[Message]) -> None:
        """``[federation] aggregator``: every accepted reply's arrays become the coordinate-wise
        median / trimmed mean of all of them, so the (weighted) mean Flower's strategy then
        computes — and its server optimizer steps from — is that robust aggregate."""
        from flwr.app import Array, ArrayRecord

        if self.fed.aggregator == "mean" or not updates:
            return
        keys = [next(iter(m.content.array_records)) for m in updates]
        states = [{k: v.numpy() for k, v in m.content[key].items()} for m, key in zip(updates, keys)]
        agg = robust_aggregate(states, self.fed.aggregator, self.fed.trim_fraction)
        for m, key in zip(updates, keys):
            m.content[key] = ArrayRecord({k: Array(v) for k, v in agg.items()})

    # -- aggregation --------------------------------------------------------------------------

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        rows = [reply_row(m) for m in replies]
        self._name_rows(replies, rows)
        self._bind_names(server_round, rows)
        self.train_rows[self.global_round(server_round)] = rows
        findings: list[str] = []
        ledger_anchors(rows, self.anchors, findings)
        pinned_plans(rows, self.plans)  # a hospital's first update pins its plan (before it is screened)
        for why in findings:
            log.warning("round %d: %s", self.global_round(server_round), why)
        for r in rows:
            if r["status"] == REFUSED:
                log.warning("hospital %s refused round %d; its reason: \"%s\"", r["hospital"],
                            self.global_round(server_round), r.get("reason", "privacy budget"))
        updates = self._screen(server_round, replies, rows)
        if not updates:
            log.warning("round %d: no hospital sent an update; the global model is unchanged",
                        self.global_round(server_round))
            return None, None
        self._choose_step(server_round, rows)
        self._robust(updates)
        return super().aggregate_train(server_round, updates)

    def _choose_step(self, server_round: int, rows: list[dict[str, Any]]) -> None:
        """Set the server optimizer's step for this round from its screened rows (``auto`` only)."""

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        # A hospital without validation scans answers num-examples = 0 and no metric (it never
        # evaluates on its DP-protected training scans): nothing to average.
        ok = [m for m in replies if not m.has_error() and any(
            float(r.get(NUM_EXAMPLES, 0)) > 0 for r in m.content.metric_records.values())]
        if not ok:
            return None
        agg = super().aggregate_evaluate(server_round, ok)
        if agg is not None:
            self.client_eval[self.global_round(server_round)] = {k: float(v) for k, v in agg.items()}
        return agg

    # -- the server optimizer's state across a resume -----------------------------------------

    def server_state(self) -> dict[str, Any]:
        """The server optimizer's state as tensors (empty for FedAvg/FedProx): saved with each
        checkpoint so that a resumed run continues with it instead of from zero."""
        import numpy as np
        import torch

        return {a: _map_arrays(getattr(self, a), lambda x: torch.from_numpy(np.array(x, copy=True)))
                for a in self.STATE if getattr(self, a, None) is not None}

    def load_server_state(self, state: dict[str, Any]) -> list[str]:
        """Restore :meth:`server_state` (what is restored, by name)."""
        done = []
        for a, v in state.items():
            if a in self.STATE and hasattr(self, a):
                setattr(self, a, _map_arrays(v, lambda x: x.numpy()))
                done.append(a)
        return done


class XrayAuto(XrayStrategyMixin, FedAvgM):
    """``[federation] strategy = "auto"``: FedAvgM whose server momentum and learning rate are
    chosen every round from the noise of the mean update (:func:`auto_server_step`), computed
    from the pinned DP plans and FedAvg weights of the hospitals aggregated in that round. The
    operator is told when the step changes (``say``); ``steps`` keeps each round's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server_opt = True  # Flower then tracks the current weights every round, whatever the step
        self.steps: dict[int, ServerStep] = {}

    def round_plans(self, rows: list[dict[str, Any]]) -> list[tuple[HospitalPlan, float]]:
        """The pinned plan and FedAvg weight of each hospital aggregated in a round (``rows`` with
        status trained/resent)."""
        return [(self.plans[str(r["hospital"])], float(r.get("weight", r.get("num_examples", 0))))
                for r in rows if r.get("status") in (TRAINED, RESENT) and str(r.get("hospital")) in self.plans]

    def choose_step(self, server_round: int, rows: list[dict[str, Any]]) -> ServerStep:
        """The step for this round's aggregated hospitals (``rows`` with status trained/resent)."""
        plans = self.round_plans(rows)
        n = num_parameters(self.reference.values()) if self.reference is not None else 0
        return auto_server_step(average_noise_ratio(plans, n) if plans and n else math.nan)

    def _choose_step(self, server_round: int, rows: list[dict[str, Any]]) -> None:
        g = self.global_round(server_round)
        step = self.choose_step(server_round, rows)
        prev = self.steps[max(self.steps)] if self.steps else None
        if prev is None or (prev.momentum, round(prev.lr, 2)) != (step.momentum, round(step.lr, 2)):
            self.say(f"round {g}: server step {step.describe()}")
        if prev is None and self.round_offset == 0:  # the run's first aggregated round, not a resumed run's
            self._advise_width(g, rows)
        self.steps[g] = step
        self.server_momentum, self.server_learning_rate = step.momentum, step.lr

    def _advise_width(self, g: int, rows: list[dict[str, Any]]) -> None:
        """At the run's first aggregated round (not again when a run resumes): when a narrower
        model would carry markedly less DP noise for the hospitals of that round
        (:func:`xrayfed.server.model_plan.recommend_model`), say so.
        The width of a run is fixed (the hospitals' plans arrive only with their first replies); it
        takes effect in a new run, as ``xrayfed simulate`` plans it."""
        from xrayfed.server.model_plan import narrowable, recommend_model

        if not narrowable(self.cfg.model):
            return
        advice = recommend_model(self.cfg.model, self.round_plans(rows))
        if advice.changed:
            self.say(f"round {g}: for hospitals like these a new run would plan {advice.describe()} "
                     f"({advice.toml()} in federation.toml; xrayfed simulate plans it)")


class XrayFedAvg(XrayStrategyMixin, FedAvg):
    """FedAvg (weighted by example counts) with xrayfed's round hooks."""


class XrayFedAvgM(XrayStrategyMixin, FedAvgM):
    """FedAvg with server momentum, with xrayfed's round hooks."""


class XrayFedProx(XrayStrategyMixin, FedProx):
    """FedProx (the proximal term is applied by the hospitals), with xrayfed's round hooks."""


class XrayFedAdam(XrayStrategyMixin, FedAdam):
    """FedAdam (Adam on the server), with xrayfed's round hooks."""


#: ``[federation] strategy`` → its class.
STRATEGIES: dict[str, type[XrayStrategyMixin]] = {
    "fedavg": XrayFedAvg, "fedavgm": XrayFedAvgM, "fedprox": XrayFedProx, "fedadam": XrayFedAdam,
    "auto": XrayAuto,
}


def make_strategy(cfg: FederationConfig, round_offset: int = 0, anchors: dict[str, tuple[int, str]] | None = None,
                  say: Callable[[str], None] = log.info, plans: dict[str, HospitalPlan] | None = None):
    """The configured strategy (:data:`STRATEGIES`), extended with xrayfed's round hooks
    (:class:`XrayStrategyMixin`).

    ``anchors``: ``{hospital: (seq, head)}``, the ledger heads recorded so far (a resumed run
    reads them from metrics.jsonl). Every training request carries them (keyed by
    :func:`xrayfed.common.privacy.ledger.anchor_id`, not by name) so each hospital can check that its
    ledger still holds the line it reported: truncation or rollback is caught at its next round.
    ``say``: where the operator's lines go (the server's summary lines).
    ``plans``: ``{hospital: plan}`` pinned at each hospital's first reply (:func:`pinned_plans`;
    a resumed run reads them from metrics.jsonl).
    """
    return STRATEGIES[cfg.federation.strategy](cfg, round_offset=round_offset, anchors=anchors, say=say, plans=plans,
                                               **flower_kwargs(cfg))
