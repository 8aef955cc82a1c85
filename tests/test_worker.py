"""The hospital's warm worker (xrayfed.client.worker) and the round's timing: a real worker
process on a unix socket runs a training request exactly as the ClientApp would (charged, released,
cached, resent byte-identically), refuses a request without its start's secret, and the ClientApp
forwarding to it never loads torch; the server's reply poll and the SuperNode's idle pull are
capped; the round's breakdown adds up."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xrayfed.common.config import FederationConfig, HospitalConfig, dump_toml
from xrayfed.common.prediction import TaskSpec
from xrayfed.common.protocol.rounds import RoundRequest

TASK = TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA"))


def _hospital(tmp_path: Path, state: str = "state") -> tuple[Path, Path]:
    from xrayfed.common.synthetic import write_npz

    data = write_npz(tmp_path / "data.npz", n_train=160, n_val=20, n_test=20, size=28, task="binary", seed=3)
    cfg = HospitalConfig.model_validate({
        "hospital": {"name": "h0", "state_dir": str(tmp_path / state), "device": "cpu"},
        "data": {"path": str(data)}, "privacy": {"epsilon": 8.0, "max_rounds": 3},
    })
    path = tmp_path / "hospital.toml"
    path.write_text(dump_toml(cfg))
    return path, tmp_path / state


def _request(round_: int = 1):
    """A round's config and the global model's arrays (an ArrayRecord), as the server sends them."""
    import torch
    from flwr.app import ArrayRecord

    from xrayfed.common.model import build_model

    spec = FederationConfig.model_validate({"model": {"num_outputs": 1, "width": 8}}).model
    torch.manual_seed(0)
    req = RoundRequest(federation="f", round=round_, model=spec, task=TASK, image_size=28, lr=0.125)
    return req.to_config(), ArrayRecord(build_model(spec).state_dict())


@pytest.fixture()
def worker(tmp_path):
    from xrayfed.client import worker as w

    # a state folder deeper than an AF_UNIX address holds (107 bytes): the socket still works
    config, state = _hospital(tmp_path, "state-" + "x" * 64)
    sock = state / w.WORKER_DIR / w.SOCKET_NAME
    assert len(os.fsencode(str(sock))) > 107
    env = {**os.environ, w.SECRET_ENV: w.new_secret()}
    proc = subprocess.Popen([sys.executable, "-m", "xrayfed.client.worker", "--config", str(config), "--socket",
                             str(sock), "--parent-pid", str(os.getpid())], env=env)
    try:
        deadline = time.monotonic() + 120
        while not sock.exists():
            assert proc.poll() is None, "the worker exited before it listened"
            assert time.monotonic() < deadline, "the worker did not listen"
            time.sleep(0.2)
        yield {"proc": proc, "sock": sock, "state": state, "config": config,
               "env": {w.SOCKET_ENV: str(sock), w.SECRET_ENV: env[w.SECRET_ENV]}}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_worker_trains_resends_and_refuses_strangers(worker):
    """A real worker process: what it runs is the ClientApp's own training, under its ledger."""
    from xrayfed.client.worker import WorkerLost, forward
    from xrayfed.common.privacy.ledger import read_ledger

    # Only this hospital's user can reach it.
    assert stat.S_IMODE(worker["sock"].stat().st_mode) == 0o600
    assert stat.S_IMODE(worker["sock"].parent.stat().st_mode) == 0o700
    ledger = worker["state"] / "privacy-ledger.jsonl"

    # Without this start's secret: nothing is read, nothing charged.
    with pytest.raises(WorkerLost):
        forward("train", *_request(), env={**worker["env"], "XRAYFED_WORKER_SECRET": "0" * 64})
    assert not ledger.exists() or not [r for r in read_ledger(ledger) if r["event"] == "train"]

    config, arrays = _request()
    header, out = forward("train", config, arrays, env=worker["env"])
    assert header["ok"] and header["reply"]["status"] == "trained", header
    assert set(out) == set(arrays.keys())
    assert any(not np.array_equal(out[k].numpy(), arrays[k].numpy()) for k in out)  # it trained
    m = header["reply"]["metrics"]
    assert m["time_train_s"] > 0 and m["time_data_s"] > 0 and m["steps"] > 0
    events = [r["event"] for r in read_ledger(ledger)]
    assert events.count("train") == 1 and events[-1] == "release"  # charged, then released before the reply

    # The same request again (a lost reply): the byte-identical update, no new charge; the
    # scans are decoded once per worker.
    header2, out2 = forward("train", config, arrays, env=worker["env"])
    assert header2["reply"]["status"] == "resent"
    assert {k: a.data for k, a in out2.items()} == {k: a.data for k, a in out.items()}
    assert [r["event"] for r in read_ledger(ledger)].count("train") == 1
    assert header2["reply"]["metrics"]["time_data_s"] < m["time_data_s"]

    # The ClientApp's train stage forwards the next round to it, torch-free.
    _clientapp_forwards_without_loading_torch(worker, worker["sock"].parent.parent.parent)
    assert [r["event"] for r in read_ledger(ledger)].count("train") == 2

    # A worker that is gone: the ClientApp runs the request itself.
    worker["proc"].terminate()
    worker["proc"].wait(timeout=30)
    assert not worker["sock"].exists()
    assert forward("train", config, arrays, env=worker["env"]) is None


