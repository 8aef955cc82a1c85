"""The messages of a federated training round, defined once and used by both sides (the
server's strategy builds requests and reads replies; the hospital's ClientApp reads requests
and builds replies), as :mod:`xrayfed.common.protocol.secagg` does for SecAgg+.

**Request** (server → hospital, the round's ``ConfigRecord``, :class:`RoundRequest`): the
federation's name, the global round number, the model architecture and task (JSON), the image
size, the learning rate, FedProx's μ (set by Flower's FedProx), and the ledger heads the server
recorded after each hospital's last reply (``ledger-anchors``, keyed by
:func:`xrayfed.common.privacy.ledger.anchor_id`). No privacy parameter: the hospital's budget is
its own.

**Training reply** (hospital → server, :class:`TrainReply`): ``metrics`` (a ``MetricRecord``:
:data:`HOSPITAL_METRICS`), ``hospital`` (a ``ConfigRecord``: name, status, accountant, reason,
ledger head) and, when an update leaves the hospital, ``arrays``. Statuses: ``trained`` (a new
update, charged), ``resent`` (the byte-identical update of an earlier charge), ``refused``
(nothing sent: budget, ledger check or a repeated request); ``failed`` is what the server writes
for a reply that is an error.

**Run finished** (server → every connected hospital, once, after the last round:
:class:`RunFinished`, a ``query.run_finished`` message): the federation's name and the number of
rounds it ran. The hospital records it in its state folder and its ``xrayfed client`` stops.
It carries no instruction beyond "this run is over": a hostile server gains nothing by sending
it early that it could not get by sending no more rounds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from xrayfed.common.errors import UserError
from xrayfed.common.modelspec import ModelSpec
from xrayfed.common.prediction import TaskSpec

# Keys of the round's ConfigRecord.
FEDERATION, ROUND, MODEL, TASK, IMAGE_SIZE, LR = "federation", "round", "model", "task", "image-size", "lr"
PROXIMAL_MU = "proximal-mu"  # written by Flower's FedProx strategy
LEDGER_ANCHORS = "ledger-anchors"

# Records of a training reply.
METRICS, HOSPITAL, ARRAYS = "metrics", "hospital", "arrays"
NUM_EXAMPLES = "num-examples"  # the FedAvg weight (Flower's key)

# Statuses.
TRAINED, RESENT, REFUSED, FAILED = "trained", "resent", "refused", "failed"
REJECTED = "rejected"  # set by the server: the update was malformed and not aggregated
SENT_AN_UPDATE = (TRAINED, RESENT)

#: Numeric fields a hospital reports with each training reply (its MetricRecord).
#: ``momentum`` and ``adam`` (the hospital's optimizer) complete the plan the server bounds each
#: update with (:mod:`xrayfed.server.aggregation`).
HOSPITAL_METRICS = (NUM_EXAMPLES, "epsilon", "delta", "epsilon_budget", "train_loss", "noise_multiplier",
                    "sample_rate", "steps", "max_grad_norm", "secure_rng", "secure_mode", "ledger_seq",
                    "momentum", "adam", "num_scans", "patient_unit")
#: Seconds a hospital spent on each stage of its reply (wall clock; not private, see
#: :mod:`xrayfed.client.timing`): process start-up and imports, decoding its scans, DP training,
#: the hand-over to its warm worker and back. Reported with every training reply.
TIME_METRICS = ("time_startup_s", "time_data_s", "time_train_s", "time_local_s")
HOSPITAL_METRICS = HOSPITAL_METRICS + TIME_METRICS
_FLAGS = ("secure_rng", "secure_mode", "adam", "patient_unit")


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
    #: ``((anchor id, seq, hash), ...)``: the ledger heads the server recorded
    ledger_anchors: tuple = ()

    def anchor_for(self, hospital: str) -> tuple[int, str] | None:
        """The head of this hospital's ledger that the server recorded after its last reply."""
        from xrayfed.common.privacy.ledger import anchor_id

        want = anchor_id(self.federation, hospital)
        for k, seq, head in self.ledger_anchors:
            if k == want:
                return int(seq), str(head)
        return None

    def to_config(self) -> dict[str, Any]:
        """The ConfigRecord entries (μ is left to Flower's FedProx, which writes it itself)."""
        return {FEDERATION: self.federation, ROUND: int(self.round), MODEL: json.dumps(self.model.model_dump()),
                TASK: json.dumps(self.task.to_dict()), IMAGE_SIZE: int(self.image_size), LR: float(self.lr),
                LEDGER_ANCHORS: json.dumps({k: [int(seq), str(head)] for k, seq, head in self.ledger_anchors})}

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> "RoundRequest":
        try:
            return cls(
                federation=str(c[FEDERATION]),
                round=int(c[ROUND]),
                model=ModelSpec(**json.loads(str(c[MODEL]))),
                task=TaskSpec.from_dict(json.loads(str(c[TASK]))),
                image_size=int(c[IMAGE_SIZE]),
                lr=float(c[LR]),
                proximal_mu=float(c.get(PROXIMAL_MU, 0.0)),
                ledger_anchors=tuple((str(k), int(v[0]), str(v[1]))
                                     for k, v in json.loads(str(c.get(LEDGER_ANCHORS, "{}"))).items()),
            )
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise UserError(f"round request from the server is malformed ({type(e).__name__}: {e})") from None


