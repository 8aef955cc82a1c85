"""The Flower ClientApp (thin): hand train/evaluate requests to :mod:`xrayfed.client.hospital`.

Secure aggregation: the ClientApp carries xrayfed's SecAgg+ mod
(:func:`xrayfed.client.secagg.make_secagg_mod`). When the server runs SecAgg+
(``[federation] secure_aggregation = true``) the hospital's trained weights leave this machine
only masked (the server learns the sum over hospitals); with ``[hospital]
require_secure_aggregation = true`` a plain (unmasked) training request is refused.

What still travels in plaintext with every training reply, SecAgg+ or not (the ``metrics`` and
``hospital`` records below): the hospital's name and status (trained / resent / refused, and the
refusal reason), ``num-examples`` (its FedAvg weight), its cumulative ε, δ, ε budget, σ, q,
steps, C, the noise-source flags, the head of its privacy ledger (``ledger_seq`` and
``ledger_head``, an HMAC: the server keeps it as an anchor against truncation) and ``train_loss`` (the mean training loss of the round, a
statistic of the local data that is *not* covered by the DP guarantee), the seconds each stage of
the reply took (``time_startup_s``, ``time_data_s``, ``time_train_s``, ``time_local_s``:
:mod:`xrayfed.client.timing`; the server could time the reply anyway), and with SecAgg+ the
``secagg`` record (mode, weight, mask generator). Evaluation replies (only when the server has
no held-out set) carry the hospital's validation metrics in plaintext.

The end of the run: the server's last message is a ``query.run_finished``
(:class:`~xrayfed.common.protocol.rounds.RunFinished`); :func:`run_finished` records it in the
hospital's state folder, where ``xrayfed client`` (:mod:`xrayfed.client.supernode`) sees it and
stops. It can only come through the SuperLink this hospital joined (TLS, its own key), and it
changes nothing in the hospital's state but that note.

The hospital's warm worker: ``xrayfed client`` starts one long-lived process that keeps torch,
the decoded scans and the DP engine between rounds (:mod:`xrayfed.client.worker`); this
per-message ClientApp (torch-free) forwards training and evaluation requests to it over a unix
socket only this hospital can open, and runs them in its own process when no worker answers
(a simulation, or the worker not up). The SecAgg+ mod, masking included, runs here either way.

At rest: the privacy ledger and the cached released updates are encrypted with the key from
``$XRAYFED_ATREST_KEY_FILE`` / ``$XRAYFED_ATREST_KEY`` (``xrayfed client --atrest-key-file``
sets the former for the SuperNode and its ClientApp processes).
"""

from __future__ import annotations

import logging
import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from xrayfed.client.nodeconfig import hospital_config_from_node
from xrayfed.client.secagg import make_secagg_mod
from xrayfed.client.timing import process_age_s
from xrayfed.client.worker import WorkerLost, forward
from xrayfed.common.errors import UserError
from xrayfed.common.logs import configure_flower_logging, configure_logging, untrusted
from xrayfed.common.protocol.rounds import (
    METRICS,
    REFUSED,
    RUN_FINISHED,
    RUN_FINISHED_ACTION,
    RunFinished,
    TrainReply,
    finite_metrics,
)

configure_logging()
configure_flower_logging()
log = logging.getLogger(__name__)


def _requires_secure_aggregation(context: Context) -> bool:
    return bool(hospital_config_from_node(dict(context.node_config)).hospital.require_secure_aggregation)


app = ClientApp(mods=[make_secagg_mod(required=_requires_secure_aggregation)])


def _atrest_key():
    from xrayfed.common.security.atrest import load_key

    return load_key()  # $XRAYFED_ATREST_KEY_FILE / $XRAYFED_ATREST_KEY; None: plaintext


def _refusal_reason(cfg, what: str, kind: str) -> str:
    """What the server may read of an error of this hospital's: its kind only, never its text
    (which can name the hospital's files); the error itself is logged in full where it happened."""
    return (f"hospital {cfg.hospital.name}: {what} could not be handled ({kind}); the details are in "
            "the hospital's own log")


def _unhandled(cfg, what: str, e: BaseException) -> str:
    """Log an error of this hospital's in full, here, and return what the server may read of it."""
    log.error("%s could not be handled: %s", what, e, exc_info=not isinstance(e, UserError))
    return _refusal_reason(cfg, what, type(e).__name__)


