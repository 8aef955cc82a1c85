"""Real Flower runs on 127.0.0.1: SuperLink + SuperNodes + ServerApp/ClientApp processes.

The runs that finish are in tests/test_secure_federation.py (every hospital stops on its own at
the end, its logs read clean) and tests/test_faults.py (hospitals and the server killed mid-round).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from xrayfed.common.config import FederationConfig, HospitalConfig, dump_toml
from xrayfed.common.privacy.ledger import read_ledger
from xrayfed.common.procs import free_port

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "xrayfed.common.cli"]


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory) -> Path:
    from xrayfed.common.synthetic import write_npz

    path = tmp_path_factory.mktemp("data") / "synthetic.npz"
    write_npz(path, n_train=800, n_val=100, n_test=300, size=28, task="binary", seed=1)
    return path


def _configs(tmp: Path, data: Path, port: int, rounds: int, budgets: list[tuple[float, int]], **federation):
    run_dir = tmp / "run"
    fed = FederationConfig.model_validate({
        "federation": {"name": "t", "run_dir": str(run_dir), "rounds": rounds, "min_clients": len(budgets),
                       "lr": 0.05, **federation},
        "model": {"num_outputs": 1, "width": 16},
        "task": {"kind": "binary", "class_names": ["NORMAL", "PNEUMONIA"]},
        "image_size": 28,
        "eval": {"path": str(data), "split": "test", "val_split": "val"},
        "network": {"listen": f"127.0.0.1:{port}", "tls": {"insecure": True}},
    })
    fp = tmp / "federation.toml"
    fp.write_text(dump_toml(fed))
    hps = []
    for i, (eps, max_rounds) in enumerate(budgets):
        h = HospitalConfig.model_validate({
            "hospital": {"name": f"h{i}", "state_dir": str(tmp / f"state-h{i}"), "device": "cpu"},
            "data": {"path": str(data), "partition": f"{i}/{len(budgets)}"},
            "privacy": {"epsilon": eps, "max_rounds": max_rounds},
            "training": {"batch_size": 32},
        })
        hp = tmp / f"h{i}.toml"
        hp.write_text(dump_toml(h))
        hps.append(hp)
    return fp, hps, run_dir


def _run(fp: Path, hps: list[Path], port: int, timeout: float = 400) -> subprocess.CompletedProcess:
    from xrayfed.common.procs import kill_tree, spawn

    clients = [spawn(CLI + ["client", "--server", f"127.0.0.1:{port}", "--config", str(hp), "--insecure"],
                     log=open(hp.with_suffix(".log"), "w")) for hp in hps]
    try:
        return subprocess.run(CLI + ["server", "--config", str(fp)], capture_output=True, text=True, timeout=timeout)
    finally:
        for c in clients:
            kill_tree(c)


def test_too_few_hospitals_stop_the_run_with_nothing_charged(tmp_path, data_npz):
    """min_clients = 2: with one hospital the server says it waits and stops after join_timeout_s
    (nothing trained, nothing charged). A hospital that joins late, before the timeout, is waited
    for: tests/test_faults.py."""
    import time

    from xrayfed.common.procs import kill_tree, spawn

    before = _descendants()
    port = free_port()
    fp, hps, run_dir = _configs(tmp_path, data_npz, port, rounds=1, budgets=[(8.0, 1), (8.0, 1)], join_timeout_s=2)

    def client(hp):
        return spawn(CLI + ["client", "--server", f"127.0.0.1:{port}", "--config", str(hp), "--insecure"],
                     log=open(hp.with_suffix(".log"), "a"))

    h0 = client(hps[0])
    try:
        t0 = time.time()
        r = subprocess.run(CLI + ["server", "--config", str(fp)], capture_output=True, text=True, timeout=300)
        assert "waiting for hospitals before round 1:" in r.stdout and "of 2 connected" in r.stdout, r.stdout[-2000:]
        assert "stopped: before round 1: only" in r.stdout and "join_timeout_s = 2 s" in r.stdout
        assert time.time() - t0 < 120 and not (run_dir / "metrics.jsonl").exists()
        assert not (tmp_path / "state-h0" / "privacy-ledger.jsonl").exists() or not [
            x for x in read_ledger(tmp_path / "state-h0" / "privacy-ledger.jsonl") if x["event"] == "train"]
    finally:
        kill_tree(h0)
    assert _descendants() <= before