@dataclass
class TrainReply:
    """A hospital's answer to a training request."""

    hospital: str
    status: str
    accountant: str
    metrics: dict[str, float]
    reason: str = ""
    ledger_head: str = ""
    state_dict: dict | None = field(default=None, repr=False)

    def to_content(self):
        """The reply's ``RecordDict`` (non-finite metrics are sent as 0)."""
        from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

        content = RecordDict({
            METRICS: MetricRecord(finite_metrics(self.metrics)),
            HOSPITAL: ConfigRecord({"name": self.hospital, "status": self.status, "accountant": self.accountant,
                                    "reason": self.reason, "ledger_head": self.ledger_head}),
        })
        if self.state_dict is not None:
            content[ARRAYS] = ArrayRecord(self.state_dict)
        return content


#: The action of the run-finished query (Flower message type ``query.run_finished``) and its record.
RUN_FINISHED_ACTION = "run_finished"
RUN_FINISHED = "run-finished"


@dataclass(frozen=True)
class RunFinished:
    """The server's last message to each hospital: its run is over after ``rounds`` rounds."""

    federation: str
    rounds: int

    def to_content(self):
        from flwr.app import ConfigRecord, RecordDict

        return RecordDict({RUN_FINISHED: ConfigRecord({FEDERATION: self.federation, "rounds": int(self.rounds)})})

    @classmethod
    def from_content(cls, content) -> "RunFinished":
        """Read the query's ``RecordDict``; a malformed one is a ``UserError`` (the texts are the
        server's: made one line and bounded)."""
        from xrayfed.common.logs import untrusted

        try:
            rec = content.config_records[RUN_FINISHED]
            rounds = int(rec["rounds"])
            if rounds < 0:
                raise ValueError("negative rounds")
            return cls(federation=untrusted(rec[FEDERATION], 64), rounds=rounds)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise UserError(f"run-finished message from the server is malformed ({type(e).__name__})") from None


def finite_metrics(metrics: dict) -> dict[str, float]:
    """Metrics as floats, NaN/Inf replaced by 0 (a MetricRecord must be finite)."""
    out = {}
    for k, v in metrics.items():
        v = float(v)
        out[k] = v if v == v and abs(v) != float("inf") else 0.0
    return out


def reply_row(msg) -> dict[str, Any]:
    """One hospital's row for metrics.jsonl from its training reply (a Flower ``Message``).

    Every text in it is the hospital's own words: made one line and bounded
    (:func:`xrayfed.common.logs.untrusted`) before any log or report shows it. The name is what
    the hospital *claims*; the strategy checks it against the name its key was registered under."""
    from flwr.app import ConfigRecord, MetricRecord

    from xrayfed.common.logs import untrusted

    row: dict[str, Any] = {"node_id": int(msg.metadata.src_node_id)}
    if msg.has_error():
        row.update(hospital=f"node-{row['node_id']}", status=FAILED, error=untrusted(msg.error.reason, 200))
        return row
    content = msg.content
    info = content.get(HOSPITAL)
    if isinstance(info, ConfigRecord):
        row["hospital"] = untrusted(info.get("name", f"node-{row['node_id']}"), 64)
        status = str(info.get("status", TRAINED))
        row["status"] = status if status in (TRAINED, RESENT, REFUSED) else untrusted(status, 32)
        row["accountant"] = untrusted(info.get("accountant", ""), 16)
        if info.get("reason"):
            row["reason"] = untrusted(info["reason"])
        if info.get("ledger_head"):
            row["ledger_head"] = untrusted(info["ledger_head"], 64)
    else:
        row.update(hospital=f"node-{row['node_id']}", status=TRAINED)
    metrics = content.get(METRICS)
    if isinstance(metrics, MetricRecord):
        for k in HOSPITAL_METRICS:
            if k in metrics:
                v = metrics[k]
                if not isinstance(v, (int, float)) or not math.isfinite(v):
                    continue  # a hostile or broken reply: the number is left out, never trusted
                key = "num_examples" if k == NUM_EXAMPLES else k
                row[key] = bool(v) if k in _FLAGS else int(v) if k == "ledger_seq" else v
    return row


def has_update(msg) -> bool:
    """Whether a training reply carries an update (one ArrayRecord)."""
    return (not msg.has_error()) and len(msg.content.array_records) == 1
