"""SecAgg+ on the server side, under Flower's Message-API strategies.

Flower 1.41 ships SecAgg+ only as a *legacy* workflow: ``SecAggPlusWorkflow`` needs a
``LegacyContext`` with a legacy ``flwr.server.strategy.Strategy`` (``configure_fit`` /
``aggregate_fit``), and the hospital side is ``secaggplus_mod``, which expects legacy
``FitIns``/``FitRes`` content. The Message-API strategies (``flwr.serverapp.strategy.FedAvg``,
FedProx, FedAdam, ...) have no SecAgg+ option. This module runs Flower's unmodified workflow
for one training round at a time and presents the result to a Message-API strategy:

* :func:`secagg_train_round` takes the strategy's training messages, runs the four SecAgg+
  stages through the real ``Grid``, and returns the securely aggregated arrays (the weighted
  average of the hospitals' updates, under their original names and dtypes) and every node's
  reply with its masked vector removed.
* :class:`SecAggPlusGrid` wraps the ``Grid`` a strategy's ``start()`` gets. Training rounds go
  through :func:`secagg_train_round`; each participating node's reply then carries the
  *aggregate* (never its own update) plus its plaintext metrics, so ``aggregate_train`` of
  FedAvg/FedProx/FedAdam returns the secure aggregate (a weighted mean of identical arrays).
  Evaluation and other messages pass through unchanged. ::

      grid = SecAggPlusGrid(grid, SecAggPlusConfig())   # in the ServerApp's main
      strategy.start(grid=grid, initial_arrays=..., num_rounds=...)

The hospitals need :func:`xrayfed.client.secagg.make_secagg_mod` on their ``ClientApp``.

What the server-side code can see (the aggregation boundary): per node, its SecAgg+ public
keys, encrypted key shares addressed to other nodes, its masked vector (uniform modulo
``modulus_range`` without the masks), the key shares that remove the masks of the *sum*, and
its plaintext metrics/weight. ``inspector`` (tests) is called with every protocol exchange.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from xrayfed.common.errors import UserError
from xrayfed.common.protocol import secagg as secagg_protocol

log = logging.getLogger(__name__)

ERROR_CODE = 0x5EC

Inspector = Callable[[str, list[Message], list[Message]], None]


@dataclass(frozen=True)
class SecAggPlusConfig:
    """SecAgg+ parameters (Flower's ``SecAggPlusWorkflow`` plus xrayfed's update mode).

    num_shares: shares each hospital's secrets are split into (its neighbourhood size, itself
        included). A float is a fraction of the hospitals sampled in the round; 1.0 = everyone
        (the complete graph, i.e. classic SecAgg).
    reconstruction_threshold: shares needed to rebuild a secret (int, or float fraction of
        num_shares; at least 2). Higher = more colluders needed, fewer dropouts tolerated:
        a round survives at most ``num_shares - threshold`` hospitals dropping out. 1.0 (all
        shares) tolerates no dropout and gives the strongest protection.
    clipping_range: each value of ``weight / max_weight × vector`` is clipped to ±this before
        quantisation (vector = local − global in mode ``delta``).
    quantization_range: integer levels over [−clipping_range, clipping_range]; the rounding
        error per value and hospital is ≤ clipping_range / quantization_range (stochastic
        rounding, unbiased). hospitals × quantization_range must stay below modulus_range.
    modulus_range: masks are uniform modulo this (power of two, ≤ 2**32).
    max_weight: the largest weight (num-examples) a hospital may report; a larger one is
        refused by the hospital. Precision falls with weight / max_weight, so set it close to
        the largest hospital's example count.
    mode: ``delta`` (mask the change local − global; small values, best precision) or
        ``weights`` (mask the local weights, like Flower's examples).
    weight_key: MetricRecord key of each hospital's FedAvg weight.
    timeout: seconds to wait for the replies of each stage (None: no limit).
    """

    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 1.0
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    max_weight: float = 100_000.0
    mode: Literal["delta", "weights"] = "delta"
    weight_key: str = "num-examples"
    timeout: float | None = None


    @classmethod
    def from_section(cls, section, timeout: float | None = None) -> "SecAggPlusConfig":
        """From the operator's ``[secure_aggregation]`` section
        (:class:`xrayfed.common.config.SecureAggregationSection`): counts above 1 are integers,
        fractions stay floats."""

        def num(v: float) -> int | float:
            return int(v) if v > 1.0 else float(v)

        return cls(num_shares=num(section.num_shares), reconstruction_threshold=num(section.reconstruction_threshold),
                   clipping_range=float(section.clipping_range), quantization_range=int(section.quantization_range),
                   modulus_range=int(section.modulus_range), max_weight=float(section.max_weight), mode=section.mode,
                   timeout=timeout)
    def workflow(self):
        from flwr.server.workflow import SecAggPlusWorkflow

        try:
            return SecAggPlusWorkflow(
                num_shares=self.num_shares,
                reconstruction_threshold=self.reconstruction_threshold,
                max_weight=float(self.max_weight),
                clipping_range=float(self.clipping_range),
                quantization_range=int(self.quantization_range),
                modulus_range=int(self.modulus_range),
                timeout=self.timeout,
            )
        except (TypeError, ValueError) as e:
            raise UserError(f"secure aggregation settings: {e}") from None

    def max_error(self, num_hospitals: int, total_weight: float) -> float:
        """Bound on |secure aggregate − exact weighted mean| per value (quantisation only)."""
        step = 2.0 * self.clipping_range / self.quantization_range
        return num_hospitals * step / (total_weight / self.max_weight) + 1e-12


@dataclass
class SecAggRound:
    """The outcome of one SecAgg+ training round."""

    arrays: ArrayRecord | None  # weighted mean of the contributions (None: round failed / nobody trained)
    replies: dict[int, Message] = field(default_factory=dict)  # node -> reply (aggregate + plaintext records)
    contributors: list[int] = field(default_factory=list)  # nodes whose update is in the aggregate
    weights: dict[int, float] = field(default_factory=dict)  # node -> plaintext weight (0 = contributed nothing)
    failures: dict[int, str] = field(default_factory=dict)  # node -> reason
    halted: bool = False  # Flower's workflow stopped (too few nodes / shares)
    prg: str = ""  # mask generator used by the server side (secagg_protocol.PRG_NAME)


# --------------------------------------------------------------------------- legacy adapters
def _capture_strategy(pairs):
    """A legacy Strategy that hands out fixed FitIns and captures what aggregate_fit gets."""
    from flwr.server.strategy import Strategy

    class _Capture(Strategy):
        def __init__(self) -> None:
            self.pairs = pairs
            self.results = None
            self.failures = None

        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return list(self.pairs)

        def aggregate_fit(self, server_round, results, failures):
            # SecAggPlusWorkflow gives every result the same (aggregated) parameters.
            self.results = list(results)
            self.failures = list(failures)
            return (self.results[0][1].parameters if self.results else None), {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return _Capture()


class _Tap:
    """Grid proxy that records every SecAgg+ exchange (and shows it to an inspector)."""

    def __init__(self, grid: Grid, inspector: Inspector | None) -> None:
        self.grid = grid
        self.inspector = inspector
        self.by_stage: dict[str, list[Message]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

        sent = list(messages)
        stage = "?"
        if sent and RECORD_KEY_CONFIGS in sent[0].content.config_records:
            stage = str(sent[0].content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, "?"))
        replies = list(self.grid.send_and_receive(sent, timeout=timeout))
        self.by_stage[stage] = replies
        if self.inspector is not None:
            self.inspector(stage, sent, replies)
        return replies


def _single(records: dict, kind: str, msg: Message) -> str:
    if len(records) != 1:
        raise UserError(f"secure aggregation: a training message must carry exactly one {kind} "
                        f"(node {msg.metadata.dst_node_id} got {len(records)})")
    return next(iter(records))


# --------------------------------------------------------------------------- one round
def secagg_train_round(
    grid: Grid,
    messages: Iterable[Message],
    cfg: SecAggPlusConfig = SecAggPlusConfig(),
    *,
    server_round: int | None = None,
    inspector: Inspector | None = None,
) -> SecAggRound:
    """Run one FedAvg training round through Flower's SecAgg+ workflow.

    ``messages`` are Message-API training messages (one per node, each with one ArrayRecord -
    the global model - and one ConfigRecord). Returns the weighted mean of the hospitals'
    results (weights: ``cfg.weight_key``), computed without the server ever holding an
    individual update in the clear.
    """
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.server_config import ServerConfig
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WKey

    msgs = list(messages)
    out = SecAggRound(arrays=None)
    if len(msgs) < 2:
        for m in msgs:
            out.failures[m.metadata.dst_node_id] = "secure aggregation needs at least 2 hospitals in a round"
            out.replies[m.metadata.dst_node_id] = Message(
                Error(ERROR_CODE, "secure aggregation needs at least 2 hospitals in a round"), reply_to=m)
        out.halted = True
        log.error("secure aggregation needs at least 2 hospitals in a round (got %d): round skipped", len(msgs))
        return out

    first = msgs[0]
    ar_key = _single(first.content.array_records, "ArrayRecord", first)
    cr_key = _single(first.content.config_records, "ConfigRecord", first)
    global_rec = first.content.array_records[ar_key]
    keys = list(global_rec.keys())
    global_nd = [np.asarray(global_rec[k].numpy()) for k in keys]
    if server_round is None:
        server_round = int(first.content.config_records[cr_key].get("server-round", 0) or 0)

    run_id = int(grid.run.run_id) if hasattr(grid, "run") else 0
    pairs = []
    for m in msgs:
        node = int(m.metadata.dst_node_id)
        if _single(m.content.array_records, "ArrayRecord", m) != ar_key or list(m.content[ar_key].keys()) != keys:
            raise UserError("secure aggregation: all training messages of a round must carry the same model arrays")
        config = dict(m.content.config_records[_single(m.content.config_records, "ConfigRecord", m)])
        config.update({
            secagg_protocol.K_PROTOCOL: secagg_protocol.PROTOCOL,
            secagg_protocol.K_PRG: secagg_protocol.PRG_NAME,
            secagg_protocol.K_KEYS: json.dumps(keys),
            secagg_protocol.K_RECORDS: json.dumps({"arrays": ar_key, "config": cr_key}),
            secagg_protocol.K_MODE: cfg.mode,
            secagg_protocol.K_WEIGHT_KEY: cfg.weight_key,
            secagg_protocol.K_MAX_WEIGHT: float(cfg.max_weight),
            secagg_protocol.K_CLIP: float(cfg.clipping_range),
        })
        proxy = GridClientProxy(node_id=node, grid=grid, run_id=run_id)
        pairs.append((proxy, FitIns(parameters=ndarrays_to_parameters(global_nd), config=config)))

    strategy = _capture_strategy(pairs)
    base = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    ctx = LegacyContext(base, config=ServerConfig(num_rounds=1), strategy=strategy,
                        client_manager=SimpleClientManager())
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WKey.CURRENT_ROUND: int(server_round)})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    tap = _Tap(grid, inspector)
    workflow = cfg.workflow()
    with secagg_protocol.strong_masks():
        out.prg = secagg_protocol.active_prg("server")
        workflow(tap, ctx)  # type: ignore[arg-type]

    # Per-node replies: errors from any stage; the masked-upload reply otherwise.
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage

    for stage in (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK):
        for r in tap.by_stage.get(stage, []):
            node = int(r.metadata.src_node_id)
            if r.has_error():
                out.failures.setdefault(node, f"{stage}: {r.error.reason}")
                out.replies.setdefault(node, r)
    for r in tap.by_stage.get(Stage.COLLECT_MASKED_VECTORS, []):
        if r.has_error():
            continue
        node = int(r.metadata.src_node_id)
        w = float(r.content.metric_records["fitres.num_examples"]["num_examples"])
        out.weights[node] = w
        plain = RecordDict()
        for k, rec in r.content.items():
            if k == RECORD_KEY_CONFIGS or k.startswith("fitres.") or isinstance(rec, ArrayRecord):
                continue
            plain[k] = rec
        r.content = plain
        out.replies[node] = r
    for m in msgs:  # a node that never answered
        node = int(m.metadata.dst_node_id)
        if node not in out.replies:
            out.failures[node] = "no reply"
            out.replies[node] = Message(Error(ERROR_CODE, "no reply within the SecAgg+ round"), reply_to=m)

    total = sum(out.weights.values())
    if strategy.results is None:
        out.halted = True
        log.error("secure aggregation halted in round %s (failures: %s)", server_round, out.failures or "none")
        return out
    if total <= 0:
        log.warning("secure aggregation round %s: no hospital contributed an update", server_round)
        return out
    agg = parameters_to_ndarrays(strategy.results[0][1].parameters)
    if len(agg) != len(global_nd):
        raise RuntimeError("SecAgg+ returned a different number of arrays than were sent")
    arrays = {}
    for k, g, a in zip(keys, global_nd, agg):
        v = (g.astype(np.float64) + a) if cfg.mode == "delta" else a
        v = np.asarray(v).reshape(g.shape)
        if np.issubdtype(g.dtype, np.integer):
            v = np.rint(v)
        arrays[k] = Array(np.ascontiguousarray(v.astype(g.dtype)))
    out.arrays = ArrayRecord(array_dict=arrays)
    out.contributors = sorted(n for n, w in out.weights.items() if w > 0)
    for node in out.contributors:
        out.replies[node].content[ar_key] = out.arrays
    log.info("secure aggregation round %s: sum of %d hospitals' updates (total weight %g); failures: %d",
             server_round, len(out.contributors), total, len(out.failures))
    return out


# --------------------------------------------------------------------------- Grid wrapper
class SecAggPlusGrid(Grid):
    """A ``Grid`` whose training rounds run through SecAgg+ (see the module docstring)."""

    def __init__(self, grid: Grid, cfg: SecAggPlusConfig = SecAggPlusConfig(),
                 inspector: Inspector | None = None) -> None:
        self._grid = grid
        self.cfg = cfg
        self.inspector = inspector
        self.rounds: list[SecAggRound] = []
        cfg.workflow()  # validate the parameters before any round

    # -- delegation
    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    # -- training through SecAgg+
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        from flwr.app.message_type import MessageType

        msgs = list(messages)
        if msgs and all(m.metadata.message_type.split(".")[0] == MessageType.TRAIN for m in msgs):
            cfg = self.cfg
            if cfg.timeout is None and timeout is not None:
                cfg = replace(cfg, timeout=timeout)
            rnd = secagg_train_round(self._grid, msgs, cfg, inspector=self.inspector)
            self.rounds.append(rnd)
            return list(rnd.replies.values())
        return self._grid.send_and_receive(msgs, timeout=timeout)
