"""The Flower ClientApp (thin): hand train/evaluate requests to :mod:`xrayfed.client.hospital`."""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Flower HTTP request otherwise


def _finite(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        v = float(v)
        out[k] = v if v == v and abs(v) != float("inf") else 0.0
    return out


@app.train()
def train(msg: Message, context: Context) -> Message:
    from .hospital import hospital_config_from_node, train_round

    cfg = hospital_config_from_node(dict(context.node_config))
    reply = train_round(cfg, dict(msg.content["config"]), msg.content["arrays"].to_torch_state_dict())
    content = RecordDict(
        {
            "metrics": MetricRecord(_finite(reply["metrics"])),
            "hospital": ConfigRecord(
                {"name": cfg.hospital.name, "status": reply["status"], "accountant": cfg.privacy.accountant,
                 "reason": reply.get("reason", "")}
            ),
        }
    )
    if "state_dict" in reply:
        content["arrays"] = ArrayRecord(reply["state_dict"])
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from .hospital import evaluate_round, hospital_config_from_node

    cfg = hospital_config_from_node(dict(context.node_config))
    metrics = evaluate_round(cfg, dict(msg.content["config"]), msg.content["arrays"].to_torch_state_dict())
    return Message(content=RecordDict({"metrics": MetricRecord(_finite(metrics))}), reply_to=msg)
