"""Real Flower runs on 127.0.0.1: SuperLink + SuperNodes + ServerApp/ClientApp processes."""

from __future__ import annotations

import re
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


@pytest.mark.timeout(420)
def test_hospitals_exit_when_the_run_is_finished_and_the_logs_read_clean(tmp_path):
    """After the server's last round every `xrayfed client` stops on its own (exit 0, one line
    with the rounds and its spent budget) instead of retrying forever. Written to files, no
    output carries colour codes; without -v a hospital prints xrayfed's lines only (no Flower
    line, no message id), with -v Flower's lines too; all of them are in STATE/supernode.log."""
    import time

    from xrayfed.client.supernode import ALIVE_FILE, SUPERNODE_LOG
    from xrayfed.common.procs import kill_tree, spawn
    from xrayfed.common.synthetic import write_npz

    before = _descendants()
    data = write_npz(tmp_path / "small.npz", n_train=300, n_val=60, n_test=100, size=28, task="binary", seed=1)
    port = free_port()
    fp, hps, run_dir = _configs(tmp_path, data, port, rounds=1, budgets=[(8.0, 1), (8.0, 1)])
    clients = [spawn(CLI + (["-v"] if i == 1 else []) + ["client", "--server", f"127.0.0.1:{port}", "--config",
                                                         str(hp), "--insecure"], log=open(hp.with_suffix(".log"), "w"))
               for i, hp in enumerate(hps)]
    try:
        r = subprocess.run(CLI + ["server", "--config", str(fp)], capture_output=True, text=True, timeout=360)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        assert "told the 2 connected hospital(s) that the run is finished" in r.stdout, r.stdout[-2000:]
        deadline = time.time() + 60  # the server has finished: each client stops within seconds
        while time.time() < deadline and any(c.poll() is None for c in clients):
            time.sleep(0.5)
        rcs = [c.poll() for c in clients]
    finally:
        for c in clients:
            kill_tree(c)
    logs = {hp.stem: hp.with_suffix(".log").read_text(errors="replace") for hp in hps}
    assert rcs == [0, 0], (rcs, {k: v[-2000:] for k, v in logs.items()})
    for name, text in logs.items():
        last = text.strip().splitlines()[-1]
        assert re.fullmatch(rf"\[xrayfed\] hospital {name}: the federation's run 't' finished after 1 round; this "
                            r"hospital spent ε = \d\.\d\d of 8\.00 \(per patient, δ = 1e-05\) in 1 round; its budget "
                            r"cannot pay for another round\. Exiting\.", last), last
        assert not (tmp_path / f"state-{name}" / ALIVE_FILE).exists()  # it left the server cleanly
        assert "Starting Flower SuperNode" in (tmp_path / f"state-{name}" / SUPERNODE_LOG).read_text()
    # No colour codes in any file, the server's included.
    for text in [*logs.values(), r.stdout, (run_dir / "server.log").read_text(errors="replace")]:
        assert "\x1b" not in text
    quiet, verbose = logs["h0"], logs["h1"]
    assert "INFO xrayfed.client.hospital: round 1: trained" in quiet
    assert "Flower" not in quiet and "(ID: " not in quiet and not re.search(r"^(DEBUG|INFO)\s*:", quiet, re.M)
    assert "DEBUG" not in quiet
    assert "Starting Flower SuperNode" in verbose and "(ID: " in verbose
    assert "round 1: test AUC" in r.stdout and "Flower" not in r.stdout
    assert _descendants() <= before
