"""Real Flower runs on 127.0.0.1: SuperLink + SuperNodes + ServerApp/ClientApp processes."""

from __future__ import annotations

import json
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


def test_two_hospitals_two_rounds_then_resume_and_refuse(tmp_path, data_npz):
    import torch

    from xrayfed.client.privacy import request_key
    from xrayfed.common.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, weights_version
    from xrayfed.common.data import load_dataset
    from xrayfed.common.model import build_model
    from xrayfed.common.prediction import TaskSpec, choose_threshold
    from xrayfed.common.train import predict_logits

    before = _descendants()
    port = free_port()
    # The federation starts from a given checkpoint (an operator's public-data model).
    task = TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA"))
    torch.manual_seed(1234)
    spec = FederationConfig.model_validate({"model": {"num_outputs": 1, "width": 16}}).model
    start = build_model(spec).state_dict()
    save_checkpoint(tmp_path / "public.pt", Checkpoint(model=spec, task=task, image_size=28, state_dict=start))
    # h1's budget is planned for 2 rounds only: a third round must be refused by h1 itself.
    fp, hps, run_dir = _configs(tmp_path, data_npz, port, rounds=2, budgets=[(8.0, 3), (4.0, 2)],
                                initial_model=str(tmp_path / "public.pt"))
    r = _run(fp, hps, port)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "round 1:" in r.stdout and "round 2:" in r.stdout
    assert f"starting from {tmp_path / 'public.pt'}" in r.stdout
    # round 1 was trained from that checkpoint: its request key names those weights
    charges = [x for x in read_ledger(tmp_path / "state-h0" / "privacy-ledger.jsonl") if x["event"] == "train"]
    assert charges[0]["request"] == request_key("t", 1, weights_version(start))
    # the operating point: chosen on the val split, stored with the model, used for the test metrics
    ck = load_checkpoint(run_dir / "checkpoints" / "round-0002.pt")
    model = ck.build()
    val = load_dataset(data_npz, split="val", image_size=28, task=task)
    assert ck.threshold == choose_threshold(task, *predict_logits(model, val, torch.device("cpu")))
    # model selection on the same split: best.pt is the round with the best validation AUC
    first = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = max(first, key=lambda row: row["eval"]["val_auc"])["round"]
    assert first[-1]["best_round"] == want
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert best.round == want and best.model_version == first[want - 1]["model_version"]
    assert (run_dir / "checkpoints" / "round-0002.pt").is_file()
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        names = sorted(h["hospital"] for h in row["hospitals"])
        assert names == ["h0", "h1"]
        for h in row["hospitals"]:
            assert h["status"] == "trained" and 0 < h["epsilon"] <= h["epsilon_budget"]
        assert row["max_epsilon"] == max(h["epsilon"] for h in row["hospitals"])
        assert 0.0 <= row["eval"]["auc"] <= 1.0 and 0.0 <= row["eval"]["threshold"] <= 1.0
    # the ε the server received is the hospital's own ledger figure
    led = [x for x in read_ledger(tmp_path / "state-h1" / "privacy-ledger.jsonl") if x["event"] == "train"]
    assert rows[-1]["hospitals"][[h["hospital"] for h in rows[-1]["hospitals"]].index("h1")]["epsilon"] == \
        pytest.approx(led[-1]["epsilon"])

    # Restart the server with more rounds: it resumes at round 3; h1 refuses (budget), h0 trains.
    text = fp.read_text().replace("rounds = 2", "rounds = 3")
    fp.write_text(text)
    r = _run(fp, hps, port)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming from checkpoint of round 2" in r.stdout
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 3
    status = {h["hospital"]: h["status"] for h in rows[-1]["hospitals"]}
    assert status == {"h0": "trained", "h1": "refused"}
    assert rows[-1]["participants"] == ["h0"]
    events = [x["event"] for x in read_ledger(tmp_path / "state-h1" / "privacy-ledger.jsonl")]
    assert events.count("train") == 2 and events[-1] == "refused"
    # The server recorded each reply's ledger head (an anchor against truncation) and, after the
    # restart, sent them back from metrics.jsonl: both ledgers hold every recorded head, and h0
    # trained round 3 after checking its own.
    from xrayfed.common.privacy.ledger import check_anchor

    for name in ("h0", "h1"):
        recs = read_ledger(tmp_path / f"state-{name}" / "privacy-ledger.jsonl")
        heads = [(h["ledger_seq"], h["ledger_head"]) for row in rows for h in row["hospitals"] if h["hospital"] == name]
        assert len(heads) == 3 and all(check_anchor(recs, seq, head) is None for seq, head in heads)
        assert [x["event"] for x in recs].count("release") == (3 if name == "h0" else 2)
    assert "refused" in (tmp_path / "h1.log").read_text()
    # nothing left running
    assert _descendants() - before == set()


def test_too_few_hospitals_stop_the_run_then_a_late_hospital_is_waited_for(tmp_path, data_npz):
    """min_clients = 2: with one hospital the server says it waits and stops after join_timeout_s
    (nothing trained, nothing charged); started again, it waits for the hospital that joins late
    and trains the round with both."""
    import time

    from xrayfed.common.procs import kill_tree, spawn

    before = _descendants()
    port = free_port()
    fp, hps, run_dir = _configs(tmp_path, data_npz, port, rounds=1, budgets=[(8.0, 1), (8.0, 1)], join_timeout_s=6)

    def client(hp):
        return spawn(CLI + ["client", "--server", f"127.0.0.1:{port}", "--config", str(hp), "--insecure"],
                     log=open(hp.with_suffix(".log"), "a"))

    h0 = client(hps[0])
    try:
        t0 = time.time()
        r = subprocess.run(CLI + ["server", "--config", str(fp)], capture_output=True, text=True, timeout=300)
        assert "waiting for hospitals before round 1:" in r.stdout and "of 2 connected" in r.stdout, r.stdout[-2000:]
        assert "stopped: before round 1: only" in r.stdout and "join_timeout_s = 6 s" in r.stdout
        assert time.time() - t0 < 120 and not (run_dir / "metrics.jsonl").exists()
        assert not (tmp_path / "state-h0" / "privacy-ledger.jsonl").exists() or not [
            x for x in read_ledger(tmp_path / "state-h0" / "privacy-ledger.jsonl") if x["event"] == "train"]
    finally:
        kill_tree(h0)
    # again, with a generous timeout: h0 from the start, h1 only once the server says it waits
    fp.write_text(fp.read_text().replace("join_timeout_s = 6", "join_timeout_s = 240"))
    h0 = client(hps[0])
    server = subprocess.Popen(CLI + ["server", "--config", str(fp)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    h1 = None
    try:
        seen = ""
        for line in server.stdout:
            seen += line
            if "waiting for hospitals before round 1" in line and h1 is None:
                h1 = client(hps[1])
        assert server.wait(timeout=300) == 0, seen[-3000:]
        assert h1 is not None and "starting round 1: 2 hospitals connected after" in seen, seen[-2000:]
        rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1] and sorted(rows[0]["participants"]) == ["h0", "h1"]
    finally:
        if server.poll() is None:
            kill_tree(server)
        for c in (h0, h1):
            if c is not None:
                kill_tree(c)
    assert _descendants() <= before