def _clientapp_train(tmp_path: Path, config_path: Path, round_: int, env: dict[str, str]) -> dict:
    """The ClientApp's train stage in a fresh process (as Flower runs it) with ``env``: the
    reply's status, arrays, timings and whether torch/Opacus were loaded."""
    config, arrays = _request(round_=round_)
    np.savez(tmp_path / "arrays.npz", **{k: a.numpy() for k, a in arrays.items()})
    code = f"""
import json, sys
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict, RecordDict as RD
import xrayfed.client.client_app as app
with np.load({str(tmp_path / "arrays.npz")!r}) as z:
    arrays = ArrayRecord({{k: Array(np.ascontiguousarray(z[k])) for k in z.files}})
md = Metadata(run_id=1, message_id="m1", src_node_id=1, dst_node_id=2, reply_to_message_id="", group_id="2",
              created_at=0.0, ttl=3600, message_type="train")
msg = Message(content=RecordDict({{"arrays": arrays, "config": ConfigRecord(json.loads({json.dumps(config)!r}))}}),
              metadata=md)
ctx = Context(run_id=1, node_id=1, node_config={{"config": {str(config_path)!r}}}, state=RD(), run_config={{}})
reply = app.train(msg, ctx)
info = reply.content.config_records["hospital"]
print(json.dumps({{"status": info["status"], "arrays": len(reply.content.array_records),
                   "startup": reply.content.metric_records["metrics"]["time_startup_s"],
                   "local": reply.content.metric_records["metrics"].get("time_local_s", -1.0),
                   "loaded": sorted(m for m in ("torch", "opacus") if m in sys.modules)}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _clientapp_forwards_without_loading_torch(worker, tmp_path: Path) -> None:
    """The ClientApp's train stage, with a worker up, replies with the worker's update and never
    imports torch or Opacus in its own process."""
    out = _clientapp_train(tmp_path, worker["config"], 2, {**os.environ, **worker["env"]})
    assert out["status"] == "trained" and out["arrays"] == 1 and out["loaded"] == [], out
    assert out["startup"] > 0 and out["local"] >= 0


def test_clientapp_trains_in_its_own_process_without_a_worker(tmp_path):
    """No worker (a simulation, warm_worker = false, or the worker not up): the ClientApp trains
    the request in its own process, as Flower runs it (a fresh process with nothing imported)."""
    from xrayfed.client import worker as w
    from xrayfed.common.privacy.ledger import read_ledger

    config, state = _hospital(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in (w.SOCKET_ENV, w.SECRET_ENV)}
    out = _clientapp_train(tmp_path, config, 1, env)
    assert out["status"] == "trained" and out["arrays"] == 1 and out["loaded"] == ["opacus", "torch"], out
    assert out["local"] == 0.0, out  # a worker's reply has the same metric names (Flower aggregates only those)
    assert [r["event"] for r in read_ledger(state / "privacy-ledger.jsonl")][-1] == "release"


def test_reply_poll_and_idle_pull_are_capped(monkeypatch):
    """The ServerApp asks for replies every REPLY_POLL_S (Flower: 3 s) and returns as soon as the
    last one is in; the SuperNode's waits are capped at its poll interval (Flower's: 3 s)."""
    from types import SimpleNamespace

    from xrayfed.common.flower_launch import _PollingClock
    from xrayfed.server import polling

    class FakeGrid:
        def __init__(self):
            self.pulls = 0

        def push_messages(self, msgs):
            return [f"id{i}" for i in range(len(msgs))]

        def pull_messages(self, ids):
            self.pulls += 1
            if self.pulls < 4:
                return []
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ids)]

    slept: list[float] = []
    monkeypatch.setattr(polling.time, "sleep", lambda s: slept.append(s))
    grid = polling.PromptGrid(FakeGrid())
    msgs = [SimpleNamespace(metadata=SimpleNamespace(message_type="train")) for _ in range(3)]
    replies = grid.send_and_receive(msgs, timeout=None)
    assert len(replies) == 3 and grid._grid.pulls == 4
    assert slept and max(slept) <= polling.REPLY_POLL_S < 3
    assert grid.calls[-1]["type"] == "train" and grid.calls[-1]["replies"] == 3

    waited: list[float] = []
    clock = _PollingClock(SimpleNamespace(sleep=waited.append, time=lambda: 42.0), 0.5, local_wait_s=0.05)
    clock.sleep(3)  # the idle pull of the server
    clock.sleep(0.5)  # a look in its own memory for the ClientApp's reply
    clock.sleep(0.01)
    assert waited == [0.5, 0.05, 0.01] and clock.time() == 42.0


def test_round_breakdown_adds_up():
    from xrayfed.server.polling import breakdown_text, round_breakdown

    calls = [{"type": "train", "start": 102.0, "end": 110.0}]
    hospitals = [{"hospital": "a", "time_startup_s": 1.0, "time_data_s": 0.5, "time_train_s": 4.0, "time_local_s": 0.5},
                 {"hospital": "b", "time_startup_s": 1.0, "time_data_s": 0.0, "time_train_s": 2.0}]
    t = round_breakdown(calls, round_start=100.0, eval_start=111.0, eval_s=2.0, now=114.0, hospitals=hospitals)
    assert t["wait_s"] == 2.0 and t["exchange_s"] == 8.0 and t["slowest"] == "a"
    assert t["hospital_s"] == 6.0 and t["transfer_s"] == 2.0 and t["aggregate_s"] == 1.0 and t["eval_s"] == 2.0
    assert t["wait_s"] + t["exchange_s"] + t["aggregate_s"] + t["eval_s"] + t["other_s"] == pytest.approx(t["total_s"])
    assert "DP training 4.0" in breakdown_text(t) and "transfer 2.0s" in breakdown_text(t)


def test_report_round_table_says_where_the_time_went():
    from types import SimpleNamespace

    from xrayfed.server.report.render import _took_cell

    t = {"train_s": 2.04, "startup_s": 1.5, "data_s": 0.0, "transfer_s": 0.8, "eval_s": 0.3, "slowest": "a"}
    assert _took_cell(SimpleNamespace(duration_s=9.0, timing=t)) == (
        "9 s: DP training 2.0 s, start-up 1.5 s, data 0.0 s, transfer 0.8 s, evaluation 0.3 s")
    assert _took_cell(SimpleNamespace(duration_s=9.0, timing=None)) == "9 s"


def test_run_finished_stage_loads_no_torch():
    """The server's last message is handled by a ClientApp process that records it through
    xrayfed.client.supernode: that import must not load torch (seconds per hospital at the end)."""
    code = ("import sys, xrayfed.client.client_app, xrayfed.client.supernode; "
            "print(sorted(m for m in ('torch', 'opacus') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_warm_up_does_the_rounds_noise_search_before_the_first_request(tmp_path):
    """The worker's warm-up plans from the figures `xrayfed client` printed (N, unit, scans): the
    first round's plan then finds its noise level in the cache instead of searching again."""
    from xrayfed.client.dp import plan_for
    from xrayfed.client.dp.planning import _noise_for_budget
    from xrayfed.client.hospital import hospital_split
    from xrayfed.client.nodeconfig import hospital_config_from_node
    from xrayfed.client.worker import warm_up

    config, _ = _hospital(tmp_path)
    cfg = hospital_config_from_node({"config": str(config)})
    _, train, _ = hospital_split(cfg)
    _noise_for_budget.cache_clear()
    plan, _ = plan_for(cfg, train)  # what `xrayfed client` computes before joining, in its own process
    _noise_for_budget.cache_clear()  # the worker is another process: nothing cached
    warm_up(config, f"{plan.num_examples},{plan.unit},{plan.num_scans}")
    before = _noise_for_budget.cache_info()
    again, _ = plan_for(cfg, train)  # the first round's plan
    after = _noise_for_budget.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses
    assert again.noise_multiplier == plan.noise_multiplier
