"""SecAgg+ on the hospital side: a Flower mod for a Message-API ``ClientApp``.

Use it on the ``ClientApp`` (or only on its train function)::

    from xrayfed.client.secagg import make_secagg_mod

    app = ClientApp(mods=[make_secagg_mod()])          # or @app.train(mods=[...])

What it does with a training message:

* **Not a SecAgg+ message** (plain Message-API FedAvg): passed to the train function
  unchanged - unless ``required`` says this hospital only trains under secure aggregation, in
  which case it answers with an error and trains nothing.
* **A SecAgg+ message** (from :mod:`xrayfed.server.secagg`): Flower's ``secaggplus_mod`` runs
  the four protocol stages (key setup, key-share exchange, masked upload, unmasking). In the
  masked-upload stage this module turns Flower's legacy ``FitIns`` back into the usual
  ``{"arrays": ArrayRecord, "config": ConfigRecord}`` content, calls the train function, and
  hands its reply to ``secaggplus_mod`` as the vector to mask: ``local - global`` (mode
  ``delta``) or the local weights (mode ``weights``), weighted by the reply's
  ``num-examples``. The train function's arrays never leave the hospital unmasked; its other
  records (metrics, status) travel in plaintext as usual.
  A train function that returns no arrays (e.g. the privacy budget is spent) contributes a
  zero vector with weight 0: the round goes on without it and the sum is unchanged.

Differential privacy is unaffected: the train function (Opacus) has already made the update
(ε, δ)-DP before it is masked; masking, clipping to ``clipping_range`` and quantisation are
post-processing.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from xrayfed.common.protocol import secagg as secagg_protocol

log = logging.getLogger(__name__)

ERROR_CODE = 0x5EC  # flwr.app.Error code used for the hospital's refusals

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


class SecAggRefused(RuntimeError):
    """The hospital will not contribute to this SecAgg+ round (reason in the message)."""


def is_secagg_message(msg: Message) -> bool:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    return msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records


def make_secagg_mod(required: bool | Callable[[Context], bool] = False) -> Mod:
    """A mod that runs Flower's SecAgg+ around a Message-API train function.

    ``required``: ``True`` (or a function of the node's ``Context`` returning ``True``) makes
    the hospital refuse plain training requests, so an update can only leave it masked.
    """

    def secagg_mod(msg: Message, ctxt: Context, call_next) -> Message:
        from flwr.app.message_type import MessageType
        from flwr.client.mod import secaggplus_mod

        if not msg.metadata.message_type.startswith(MessageType.TRAIN):
            return call_next(msg, ctxt)
        if not is_secagg_message(msg):
            must = required(ctxt) if callable(required) else bool(required)
            if must:
                log.warning("refusing a training request without secure aggregation (this hospital requires it)")
                return Message(Error(ERROR_CODE, "hospital requires secure aggregation (SecAgg+); "
                                                 "plain training request refused"), reply_to=msg)
            return call_next(msg, ctxt)
        with secagg_protocol.strong_masks():
            return secaggplus_mod(msg, ctxt, _legacy_adapter(call_next))

    return secagg_mod


# The default: accept both plain and SecAgg+ training requests.
secagg_mod = make_secagg_mod()


def _legacy_adapter(call_next):
    """Legacy FitIns content -> Message-API content -> train function -> legacy FitRes content."""

    def adapter(msg: Message, ctxt: Context) -> Message:
        from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
        from flwr.compat.common import recorddict_compat as compat

        content = msg.content
        cfg = content.config_records["fitins.config"]
        if cfg.get(secagg_protocol.K_PROTOCOL) != secagg_protocol.PROTOCOL:
            raise SecAggRefused(f"unknown secure-aggregation protocol {cfg.get(secagg_protocol.K_PROTOCOL)!r} (expected {secagg_protocol.PROTOCOL!r})")
        if cfg.get(secagg_protocol.K_PRG) != secagg_protocol.PRG_NAME:
            raise SecAggRefused(f"server asked for mask generator {cfg.get(secagg_protocol.K_PRG)!r}; only {secagg_protocol.PRG_NAME!r} "
                                "is accepted (Flower's default uses 32-bit seeds)")
        keys = json.loads(str(cfg[secagg_protocol.K_KEYS]))
        names = json.loads(str(cfg[secagg_protocol.K_RECORDS]))
        mode = str(cfg[secagg_protocol.K_MODE])
        weight_key = str(cfg[secagg_protocol.K_WEIGHT_KEY])
        max_weight = float(cfg[secagg_protocol.K_MAX_WEIGHT])
        clip = float(cfg[secagg_protocol.K_CLIP])
        if mode not in ("delta", "weights"):
            raise SecAggRefused(f"unknown secure-aggregation mode {mode!r}")

        global_nd = parameters_to_ndarrays(compat.arrayrecord_to_parameters(content.array_records["fitins.parameters"],
                                                                            keep_input=True))
        if len(global_nd) != len(keys):
            raise SecAggRefused(f"{len(global_nd)} arrays but {len(keys)} names")
        arrays = ArrayRecord(array_dict={k: Array(np.asarray(a)) for k, a in zip(keys, global_nd)})
        train_cfg = ConfigRecord({k: v for k, v in cfg.items() if not k.startswith(secagg_protocol.K_PROTOCOL)})
        msg.content = RecordDict({names["arrays"]: arrays, names["config"]: train_cfg})

        reply = call_next(msg, ctxt)
        if reply.has_error():
            raise SecAggRefused(f"training failed: {reply.error.reason}")
        out = reply.content
        local = [rec for rec in out.array_records.values()]
        metrics = [rec for rec in out.metric_records.values()]
        weight = 0.0
        if local:
            if len(local) != 1:
                raise SecAggRefused(f"train function returned {len(local)} ArrayRecords (expected 1)")
            rec = local[0]
            if set(rec.keys()) != set(keys):
                raise SecAggRefused("train function returned arrays whose names differ from the global model's")
            for m in metrics:
                if weight_key in m:
                    weight = float(m[weight_key])
            if weight <= 0:
                raise SecAggRefused(f"reply has arrays but no positive {weight_key!r} in its MetricRecord")
            if weight > max_weight:
                raise SecAggRefused(f"weight {weight:g} exceeds the federation's SecAgg+ max_weight {max_weight:g}; "
                                    "the operator must raise max_weight")
            loc = [np.asarray(rec[k].numpy(), dtype=np.float64) for k in keys]
            vec = [lv - g.astype(np.float64) for lv, g in zip(loc, global_nd)] if mode == "delta" else loc
        else:  # nothing trained (budget spent / refused): contribute zeros with weight 0
            vec = [np.zeros(np.shape(g), dtype=np.float64) for g in global_nd]
        # Only logged here: a statistic of the individual update must not travel in the clear.
        clipped = int(sum(int(np.count_nonzero(np.abs(v) * weight / max_weight > clip)) for v in vec))
        if clipped:
            log.warning("SecAgg+: %d values of this hospital's update exceed clipping_range %.3g after weighting "
                        "by %g/%g and are clipped; ask the operator to raise clipping_range", clipped, clip,
                        weight, max_weight)

        legacy = RecordDict()
        for k, r in out.items():  # plaintext records (metrics, status) go through unchanged
            if not isinstance(r, ArrayRecord):
                legacy[k] = r
        legacy[secagg_protocol.SECAGG_INFO_RECORD] = ConfigRecord(
            {"mode": mode, "weight": float(weight), "prg": secagg_protocol.active_prg("client")}
        )
        legacy.config_records["fitres.metrics"] = ConfigRecord({})
        legacy.metric_records["fitres.num_examples"] = MetricRecord({"num_examples": int(round(weight))})
        legacy.array_records["fitres.parameters"] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(vec), keep_input=False
        )
        legacy.config_records["fitres.status"] = ConfigRecord({"code": 0, "message": "Success"})
        return Message(legacy, reply_to=msg)

    return adapter
