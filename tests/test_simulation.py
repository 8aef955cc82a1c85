"""`xrayfed simulate` on Flower's Simulation Engine (Ray) runs the real ServerApp and
ClientApp; malformed updates are rejected before aggregation and the round goes on;
`simulate --ray-address` runs on a two-node Ray cluster started on 127.0.0.1. Every test that
starts Ray is in this file, so they run one after another: each checks that no Ray process is
left, which another test's Ray running beside it would fail."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from xrayfed.common import cli
from xrayfed.common.procs import free_port, wait_exited
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
    # the model planned before the run from the hospitals' own plans, and told again at the end
    assert said.count("model for 4 hospitals like these: XrayNet width 32") == 2
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
    fed_path, hdir, n, _ = S.write_configs(args, out)
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


_CLUSTER_TAG = "XRAYFED_TEST_RAY_CLUSTER"
#: `ray start` whose 127.0.0.1 stays 127.0.0.1: Ray rewrites a loopback --node-ip-address and
#: --address to the machine's own address (where the test must not listen), as
#: `xrayfed simulate --ray-address 127.0.0.1:PORT` tells it not to.
_RAY_START = ("import sys; from ray._private import services; services.resolve_ip_for_localhost = lambda h: h; "
              "from ray.scripts.scripts import main; sys.argv = ['ray', 'start', *sys.argv[1:]]; main()")


def _cluster_processes(tag: str) -> list[psutil.Process]:
    """This user's processes that carry this test's cluster tag (every process `ray start`
    started: GCS, raylet, agents, workers inherit its environment)."""
    from xrayfed.server.flower_simulation import _tagged

    return _tagged(tag, _CLUSTER_TAG)


def _stop_cluster(tag: str, started: list[subprocess.Popen]) -> None:
    """End the cluster this test started, and only it: its `ray start --block` processes, then
    every process still carrying its tag (never `ray stop`, which ends every Ray on the machine).
    One SIGTERM each for the `ray start` processes: each stops the processes it started, and a
    second SIGTERM while it does so deadlocks Ray's handler (its lock is taken twice) until SIGKILL."""
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
    for proc in started:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = _cluster_processes(tag)
        if not left:
            break
        for p in left:
            try:
                p.terminate()
            except psutil.Error:
                pass
        wait_exited(left, 2)  # a zombie (an orphan init has not reaped yet) has exited
    for p in _cluster_processes(tag):
        try:
            p.kill()
        except psutil.Error:
            pass
    for proc in started:
        proc.wait(timeout=10)


@pytest.mark.slow
def test_simulate_runs_on_a_two_node_ray_cluster_and_leaves_no_process(tmp_path, capsys):
    import sys

    tag = secrets.token_hex(8)
    env = {**os.environ, _CLUSTER_TAG: tag, "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    address = f"127.0.0.1:{port}"

    def node(*extra: str) -> subprocess.Popen:
        # every port a second node on the same machine would otherwise share with the first
        ports = ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                 "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                 "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]
        return subprocess.Popen([sys.executable, "-c", _RAY_START, "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                                 "--num-gpus", "0", "--disable-usage-stats", *ports, *extra], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    started: list[subprocess.Popen] = []
    import shutil
    import tempfile

    short = tempfile.mkdtemp(prefix="xr-ray-")  # Ray's unix socket paths must stay under 108 bytes
    try:
        started.append(node("--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", short))
        _wait_for_port(address)  # the head's GCS answers: the second node can join
        started.append(node("--address", address))
        _wait_for_nodes(address, 2)
        out = tmp_path / "sim"
        assert cli.main(["simulate", "--hospitals", "2", "--rounds", "1", "--image-size", "16",
                         "--privacy-unit", "scan", "--ray-address", address, "--out", str(out)]) == 0
        said = capsys.readouterr().out
        assert f"the Ray cluster at {address}" in said
        assert "round-to-round stability" in said and "server step for 2 hospitals like these" in said
        import json

        row = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[0])
        assert [h["status"] for h in row["hospitals"]] == ["trained", "trained"]
        assert all(started_proc.poll() is None for started_proc in started)  # the cluster is left running
    finally:
        _stop_cluster(tag, started)
        shutil.rmtree(short, ignore_errors=True)
    assert _cluster_processes(tag) == []


def _wait_for_port(address: str, timeout_s: float = 180.0) -> None:
    """Until the Ray head at ``address`` listens."""
    import socket

    deadline = time.monotonic() + timeout_s
    host, port = address.rsplit(":", 1)
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"the Ray head at {address} never listened"
            time.sleep(0.5)


def _wait_for_nodes(address: str, n: int, timeout_s: float = 180.0) -> None:
    """Until the cluster at ``address`` has ``n`` live nodes (asked from a short-lived driver)."""
    import sys

    code = ("import ray, sys; from ray._private import services; services.resolve_ip_for_localhost = lambda h: h; "
            "ray.init(address=sys.argv[1], _node_ip_address='127.0.0.1', logging_level='ERROR', "
            "log_to_driver=False); print(sum(1 for x in ray.nodes() if x['Alive'] and "
            "x['NodeManagerAddress'] == '127.0.0.1')); ray.shutdown()")
    deadline = time.monotonic() + timeout_s
    _wait_for_port(address, timeout_s)  # a driver started before the head listens waits minutes for it
    why = ""
    while True:
        try:
            r = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=60)
            if r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == [str(n)]:
                return
            why = r.stderr[-500:]
        except subprocess.TimeoutExpired:
            why = "the driver did not connect within 60 s"
        assert time.monotonic() < deadline, f"the Ray cluster at {address} has not {n} nodes: {why}"
        time.sleep(2)


def test_simulate_refuses_a_malformed_ray_address(tmp_path, capsys):
    assert cli.main(["simulate", "--hospitals", "2", "--ray-address", "not an address", "--out",
                     str(tmp_path / "sim")]) != 0
    err = capsys.readouterr().err
    assert "xrayfed: error: --ray-address 'not an address': give the HOST:PORT" in err
    assert not (tmp_path / "sim").exists()
