"""The real product, secured: `xrayfed certs init` material, `xrayfed server` with TLS,
SuperNode authentication, SecAgg+ and encrypted checkpoints, and real `xrayfed client`
processes on 127.0.0.1.

ONE server start serves every test of this module (the module fixture): two registered
hospitals (each requiring secure aggregation, each with its own at-rest key) train one round,
and a third registered hospital whose privacy budget cannot pay for a round refuses it inside
the SecAgg+ round (weight 0), while, against the same running server, a hospital whose key is not registered, a hospital
trusting another CA, and an outsider calling the Control API through the public port are all
refused. After the round every hospital's ``xrayfed client`` stops on its own (one of them
runs with -v). The tests then check what each party left behind.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from xrayfed.common.security import atrest
from xrayfed.common.security.atrest import make_atrest_key
from xrayfed.server.pki import init_pki
from xrayfed.common.config import FederationConfig, HospitalConfig, dump_toml
from xrayfed.common.errors import UserError
from xrayfed.common.procs import free_port, kill_tree, spawn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
CLI = [sys.executable, "-m", "xrayfed.common.cli"]
GOOD = ("h1", "h2")  # train
BROKE = "h5"  # registered, refuses for budget
MAX_WEIGHT = 1000.0


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _wait_text(path: Path, pattern: str, timeout: float, proc: subprocess.Popen | None = None) -> re.Match:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        m = re.search(pattern, text)
        if m:
            return m
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.3)
    raise AssertionError(f"{pattern!r} not in {path.name}:\n{path.read_text(errors='replace')[-4000:]}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    before = _descendants()
    root = tmp_path_factory.mktemp("secure")
    pki, other = root / "pki", root / "other-ca"
    init_pki(pki, hospitals=["h1", "h2", "h3", BROKE])  # h3 gets a key but is never registered
    init_pki(other, hospitals=["x"])
    keys = {name: make_atrest_key(root / "keys" / f"{name}.key") for name in ("server", *GOOD)}
    data = root / "data.npz"
    from xrayfed.common.synthetic import write_npz

    write_npz(data, n_train=400, n_val=40, n_test=100, size=28, task="binary", seed=3)

    port = free_port()
    run_dir = root / "run"
    fed = FederationConfig.model_validate({
        "federation": {"name": "secure", "run_dir": str(run_dir), "rounds": 1, "min_clients": 3, "lr": 0.05,
                       "secure_aggregation": True, "round_timeout_s": 300},
        "secure_aggregation": {"max_weight": MAX_WEIGHT},
        "model": {"num_outputs": 1, "width": 8, "depth": 2},
        "task": {"kind": "binary", "class_names": ["NORMAL", "PNEUMONIA"]},
        "image_size": 28,
        "eval": {"path": str(data), "split": "test"},
        # No supernode_auth setting: listing hospital_keys must be enough to turn authentication on
        # (it used to be silently off, and a hospital without a key was aggregated).
        "network": {"listen": f"127.0.0.1:{port}",
                    "hospital_keys": [str(pki / "hospitals" / h / "auth.pub") for h in (*GOOD, BROKE)],
                    "tls": {"ca_cert": str(pki / "ca.pem"), "cert": str(pki / "server.pem"),
                            "key": str(pki / "server.key")}},
    })
    fp = root / "federation.toml"
    fp.write_text(dump_toml(fed))
    hcfg = {}
    for i, name in enumerate(("h1", "h2", "h3", "h4", BROKE)):
        privacy = {"epsilon": 4.0, "max_rounds": 2}
        if name == BROKE:  # σ fixed far too low for its ε: the first round would overspend
            privacy = {"epsilon": 0.5, "max_rounds": 1, "noise_multiplier": 0.3}
        h = HospitalConfig.model_validate({
            "hospital": {"name": name, "state_dir": str(root / f"state-{name}"), "device": "cpu",
                         "require_secure_aggregation": True},
            "data": {"path": str(data), "partition": f"{i % 2}/2"},
            "privacy": privacy,
            "training": {"batch_size": 50},
        })
        hcfg[name] = root / f"{name}.toml"
        hcfg[name].write_text(dump_toml(h))

    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        logs[name] = root / f"{name}.log"
        with logs[name].open("wb") as f:
            procs[name] = spawn(cmd, log=f)
        return procs[name]

    def client(config: str, auth: str, ca: Path, atrest_key: str | None = None, verbose: bool = False) -> list[str]:
        cmd = CLI + (["-v"] if verbose else []) + ["client", "--server", f"127.0.0.1:{port}", "--config", str(hcfg[config]),
                     "--ca-cert", str(ca), "--auth-key", str(pki / "hospitals" / auth / "auth.key")]
        return cmd + (["--atrest-key-file", str(keys[atrest_key])] if atrest_key else [])

    result: dict = {"root": root, "pki": pki, "keys": keys, "run_dir": run_dir, "logs": logs, "port": port}
    t0 = time.time()
    try:
        server = start("server", CLI + ["server", "--config", str(fp), "--atrest-key-file", str(keys["server"])])
        _wait_text(logs["server"], rf"registered hospitals: h1, h2, {BROKE}", 120, server)
        _wait_text(logs["server"], r"SuperLink listening on", 60, server)
        for name in GOOD:  # h2 with -v: Flower's lines too
            start(name, client(name, name, pki / "hospitals" / name / "ca.pem", atrest_key=name, verbose=name == "h2"))
        start(BROKE, client(BROKE, BROKE, pki / "hospitals" / BROKE / "ca.pem"))  # no at-rest key: plaintext
        # Against the same running server: an unregistered hospital, and a hospital with a
        # registered key (h1's) that trusts another CA (its own state folder: config h4).
        start("h3-unregistered", client("h3", "h3", pki / "hospitals" / "h3" / "ca.pem"))
        start("h1-other-ca", client("h4", "h1", other / "ca.pem"))
        # An outsider (it has the public CA certificate) calls the Control API on the public port.
        from xrayfed.common import flower_launch as launch
        from xrayfed.server import registry

        outsider = launch.write_flwr_home(root / "outsider-home", f"127.0.0.1:{port}", root_certificates=pki / "ca.pem")
        try:
            registry.register_hospital(outsider, pki / "hospitals" / "h3" / "auth.pub", name="sybil", timeout=60)
            result["outsider_registered"] = True
        except UserError as e:
            result["outsider_registered"] = False
            result["outsider_error"] = str(e)
        for name in ("h3-unregistered", "h1-other-ca"):
            result[f"rc:{name}"] = procs[name].wait(timeout=120)
        result["rc:server"] = procs["server"].wait(timeout=360)
        result["seconds"] = time.time() - t0
        deadline = time.time() + 60  # the server has finished: each hospital's client stops within seconds
        while time.time() < deadline and any(procs[n].poll() is None for n in (*GOOD, BROKE)):
            time.sleep(0.5)
        for name in (*GOOD, BROKE):  # None: still running, stopped below by the test
            result[f"rc:{name}"] = procs[name].poll()
    finally:
        for p in reversed(list(procs.values())):
            kill_tree(p)
    leftover = [p for p in _descendants() - before if psutil.pid_exists(p)]
    assert not leftover, f"processes left behind: {leftover}"
    return result


def _log(run, name: str) -> str:
    return run["logs"][name].read_text(errors="replace")


def test_tls_secagg_round_with_registered_hospitals(run):
    out = _log(run, "server")
    assert run["rc:server"] == 0, out[-5000:]
    assert "TLS, Fleet API only" in out and "SecAgg+" in out and "round 1:" in out
    assert "no TLS" not in out and "--insecure" not in out
    rows = [json.loads(line) for line in (run["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1]
    hs = {h["hospital"]: h for h in rows[0]["hospitals"]}
    assert set(hs) == {*GOOD, BROKE} and sorted(rows[0]["participants"]) == sorted(GOOD)
    # the hospital without budget refused inside the SecAgg+ round; its ε (nothing spent) is reported
    assert hs[BROKE]["status"] == "refused" and hs[BROKE]["epsilon"] == 0.0 and "refused" in hs[BROKE]["reason"]
    from xrayfed.common.privacy.ledger import read_ledger

    assert read_ledger(run["root"] / f"state-{BROKE}" / "privacy-ledger.jsonl")[-1]["event"] == "refused"
    for name in GOOD:
        h = hs[name]
        # per-hospital ε (plaintext metric) reaches metrics.jsonl and equals the hospital's own ledger
        assert h["status"] == "trained" and 0 < h["epsilon"] <= h["epsilon_budget"]
        key = atrest.read_key_file(run["keys"][name])
        ledger = run["root"] / f"state-{name}" / "privacy-ledger.jsonl"
        train = [r for r in read_ledger(ledger, key) if r["event"] == "train"]
        assert len(train) == 1 and train[0]["epsilon"] == pytest.approx(h["epsilon"])
        # the ledger is encrypted line by line: nothing about the budget is readable
        lines = ledger.read_text().splitlines()
        assert lines and all(atrest.is_encrypted_line(x) for x in lines) and "epsilon" not in ledger.read_text()
        with pytest.raises(UserError, match=re.escape(str(ledger)) + r".*(encrypted|cannot decrypt)"):
            read_ledger(ledger)
        with pytest.raises(UserError, match="cannot decrypt: wrong key"):
            read_ledger(ledger, atrest.AtRestKey.generate())


def test_checkpoint_encrypted_at_rest_and_wrong_key_refused(run):
    ck = run["run_dir"] / "checkpoints" / "round-0001.pt"
    assert ck.is_file() and atrest.is_encrypted(ck.read_bytes())
    assert (ck.stat().st_mode & 0o077) == 0
    back = atrest.load_checkpoint(ck, atrest.read_key_file(run["keys"]["server"]), require_encrypted=True)
    assert back.round == 1 and back.image_size == 28
    with pytest.raises(UserError, match=re.escape(str(ck)) + ": cannot decrypt: wrong key"):
        atrest.load_checkpoint(ck, atrest.read_key_file(run["keys"]["h1"]))
    with pytest.raises(UserError, match="encrypted; pass --atrest-key-file"):
        atrest.load_checkpoint(ck, None)


def test_secure_aggregate_equals_fedavg_of_the_released_updates(run):
    """The global model after the SecAgg+ round is the exact weighted FedAvg of what each hospital
    released (read back from its encrypted release cache), within the quantisation bound, and it
    is not any single hospital's update."""
    from xrayfed.server.secagg import SecAggPlusConfig

    ck = atrest.load_checkpoint(run["run_dir"] / "checkpoints" / "round-0001.pt",
                                atrest.read_key_file(run["keys"]["server"]))
    released = {}
    for name in GOOD:
        d = run["root"] / f"state-{name}" / "released"
        files = list(d.glob("*.pt"))
        assert len(files) == 1 and atrest.is_encrypted(files[0].read_bytes())
        data = atrest.read_maybe_encrypted(files[0], atrest.read_key_file(run["keys"][name]), context=b"release-cache")
        import io

        released[name] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    w = {n: float(r["metrics"]["num-examples"]) for n, r in released.items()}
    total = sum(w.values())
    bound = SecAggPlusConfig(max_weight=MAX_WEIGHT).max_error(len(GOOD), total) + 1e-6
    far = 0
    for k, v in ck.state_dict.items():
        mean = sum(released[n]["state_dict"][k].double() * w[n] for n in GOOD) / total
        err = (v.double() - mean).abs().max().item()
        assert err <= bound, (k, err, bound)
        far = max(far, min((v.double() - released[n]["state_dict"][k].double()).abs().max().item() for n in GOOD))
    assert far > 10 * bound  # the aggregate is not one hospital's update