def _in_worker(op: str, msg: Message):
    """``(header, arrays, seconds)`` of ``op`` run by this hospital's warm worker
    (:mod:`xrayfed.client.worker`), or None to run it in this process (no worker, or it went away:
    a request it had charged is retrained exactly as charged, see the worker's docstring)."""
    t0 = time.perf_counter()
    try:
        out = forward(op, dict(msg.content["config"]), msg.content["arrays"])
    except WorkerLost as e:
        log.warning("%s; running it in this process instead (the privacy ledger decides what may be released)", e)
        return None
    return None if out is None else (*out, time.perf_counter() - t0)


@app.train()
def train(msg: Message, context: Context) -> Message:
    startup_s = process_age_s()
    cfg = hospital_config_from_node(dict(context.node_config))
    try:
        fwd = _in_worker("train", msg)
        if fwd is not None:
            header, arrays, took = fwd
            if not header.get("ok"):
                reason = _refusal_reason(cfg, "a training request", untrusted(header.get("error", "Error"), 64))
                content = TrainReply(hospital=cfg.hospital.name, status=REFUSED, accountant=cfg.privacy.accountant,
                                     metrics={}, reason=reason).to_content()
                return Message(content=content, reply_to=msg)
            reply = header["reply"]
            m = reply["metrics"]
            m["time_local_s"] = max(0.0, took - float(m.get("time_data_s", 0.0)) - float(m.get("time_train_s", 0.0)))
            reply["state_dict"] = arrays or None
        else:
            t0 = time.perf_counter()
            import xrayfed.client.hospital  # noqa: F401 - torch and Opacus: only the stage that trains loads them
            from xrayfed.client.timing import train_timed

            state_dict = msg.content["arrays"].to_torch_state_dict()
            startup_s += time.perf_counter() - t0
            reply = train_timed(cfg, dict(msg.content["config"]), state_dict, atrest_key=_atrest_key())
            # the same metric names as a worker's reply: Flower's strategy refuses to aggregate
            # replies whose metrics differ in their names (one hospital without its worker)
            reply["metrics"]["time_local_s"] = 0.0
        reply["metrics"]["time_startup_s"] = startup_s
    except Exception as e:  # noqa: BLE001 - nothing of the hospital's file system goes back to the server
        reason = _unhandled(cfg, "a training request", e)
        content = TrainReply(hospital=cfg.hospital.name, status=REFUSED, accountant=cfg.privacy.accountant,
                             metrics={}, reason=reason).to_content()
        return Message(content=content, reply_to=msg)
    # Plaintext records (see the module docstring); under SecAgg+ only the arrays are masked.
    content = TrainReply(hospital=cfg.hospital.name, status=reply["status"], accountant=cfg.privacy.accountant,
                         metrics=reply["metrics"], reason=reply.get("reason", ""), ledger_head=reply["ledger"]["head"],
                         state_dict=reply.get("state_dict")).to_content()
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = hospital_config_from_node(dict(context.node_config))
    try:
        fwd = _in_worker("evaluate", msg)
        if fwd is not None:
            header = fwd[0]
            if not header.get("ok"):
                raise RuntimeError(untrusted(header.get("error", "Error"), 64))  # logged by the worker in full
            metrics = header["metrics"]
        else:
            import xrayfed.client.hospital  # noqa: F401 - torch
            from xrayfed.client.timing import evaluate_timed

            metrics = evaluate_timed(cfg, dict(msg.content["config"]), msg.content["arrays"].to_torch_state_dict())
    except Exception as e:  # noqa: BLE001 - as in train: the server learns the error's kind only
        _unhandled(cfg, "an evaluation request", e)
        metrics = {"num-examples": 0}
    return Message(content=RecordDict({METRICS: MetricRecord(finite_metrics(metrics))}), reply_to=msg)


@app.query(RUN_FINISHED_ACTION)
def run_finished(msg: Message, context: Context) -> Message:
    """The server's run is over: note it in the state folder (``xrayfed client`` then stops)."""
    from flwr.app import ConfigRecord

    from xrayfed.client.supernode import record_finished

    cfg = hospital_config_from_node(dict(context.node_config))
    note = RunFinished.from_content(msg.content)  # malformed: an error reply, nothing recorded
    record_finished(cfg.hospital.state_dir, note)
    log.info("the server says its run %r is finished after %d rounds", note.federation, note.rounds)
    return Message(content=RecordDict({RUN_FINISHED: ConfigRecord({"hospital": cfg.hospital.name})}), reply_to=msg)
