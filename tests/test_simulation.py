"""`xrayfed simulate` on Flower's Simulation Engine (Ray) runs the real ServerApp and
ClientApp; malformed updates are rejected before aggregation and the round goes on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psutil
import pytest

from xrayfed.common import cli
from xrayfed.server.strategy import check_update


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _ray_left() -> list[str]:
    names = ("raylet", "gcs_server", "ray::", "default_worker")
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if any(n in cmd for n in names) and p.status() != psutil.STATUS_ZOMBIE:
            out.append(cmd[:120])
    return out


def test_check_update_names_what_is_wrong():
    ref = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    ok = {"w": np.full((2, 3), 0.1, np.float32), "b": np.ones(3, np.float32)}
    assert check_update(ok, ref, 10.0) is None
    assert "shape [3, 2]" in check_update({**ok, "w": np.zeros((3, 2), np.float32)}, ref, 10.0)
    assert "NaN or Inf" in check_update({**ok, "b": np.array([0, np.nan, 0], np.float32)}, ref, 10.0)
    assert "NaN or Inf" in check_update({**ok, "b": np.array([0, np.inf, 0], np.float32)}, ref, 10.0)
    assert "missing ['b']" in check_update({"w": ok["w"]}, ref, 10.0)
    assert "exceeds max_update_norm 1" in check_update(ok, ref, 1.0)  # ‖Δ‖ = √(6·0.01 + 3) ≈ 1.75


@pytest.mark.slow
def test_simulate_runs_the_real_apps_samples_skewed_hospitals_and_reports(tmp_path, capsys):
    from test_report import check_demo_run_report

    from xrayfed.client.dp import PrivacyLedger
    from xrayfed.common.config import HospitalConfig, load_config

    out = tmp_path / "sim"
    # 16 px synthetic scans (the default is 32): half the time, and the model still learns
    assert cli.main(["simulate", "--hospitals", "4", "--rounds", "2", "--fraction", "0.75", "--min-clients", "3",
                     "--size-skew", "0.5", "--image-size", "16", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "4 hospitals on Flower's Simulation Engine" in said and "round 2: test AUC" in said
    rows = _rows(out / "run")
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:  # 3 of the 4 hospitals sampled per round, each trained under its own budget
        assert len(r["participants"]) == 3 and all(h["status"] == "trained" for h in r["hospitals"])
    assert rows[-1]["eval"]["auc"] >= 0.85  # the global model learned (0.92–0.97 in 4 trials at 32 px; 0.995 and 0.996 at 16)
    sizes = {}
    trained: dict[str, int] = {}
    for r in rows:
        for h in r["hospitals"]:
            sizes[h["hospital"]] = h["num_examples"]
            trained[h["hospital"]] = trained.get(h["hospital"], 0) + 1
    for i in range(4):  # every hospital's ledger holds exactly the rounds it was sampled for
        cfg = load_config(HospitalConfig, out / "hospital-configs" / f"hospital-{i:03d}.toml")
        ledger = PrivacyLedger(cfg.hospital.state_dir, cfg)
        assert [rec["event"] for rec in ledger.records].count("release") == trained.get(cfg.hospital.name, 0)
        assert ledger.spent() <= 8.0
    if len(sizes) >= 2:  # size skew: the sampled hospitals differ in size
        assert max(sizes.values()) > 1.2 * min(sizes.values()), sizes
    rep = check_demo_run_report(out / "run")
    assert rep.final_round == 2
    assert _ray_left() == []


def _corrupting_app():
    """The project's ClientApp with one extra mod that spoils the update of hospitals 0–2."""
    from flwr.app import Array, ArrayRecord
    from flwr.clientapp import ClientApp

    from xrayfed.client import client_app as C
    from xrayfed.client.secagg import make_secagg_mod

    def spoil(msg, context, call_next):
        reply = call_next(msg, context)
        pid = int(context.node_config.get("partition-id", -1))
        if msg.metadata.message_type.startswith("train") and pid in (0, 1, 2) and not reply.has_error() \
                and len(reply.content.array_records) == 1:
            key = next(iter(reply.content.array_records))
            arrays = {k: v.numpy().copy() for k, v in reply.content.array_records[key].items()}
            first = next(iter(arrays))
            if pid == 0:
                arrays[first].flat[0] = np.nan
            elif pid == 1:
                arrays[first] = arrays[first][..., :1]
            else:
                arrays = {k: v * 1e6 for k, v in arrays.items()}
            reply.content[key] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return reply

    app = ClientApp(mods=[make_secagg_mod(required=C._requires_secure_aggregation), spoil])
    app.train()(C.train)
    app.evaluate()(C.evaluate)
    return app


@pytest.mark.slow
def test_malformed_updates_are_rejected_with_a_reason_and_the_round_goes_on(tmp_path, caplog):
    import argparse

    import torch

    from xrayfed.client.dp import PrivacyLedger
    from xrayfed.common.config import HospitalConfig, load_config
    from xrayfed.common.security.atrest import load_checkpoint
    from xrayfed.common.synthetic import write_npz
    from xrayfed.server import flower_simulation as S

    out = tmp_path / "sim"
    S._prepare_out(out)
    data = write_npz(tmp_path / "small.npz", n_train=400, n_val=60, n_test=100, size=16, task="binary", seed=2)
    args = argparse.Namespace(hospitals=4, rounds=1, data=data, config=None, epsilon=8.0, delta=1e-5, split="iid",
                              alpha=0.5, size_skew=0.0, fraction=None, min_clients=None, image_size=None,
                              local_epochs=None, batch_size=None, lr=None, width=None, name="faults")
    fed_path, hdir, n = S.write_configs(args, out)
    with caplog.at_level("WARNING"):
        S.run_simulation(fed_path, hdir, n, workers=2, client_app=_corrupting_app())
    row = _rows(out / "run")[0]
    by = {h["hospital"]: h for h in row["hospitals"]}
    assert by["hospital-a"]["status"] == "rejected" and "NaN" in by["hospital-a"]["reason"]
    assert by["hospital-b"]["status"] == "rejected" and "shape" in by["hospital-b"]["reason"]
    assert by["hospital-c"]["status"] == "rejected" and "max_update_norm" in by["hospital-c"]["reason"]
    assert by["hospital-d"]["status"] == "trained" and row["participants"] == ["hospital-d"]
    assert sum("rejected, not aggregated" in r.getMessage() for r in caplog.records) == 3
    ckpt = load_checkpoint(out / "run" / "checkpoints" / "round-0001.pt", None)
    assert all(torch.isfinite(v).all() for v in ckpt.state_dict.values())
    assert np.isfinite(row["eval"]["auc"])
    for i in range(4):  # a rejected hospital was charged once for the update it released, never twice
        cfg = load_config(HospitalConfig, hdir / f"hospital-{i:03d}.toml")
        assert [r["event"] for r in PrivacyLedger(cfg.hospital.state_dir, cfg).records].count("release") == 1
    assert _ray_left() == []