def test_unregistered_hospital_is_refused_and_the_server_log_names_it(run):
    assert run["rc:h3-unregistered"] != 0
    err = _log(run, "h3-unregistered")
    assert "xrayfed: error: hospital h3 could not join" in err and "not registered" in err
    log = (run["run_dir"] / "server.log").read_text(errors="replace")
    assert re.search(r"\[xrayfed\] REFUSED hospital h3 \(key SHA256:\S+\) from 127\.0\.0\.1:\d+: "
                     r"/v1/fleet/activate-node -> HTTP 412", log), log[-3000:]
    assert not re.search(rf"REFUSED hospital (h1|h2|{BROKE})\b", log)


def test_hospital_trusting_another_ca_is_refused(run):
    assert run["rc:h1-other-ca"] == 2
    out = _log(run, "h1-other-ca")
    # one line naming the CA file, before any SuperNode is started
    line = [x for x in out.splitlines() if x.startswith("xrayfed: error:")]
    assert len(line) == 1 and f"--ca-cert {run['root'] / 'other-ca' / 'ca.pem'}" in line[0], out[-3000:]
    assert "does not verify" in line[0] and "not signed by this CA" in line[0]
    assert " joining 127.0.0.1:" not in out  # stopped before starting its SuperNode
    log = (run["run_dir"] / "server.log").read_text(errors="replace")
    assert "REFUSED hospital h1" not in log  # refused by the hospital itself, before it sent anything


