"""Toy ServerApp: FedAvg (Message API) on tiny numpy arrays, plainly or through SecAgg+.

Run config: ``mode`` ("fedavg" | "secagg"), ``num-rounds``, ``min-nodes``, ``out`` (JSON
result file: final arrays, what ``aggregate_train`` received, per-node rows and - with
SecAgg+ - a digest of everything the server received during the protocol).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()

INITIAL = {"w": np.arange(12, dtype=np.float32).reshape(3, 4) / 10.0, "b": np.zeros(5, dtype=np.float32)}


def _summ(rec) -> dict:
    return {k: v.numpy().tolist() for k, v in rec.items()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    mode = str(rc.get("mode", "fedavg"))
    out_path = str(rc.get("out", ""))
    seen: list[dict] = []  # what aggregate_train received (the aggregation boundary)
    protocol: list[dict] = []  # with SecAgg+: every exchange the server took part in

    class RecordingFedAvg(FedAvg):
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            for m in replies:
                row = {"node": int(m.metadata.src_node_id), "error": m.error.reason if m.has_error() else None}
                if not m.has_error():
                    row["arrays"] = [_summ(r) for r in m.content.array_records.values()]
                    row["metrics"] = [dict(r) for r in m.content.metric_records.values()]
                    row["configs"] = {k: {kk: vv for kk, vv in r.items() if isinstance(vv, (int, float, str, bool))}
                                      for k, r in m.content.config_records.items()}
                seen.append(row)
            ok = [m for m in replies if not m.has_error() and len(m.content.array_records) == 1]
            if not ok:
                return None, None
            return super().aggregate_train(server_round, ok)

    strategy = RecordingFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=int(rc.get("min-nodes", 2)),
                               min_available_nodes=int(rc.get("min-nodes", 2)))
    if mode == "secagg":
        from xrayfed.server.secagg import SecAggPlusConfig, SecAggPlusGrid

        def inspector(stage, sent, replies):
            for r in replies:
                row = {"stage": stage, "node": int(r.metadata.src_node_id),
                       "error": r.error.reason if r.has_error() else None}
                if not r.has_error():
                    row["array_records"] = {k: _summ(v) for k, v in r.content.array_records.items()}
                    blobs = []
                    for rec in r.content.config_records.values():
                        for v in rec.values():
                            if isinstance(v, list) and v and isinstance(v[0], bytes):
                                blobs.extend(x.hex() for x in v)
                            elif isinstance(v, bytes):
                                blobs.append(v.hex())
                    row["blobs"] = blobs
                protocol.append(row)

        cfg = SecAggPlusConfig(max_weight=float(rc.get("max-weight", 100.0)),
                               clipping_range=float(rc.get("clipping-range", 8.0)))
        grid = SecAggPlusGrid(grid, cfg, inspector=inspector)
    secagg_grid = grid if mode == "secagg" else None
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(array_dict={k: Array(v) for k, v in INITIAL.items()}),
                            num_rounds=int(rc.get("num-rounds", 1)), timeout=120, train_config=ConfigRecord({"lr": 0.1}))
    if out_path:
        res = {"mode": mode, "final": _summ(result.arrays), "initial": {k: v.tolist() for k, v in INITIAL.items()},
               "aggregate_train_received": seen, "protocol": protocol,
               "server_prg": [r.prg for r in getattr(secagg_grid, "rounds", [])]}
        tmp = Path(out_path).with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(res))
        tmp.replace(out_path)
