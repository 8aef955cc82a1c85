"""What a real federation pays besides training, cut at its roots: the hospital's ClientApp
processes are forked from a fork server (one fresh process per message, the imports done once),
the hospital's worker checks the data and the plan (``xrayfed client`` imports no torch) and
warms its training up before the first round, and ``xrayfed server`` starts the SuperLink
without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from xrayfed.common.config import HospitalConfig, dump_toml

#: A SuperExec with its fork server, whose ClientApp (Flower's entry point, replaced before the
#: fork) writes what it sees and exits 3. Prints the children's pids and the fork server's.
FORKING_SUPEREXEC = r"""
import json, os, subprocess, sys, time
import numpy as np
out = sys.argv[1]
import flwr.supernode.cli.flwr_clientapp  # the module (its package exports the function by the same name)
entry = sys.modules["flwr.supernode.cli.flwr_clientapp"]

def fake_clientapp():
    with open(os.path.join(out, f"{os.getpid()}.json"), "w") as f:
        json.dump({"argv": sys.argv, "rand": float(np.random.rand()), "ppid": os.getppid(),
                   "stdout_is_devnull": os.path.samestat(os.fstat(1), os.stat(os.devnull))}, f)
    print("clientapp says hello", flush=True)
    sys.exit(3)

entry.flwr_clientapp = fake_clientapp
from xrayfed.client import forkserver as F
from xrayfed.common.flower_launch import Subprocess
F.preload()
fs = F.ForkServer()
popen = Subprocess(subprocess, "flwr-clientapp", fs.launch)
a = popen.Popen(["flwr-clientapp", "--token", "t1", "--parent-pid", str(os.getpid())])
b = popen.Popen(["flwr-clientapp", "--token", "t2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
other = popen.Popen([sys.executable, "-c", "print('not a clientapp')"])
other.wait()
print(json.dumps({"children": [a.pid, b.pid], "fork_server": fs.pid, "state": fs.state,
                  "other_is_popen": isinstance(other, subprocess.Popen)}), flush=True)
deadline = time.time() + 60
while len([f for f in os.listdir(out) if f.endswith(".json")]) < 2 and time.time() < deadline:
    time.sleep(0.05)
"""


def test_clientapp_processes_are_fresh_forks_of_the_fork_server(tmp_path):
    """Each ClientApp start is a new process forked from the fork server: it runs Flower's entry
    point with exactly the SuperExec's arguments, its output where the SuperExec's goes (or
    nowhere when Flower asks for that), numpy's generator seeded afresh (SecAgg+ quantization
    draws from it); other commands start as before; the fork server ends with the SuperExec."""
    r = subprocess.run([sys.executable, "-c", FORKING_SUPEREXEC, str(tmp_path)], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
    assert info["state"] == "ready" and info["other_is_popen"], info
    assert "not a clientapp" in r.stdout and r.stdout.count("clientapp says hello") == 1, r.stdout
    seen = {int(p.stem): json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(seen) == set(info["children"]), (seen, info)
    a, b = (seen[p] for p in info["children"])
    assert a["argv"][0] == "flwr-clientapp" and a["argv"][1:3] == ["--token", "t1"], a
    assert b["argv"] == ["flwr-clientapp", "--token", "t2"], b
    assert a["ppid"] == b["ppid"] == info["fork_server"]
    assert not a["stdout_is_devnull"] and b["stdout_is_devnull"]
    assert a["rand"] != b["rand"]  # not the fork server's generator state twice
    deadline = time.monotonic() + 10
    while psutil.pid_exists(info["fork_server"]) and time.monotonic() < deadline:
        try:
            if psutil.Process(info["fork_server"]).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    alive = [p for p in (info["fork_server"], *info["children"]) if psutil.pid_exists(p)
             and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {alive}"


def test_a_fork_server_that_is_gone_leaves_flowers_own_start(tmp_path):
    """A fork server that died: the SuperExec starts `flwr-clientapp` itself (Flower's Popen)."""
    code = r"""
import os, signal, subprocess, sys
from xrayfed.client import forkserver as F
F.preload()
fs = F.ForkServer()
os.kill(fs.pid, signal.SIGKILL)
os.waitpid(fs.pid, 0)
print("forked" if fs.launch(["flwr-clientapp", "--help"], {}) is not None else "fallback", fs.state)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-2:] == ["fallback", "gone"], r.stdout


def test_the_superexec_asks_for_a_task_as_soon_as_its_supernode_received_a_message(monkeypatch):
    """Woken by its SuperNode for each message it receives, the SuperExec does not ask the
    SuperNode for tasks five times a second: it asks at once when woken, else every WOKEN_POLL_S."""
    from types import SimpleNamespace

    from xrayfed.client import forkserver as F

    monkeypatch.setattr(F, "WOKEN_POLL_S", 0.3)
    r, w = os.pipe()
    slept: list[float] = []
    clock = F._WakeClock(SimpleNamespace(sleep=slept.append, time=time.time), r)
    t0 = time.monotonic()
    clock.sleep(0.2)  # nothing received: the longer of Flower's interval and WOKEN_POLL_S
    assert 0.25 <= time.monotonic() - t0 < 2.0
    os.write(w, b"mm")
    t0 = time.monotonic()
    clock.sleep(0.2)
    assert time.monotonic() - t0 < 0.2  # woken
    t0 = time.monotonic()
    clock.sleep(0.2)  # both bytes were taken: waits again
    assert time.monotonic() - t0 >= 0.25
    os.close(w)  # the SuperNode is gone: Flower's own wait from then on
    clock.sleep(0.2)
    clock.sleep(0.2)
    assert slept == [0.2]
    os.close(r)


def test_a_supernode_started_during_the_check_joins_only_on_xrayfed_clients_word(tmp_path):
    """`xrayfed client` starts its SuperNode while the worker checks the data: the SuperNode
    imports Flower and waits; it goes on only when told to (a `j` on its pipe) and ends without
    joining when the pipe closes (the check refused)."""
    from xrayfed.common.flower_launch import supernode_command
    from xrayfed.common.procs import kill_tree

    def start(port: int):
        r, w = os.pipe()
        base = supernode_command(0.5, fork_clientapps=False)
        cmd = [*base, "--wait-fd", str(r), "--superlink", f"127.0.0.1:{port}", "--insecure",
               "--port", str(port + 1), "--node-config", f'config="{tmp_path / "none.toml"}"']
        proc = subprocess.Popen(cmd, pass_fds=(r,), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        os.close(r)
        return proc, w

    from xrayfed.common.procs import free_port

    refused, w = start(free_port())
    time.sleep(1.0)
    assert refused.poll() is None  # importing, then waiting
    os.close(w)
    out, _ = refused.communicate(timeout=60)
    assert refused.returncode == 0 and "Starting Flower SuperNode" not in out, out

    told, w = start(free_port())
    try:
        os.write(w, b"j")
        os.close(w)
        deadline = time.monotonic() + 60
        lines: list[str] = []
        while time.monotonic() < deadline:
            line = told.stdout.readline()
            lines.append(line)
            if "Starting Flower SuperNode" in line or not line:
                break
        assert any("Starting Flower SuperNode" in ln for ln in lines), lines
    finally:
        kill_tree(told)


def _live(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_supernodes_superexec_is_forked_from_it_before_it_joins(tmp_path):
    """The SuperNode forks its SuperExec once Flower is imported, before it joins (the SuperExec
    then imports only what it adds to the SuperNode's imports); when Flower starts the SuperExec,
    that process runs it (its own fork server appears). A SuperNode refused before joining, or
    stopped, leaves no process."""
    from xrayfed.common.flower_launch import supernode_command
    from xrayfed.common.procs import free_port, kill_tree

    def start():
        r, w = os.pipe()
        port = free_port()  # nothing listens: the SuperNode keeps trying, its SuperExec runs meanwhile
        cmd = [*supernode_command(0.5), "--wait-fd", str(r), "--superlink", f"127.0.0.1:{port}", "--insecure",
               "--port", str(free_port()), "--node-config", f'config="{tmp_path / "none.toml"}"']
        proc = subprocess.Popen(cmd, pass_fds=(r,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        os.close(r)
        return proc, w

    def children(proc, deadline_s: float = 60.0, want=lambda kids: bool(kids)):
        deadline = time.monotonic() + deadline_s
        kids: list[psutil.Process] = []
        while time.monotonic() < deadline:
            kids = [c for c in psutil.Process(proc.pid).children() if _live(c)]
            if want(kids):
                break
            time.sleep(0.05)
        return kids

    node, w = start()
    try:
        waiting = children(node)
        assert len(waiting) == 1, waiting  # forked while the SuperNode waits for its word
        superexec = waiting[0]
        assert superexec.cmdline() == psutil.Process(node.pid).cmdline()  # a fork, not a fresh interpreter
        assert not [c for c in superexec.children() if _live(c)]  # waiting: no fork server yet
        os.write(w, b"j")
        os.close(w)
        w = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not [c for c in superexec.children() if _live(c)]:
            time.sleep(0.05)
        assert [c for c in superexec.children() if _live(c)], "the SuperExec did not start its fork server"
        assert [c.pid for c in children(node)] == [superexec.pid]  # no second SuperExec
        everyone = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
    finally:
        if w is not None:
            os.close(w)
        kill_tree(node)
    assert not [p for p in everyone if _live(p)]

    refused, w = start()
    waiting = children(refused)
    assert len(waiting) == 1, waiting
    os.close(w)  # the check refused: no `j`
    assert refused.wait(timeout=60) == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _live(waiting[0]):
        time.sleep(0.05)
    assert not _live(waiting[0])  # it ends with the SuperNode that never started it


def test_a_reply_part_that_comes_late_is_asked_for_again_soon():
    """The SuperLink lists a reply before its parts (objects) have all arrived; Flower asks for a
    missing part again after 1 s. The ServerApp's grid and the SuperNode ask again after a
    twentieth and a tenth of that, and still get every part."""
    import functools

    import flwr.superlink.grid.http_grid as grid_module
    import flwr.supernode.start_client_internal as node_module
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    from xrayfed.common.flower_launch import OBJECT_RETRY_S as NODE_RETRY_S
    from xrayfed.common.flower_launch import prompt_object_pulls
    from xrayfed.server.polling import OBJECT_RETRY_S

    from xrayfed.server.polling import prompt_object_pulls as prompt_serverapp_pulls

    saved = grid_module.pull_objects, node_module.pull_objects
    flower_pull = getattr(saved[0], "func", saved[0])
    try:
        prompt_serverapp_pulls()
        prompt_object_pulls(node_module)
        prompt_object_pulls(node_module)  # once only
        for module, retry in ((grid_module, OBJECT_RETRY_S), (node_module, NODE_RETRY_S)):
            pull = module.pull_objects
            assert isinstance(pull, functools.partial) and pull.func is flower_pull
            assert pull.keywords == {"initial_backoff": retry} and retry < 1
            misses = {"b": 2}

            def fetch(object_id: str) -> bytes:
                if misses.get(object_id, 0) > 0:
                    misses[object_id] -= 1
                    raise ObjectUnavailableError(object_id)
                return object_id.encode() * 3

            assert pull(object_ids=["a", "b"], pull_object_fn=fetch) == {"a": b"aaa", "b": b"bbb"}
            assert misses == {"b": 0}
    finally:
        grid_module.pull_objects, node_module.pull_objects = saved


def test_the_serverapp_reports_its_end_once_its_last_lines_are_pushed():
    """Flower's ServerApp pushes its last log lines and then reports the run finished, which ends
    the log stream `xrayfed server` relays; Flower waits 1 s after its queue empties. The flush
    that replaces it returns once every queued line has been pushed (a failed push is tried
    again first), at the uploader's first sleep after that push, and at once when the uploader is
    gone."""
    import importlib
    import queue

    import httpx

    import flwr.supercore.logger as logger

    from xrayfed.server.polling import prompt_log_flush

    runner = importlib.import_module("flwr.superlink.runtime.run_serverapp")  # its package exports a function by that name
    saved = runner.flush_logs, logger.time
    pushed: list[str] = []
    fail = [1]

    class SlowClient:
        def PushLogs(self, request):  # noqa: N802 - Flower's name
            time.sleep(0.3)
            if fail[0] > 0:
                fail[0] -= 1
                raise httpx.ConnectError("the SuperLink is busy")
            pushed.extend(request.logs)

    q: queue.Queue = queue.Queue()
    uploader = logger.start_log_uploader(q, 0, 1, SlowClient())  # as the ServerApp process starts it
    try:
        prompt_log_flush()
        assert runner.flush_logs is not saved[0]
        clock = logger.time
        for i in range(3):
            q.put(f"line {i}\n")
        assert runner.flush_logs(q) is True
        assert pushed == [f"line {i}\n" for i in range(3)] and fail == [0]  # pushed, after one failed push
        q.put("last line\n")
        time.sleep(0.05)  # the uploader takes it and pushes it now
        before = clock.sleeps
        assert runner.flush_logs(q) is True and pushed[-1] == "last line\n"
        assert clock.sleeps - before <= 1  # its first sleep after the push (Flower's 1 s: three or four)
        logger.stop_log_uploader(q, uploader)
        assert not uploader.is_alive()
        q.put("never taken\n")
        assert runner.flush_logs(q) is False  # the uploader is gone: nothing to wait for
    finally:
        logger.stop_log_uploader(q, uploader)
        runner.flush_logs, logger.time = saved


def test_the_budget_line_is_asked_while_the_supernode_leaves(monkeypatch):
    """At a run's end `xrayfed client` asks its worker for the budget line in a thread of its own
    as soon as it knows the run is finished; the answer is the worker's, and a failed question
    gives None (the line is then computed from the ledger) without an error in that thread."""
    import threading

    from xrayfed.client import supernode as S

    asked = threading.Event()
    monkeypatch.setattr(S, "worker_spent_line", lambda env: (asked.set(), f"spent {env['k']}")[1])
    job = S._Spent({"k": "1"})
    assert asked.wait(10)  # asked at once, before anyone waits for it
    assert job.line() == "spent 1"

    errors: list = []
    monkeypatch.setattr(threading, "excepthook", errors.append)

    def broken(env):
        raise KeyError("line")

    monkeypatch.setattr(S, "worker_spent_line", broken)
    assert S._Spent({}).line() is None and not errors


def test_the_supernode_starts_its_superexec_with_the_fork_server():
    from xrayfed.common.flower_launch import supernode_command

    assert supernode_command(0.5)[-1] == "--fork-clientapps"
    assert "--fork-clientapps" not in supernode_command(0.5, fork_clientapps=False)
    assert HospitalConfig().hospital.fork_clientapps is True


def _hospital_config(tmp_path: Path, **privacy) -> Path:
    from xrayfed.common.synthetic import write_npz

    data = write_npz(tmp_path / "data.npz", n_train=120, n_val=20, n_test=20, size=28, task="binary", seed=5)
    cfg = HospitalConfig.model_validate({
        "hospital": {"name": "h0", "state_dir": str(tmp_path / "state"), "device": "cpu"},
        "data": {"path": str(data)}, "privacy": {"epsilon": 8.0, "max_rounds": 3, **privacy},
    })
    path = tmp_path / "hospital.toml"
    path.write_text(dump_toml(cfg))
    return path


def test_the_worker_checks_the_data_and_the_plan_for_xrayfed_client(tmp_path):
    """`xrayfed client` imports no torch: its worker checks the data and the DP plan and answers
    with the lines `xrayfed client` prints, the plan's figures, or the one-line refusal."""
    from xrayfed.client.worker import check_plan

    good = _hospital_config(tmp_path / "good")
    r, w = os.pipe()
    figures = check_plan(good, w)
    answer = json.loads(os.fdopen(r).read())
    n, unit, scans = figures.split(",")
    assert figures == answer["plan"] and unit == "patient" and 0 < int(n) <= int(scans) <= 120, answer
    assert len(answer["lines"]) == 1 and f"(N = {n} patients); plan: σ = " in answer["lines"][0], answer

    bad = _hospital_config(tmp_path / "bad", delta=0.5)
    r, w = os.pipe()
    assert check_plan(bad, w) is None
    answer = json.loads(os.fdopen(r).read())
    assert answer["code"] == 2 and answer["error"].startswith("privacy.delta = 0.5: must be below 1/N"), answer
    assert not (tmp_path / "bad" / "state" / "privacy-ledger.jsonl").exists()


def test_the_worker_says_what_the_hospital_spent(tmp_path):
    """At the run's end `xrayfed client` prints the budget line from its own ledger; the worker
    computes it (the accountant is loaded there), the same line as in-process."""
    from xrayfed.client.nodeconfig import hospital_config_from_node
    from xrayfed.client.supernode import spent_line
    from xrayfed.client.worker import handle

    config = _hospital_config(tmp_path)
    header, arrays = handle("spent", {}, {}, config)
    assert header["ok"] and not arrays
    assert header["line"] == spent_line([], hospital_config_from_node({"config": str(config)}))
    assert "trained no round" in header["line"]


def test_launchers_do_not_import_torch():
    """`xrayfed server` starts its SuperLink before anything imports torch, and `xrayfed client`
    never imports it (its worker does)."""
    code = ("import sys, xrayfed.server.superlink, xrayfed.client.supernode; "
            "print(sorted(m for m in ('torch', 'opacus') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_warm_training_touches_no_scan_ledger_or_feature_cache(tmp_path):
    """The worker's warm-up step trains a throwaway model on random numbers: nothing of it is
    kept (no ledger, no cached features)."""
    from xrayfed.client.nodeconfig import hospital_config_from_node
    from xrayfed.client.worker import warm_training
    from xrayfed.common.model import scatter_front

    config = _hospital_config(tmp_path)
    before = scatter_front._SCATTER_CACHE.bytes
    warm_training(hospital_config_from_node({"config": str(config)}))
    assert scatter_front._SCATTER_CACHE.bytes == before
    assert not (tmp_path / "state" / "privacy-ledger.jsonl").exists()


def test_the_servers_first_evaluation_finds_its_features_computed_while_it_waited(tmp_path, monkeypatch):
    """The server computes the held-out sets' fixed features in the background while it waits
    for round 1 (:func:`xrayfed.server.federation.warm_evaluation`): the first evaluation then
    computes none, and gives the figures it gives without the warm-up."""
    import torch

    from xrayfed.common.config import FederationConfig
    from xrayfed.common.data import load_dataset
    from xrayfed.common.model import build_model, scatter_front
    from xrayfed.common.synthetic import write_npz
    from xrayfed.server import federation

    write_npz(tmp_path / "d.npz", n_train=8, n_val=40, n_test=50, size=16)
    cfg = FederationConfig(image_size=16)
    test = load_dataset(tmp_path / "d.npz", split="test", image_size=16, task=cfg.task)
    val = load_dataset(tmp_path / "d.npz", split="val", image_size=16, task=cfg.task)
    monkeypatch.setattr(scatter_front, "_SCATTER_CACHE", scatter_front._FeatureCache(64 << 20))
    model = build_model(cfg.model)
    cold = federation.evaluate_global(model, cfg, test, val, torch.device("cpu"))  # fills the cache itself
    monkeypatch.setattr(scatter_front, "_SCATTER_CACHE", scatter_front._FeatureCache(64 << 20))

    computed = []
    real = scatter_front.ScatterFront._forward_fft
    monkeypatch.setattr(scatter_front.ScatterFront, "_forward_fft",
                        lambda self, x: computed.append(len(x)) or real(self, x))
    rng = torch.random.get_rng_state()
    warm = federation.warm_evaluation(cfg, test, val, torch.device("cpu"))
    warm.join(timeout=120)
    assert not warm.is_alive() and sum(computed) == len(test) + len(val)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the run's seeded random stream is untouched
    computed.clear()
    hot = federation.evaluate_global(model, cfg, test, val, torch.device("cpu"))
    assert computed == []  # every feature came from the warm-up
    assert hot["metrics"] == cold["metrics"]
    assert federation.warm_evaluation(cfg, None, None, torch.device("cpu")) is None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