def test_control_api_is_not_reachable_on_the_public_port(run):
    assert run["outsider_registered"] is False
    log = (run["run_dir"] / "server.log").read_text(errors="replace")
    assert re.search(r"REFUSED .* /v1/control/\S+ -> HTTP 403", log), log[-3000:]


def test_hospitals_exit_when_the_run_is_finished_and_the_logs_read_clean(run):
    """After the server's last round every `xrayfed client` stops on its own (exit 0, one line
    with the rounds and its spent budget) instead of retrying forever. Written to files, no
    output carries colour codes; without -v a hospital prints xrayfed's lines only (no Flower
    line, no message id), with -v Flower's lines too; all of them are in STATE/supernode.log."""
    from xrayfed.client.supernode import ALIVE_FILE, SUPERNODE_LOG

    server = _log(run, "server")
    assert "told the 3 connected hospital(s) that the run is finished" in server, server[-3000:]
    logs = {name: _log(run, name) for name in (*GOOD, BROKE)}
    assert {n: run[f"rc:{n}"] for n in logs} == dict.fromkeys(logs, 0), {n: t[-2000:] for n, t in logs.items()}
    for name, text in logs.items():
        last = text.strip().splitlines()[-1]
        # the budget planned for 2 rounds can pay for another; BROKE's refused the only one
        spent = (r"trained no round \(ε = 0 of 0\.50, per patient\)" if name == BROKE else
                 r"spent ε = \d\.\d\d of 4\.00 \(per patient, δ = 1e-05\) in 1 round")
        assert re.fullmatch(rf"\[xrayfed\] hospital {name}: the federation's run 'secure' finished after 1 round; "
                            rf"this hospital {spent}\. Exiting\.", last), last
        state = run["root"] / f"state-{name}"
        assert not (state / ALIVE_FILE).exists()  # it left the server cleanly
        assert "Starting Flower SuperNode" in (state / SUPERNODE_LOG).read_text()
    # No colour codes in any file, the server's included.
    for text in [*logs.values(), server, (run["run_dir"] / "server.log").read_text(errors="replace")]:
        assert "\x1b" not in text
    quiet, verbose = logs["h1"], logs["h2"]
    assert "INFO xrayfed.client.hospital: round 1: trained" in quiet
    assert "Flower" not in quiet and "(ID: " not in quiet and not re.search(r"^(DEBUG|INFO)\s*:", quiet, re.M)
    assert "DEBUG" not in quiet
    assert "Starting Flower SuperNode" in verbose and "(ID: " in verbose
    assert "round 1: test AUC" in server and "Flower" not in server
