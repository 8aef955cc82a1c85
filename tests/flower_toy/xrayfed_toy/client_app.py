"""Toy ClientApp: the "trained" model is the global model plus a node-specific update.

node config: ``val`` (float) sets the update ``val * (1, 2, 3, ...)``-ish pattern,
``n`` (int) the example count, ``dump`` (folder) where the true update is written so the test
can compare it with what the server saw,
``require-secagg`` (bool) refuses plain training requests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from xrayfed.client.secagg import make_secagg_mod

app = ClientApp(mods=[make_secagg_mod(required=lambda ctx: bool(ctx.node_config.get("require-secagg", False)))])


def _update(shape: tuple[int, ...], val: float, salt: int) -> np.ndarray:
    rng = np.random.default_rng(abs(int(val * 1000)) + salt)
    return (val + 0.01 * rng.standard_normal(shape)).astype(np.float32)


@app.train()
def train(msg: Message, context: Context) -> Message:
    nc = context.node_config
    val = float(nc.get("val", 1.0))
    n = int(nc.get("n", 10))
    glob = msg.content["arrays"]
    local = {}
    for i, (k, a) in enumerate(glob.items()):
        g = a.numpy()
        local[k] = (g + _update(g.shape, val, i)).astype(g.dtype)
    dump = str(nc.get("dump", ""))
    if dump:
        Path(dump).mkdir(parents=True, exist_ok=True)
        out = {k: v.tolist() for k, v in local.items()}
        out["_global"] = {k: a.numpy().tolist() for k, a in glob.items()}
        out["_n"] = n
        out["_config"] = {k: v for k, v in msg.content["config"].items() if isinstance(v, (int, float, str, bool))}
        tmp = Path(dump) / f".update-{val}.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(out))
        tmp.replace(Path(dump) / f"update-{val}.json")
    content = RecordDict({
        "arrays": ArrayRecord(array_dict={k: Array(v) for k, v in local.items()}),
        "metrics": MetricRecord({"num-examples": n, "val": val}),
        "hospital": ConfigRecord({"status": "trained", "val": val}),
    })
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "loss": 0.5})}), reply_to=msg)
