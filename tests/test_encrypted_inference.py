"""Encrypted prediction end to end: real processes (patient, hospital service, crypto provider) on
127.0.0.1.

One crypto provider and two inference services (a binary and a 14-label model, 32 px) are started once
for the module (``xrayfed serve-crypto-provider`` / ``xrayfed serve-inference`` with TLS, tokens, a short
session timeout) and every test talks to them like a patient does. Teardown kills the process
groups and checks with psutil that nothing is left.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dicom_files
import numpy as np
import psutil
import pytest
import torch

from xrayfed.common.checkpoint import Checkpoint, save_checkpoint
from xrayfed.common.errors import UserError
from xrayfed.common.model import ModelSpec, build_model, default_model
from xrayfed.common.prediction import NIH_LABELS, TaskSpec, probabilities
from xrayfed.common.procs import free_port, kill_tree, spawn, venv_bin, wait_exited, wait_for_port
from xrayfed.common.security import atrest
from xrayfed.common.security.atrest import load_checkpoint, make_atrest_key
from xrayfed.client.inference import tokens

pytestmark = pytest.mark.timeout(600)

SIZE = 32
SESSION_TIMEOUT = 12
PATIENT = "PAT-0001"
BINARY_PERFORMANCE = {"split": "test", "scans": 624, "classes": {"PNEUMONIA": {
    "sensitivity": 0.94, "specificity": 0.70, "with": 390, "without": 234}}}
AUDIT_FIELDS = {"time", "event", "patient_id", "claimed_patient_id", "token_id", "identity_claim", "model_version",
                "outcome", "reason", "duration_s", "session", "peer"}


# --------------------------------------------------------------------------- helpers
def make_checkpoint(task: TaskSpec, seed: int) -> Checkpoint:
    """A random XrayNet of the default design (weight-standardised convolutions, folded for MPC),
    narrower for speed, whose head is scaled so that logits spread over several units."""
    torch.manual_seed(seed)
    spec = default_model(SIZE, task.num_outputs).model_copy(update={"width": 8, "depth": 2})
    assert spec.weight_standardization
    model = build_model(spec)
    with torch.no_grad():
        model[-1].weight.mul_(60.0)
        model[-1].bias.uniform_(-1.0, 1.0)
    return Checkpoint(model=spec, task=task, image_size=SIZE, state_dict=model.state_dict())


def write_png(path: Path, seed: int, task: str = "binary", size: int = 64) -> Path:
    from PIL import Image

    from xrayfed.common.synthetic import make_synthetic

    imgs, _ = make_synthetic(1, size, task, seed=seed)
    Image.fromarray(imgs[0], mode="L").save(path)
    return path


def write_dicom(path: Path, patient_id: str, seed: int, size: int = 64) -> Path:
    """An 8-bit DICOM of a synthetic 14-label scan for ``patient_id``."""
    from xrayfed.common.synthetic import make_synthetic

    imgs, _ = make_synthetic(1, size, "multilabel", seed=seed)
    return dicom_files.write_dicom(path, imgs[0], patient_id=patient_id)


def plaintext_probs(ckpt: Checkpoint, scan: Path) -> np.ndarray:
    from xrayfed.common.preprocess import prepare_scan

    with torch.no_grad():
        logits = ckpt.build()(prepare_scan(scan, ckpt.image_size)).numpy()
    return probabilities(ckpt.task, logits)[0]


def audit_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_audit(path: Path, pred, timeout: float = 30.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for rec in audit_lines(path):
            if pred(rec):
                return rec
        time.sleep(0.2)
    raise AssertionError(f"no matching audit line within {timeout}s: {audit_lines(path)[-3:]}")


def live_workers(proc: subprocess.Popen) -> list[psutil.Process]:
    """Session party processes of a service: live children of its fork server."""
    out = []
    try:
        for c in psutil.Process(proc.pid).children(recursive=True):
            try:
                if c.status() == psutil.STATUS_ZOMBIE:
                    continue
                parent = c.parent()
                if parent is not None and "forkserver" in " ".join(parent.cmdline()):
                    out.append(c)
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return out


def wait_no_workers(proc, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not live_workers(proc):
            return
        time.sleep(0.2)
    raise AssertionError(f"session workers still alive: {[p.pid for p in live_workers(proc)]}")


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


class Stack:
    """Crypto provider + binary service + 14-label service (or the services of ``models``: name →
    checkpoint file), started as real CLI processes."""

    def __init__(self, root: Path, models: dict[str, Path] | None = None) -> None:
        from xrayfed.server.pki import init_pki

        self.root = root
        init_pki(root / "pki")
        self.ca = root / "pki" / "inference" / "ca.pem"
        self.key_path, self.pub_path = tokens.generate_key(root / "hospital-token.key")
        self.key = tokens.load_private_key(self.key_path)
        self.foreign_key = tokens.load_private_key(tokens.generate_key(root / "other-hospital.key")[0])
        self.secret = root / "crypto-provider.secret"
        self.secret.write_text(os.urandom(32).hex())
        self.token = self.write_token("patient.tok", PATIENT)
        encrypted: dict[str, Path] = {}  # service -> at-rest key file of its checkpoint
        if models is None:
            self.ckpt = {
                "binary": make_checkpoint(TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")), 1),
                "multilabel": make_checkpoint(TaskSpec(kind="multilabel", class_names=NIH_LABELS), 2),
            }
            # the binary model as the server stores it: its operating point and measured performance,
            # encrypted at rest (served with --atrest-key-file); the 14-label one plaintext, never measured
            self.ckpt["binary"].threshold = [0.6]
            self.ckpt["binary"].performance = BINARY_PERFORMANCE
            models = {name: root / f"{name}.pt" for name in self.ckpt}
            save_checkpoint(models["multilabel"], self.ckpt["multilabel"])
            encrypted["binary"] = make_atrest_key(root / "atrest.key")
            atrest.save_checkpoint(models["binary"], self.ckpt["binary"], atrest.read_key_file(encrypted["binary"]))
        self.logs: list = []
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        xr = venv_bin("xrayfed")
        pki = root / "pki"
        self.ports["crypto-provider"] = free_port()
        self._spawn("crypto-provider", [xr, "serve-crypto-provider", "--listen",
                                        f"127.0.0.1:{self.ports['crypto-provider']}", "--cert",
                                        str(pki / "crypto-provider" / "tls.pem"),
                                        "--key", str(pki / "crypto-provider" / "tls.key"),
                            "--secret", str(self.secret),
                            "--session-timeout", str(SESSION_TIMEOUT)])
        for name, model in models.items():
            self.ports[name] = free_port()
            self._spawn(name, [
                xr, "serve-inference", "--model", str(model), "--listen",
                f"127.0.0.1:{self.ports[name]}", "--token-key", str(self.pub_path), "--cert",
                str(pki / "inference" / "tls.pem"), "--key", str(pki / "inference" / "tls.key"),
                "--crypto-provider", f"127.0.0.1:{self.ports['crypto-provider']}", "--ca-cert", str(pki / "ca.pem"),
                "--crypto-provider-secret", str(self.secret), "--audit-log", str(self.audit(name)),
                "--session-timeout", str(SESSION_TIMEOUT), "--max-sessions", "3", "--rate-per-hour", "1000",
                "--budget-per-token", "1000"]
                + (["--allow-scans-without-patient-id"] if name != "multilabel" else [])
                + (["--atrest-key-file", str(encrypted[name])] if name in encrypted else []))
        for name, proc in self.procs.items():
            wait_for_port("127.0.0.1", self.ports[name], timeout=240, proc=proc, what=name)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.log", "ab")
        self.logs.append(log)
        self.procs[name] = spawn(cmd, log=log)

    def audit(self, name: str) -> Path:
        return self.root / f"audit-{name}.jsonl"

    def service(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def write_token(self, fname: str, patient: str, *, key=None, now: int | None = None,
                    expires: int | None = None) -> Path:
        now = int(time.time()) if now is None else now
        tok = tokens.issue_token(key or self.key, patient, expires or now + 3600, now=now)
        path = self.root / fname
        path.write_text(tok + "\n")
        return path

    def predict_cli(self, name: str, scan: Path, token: Path | None = None, *extra: str,
                    timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run([venv_bin("xrayfed"), "predict", "--scan", str(scan), "--service", self.service(name),
                               "--token", str(token or self.token), "--ca-cert", str(self.ca), *extra],
                              capture_output=True, text=True, timeout=timeout)

    def close(self) -> None:
        tree = []
        for proc in self.procs.values():
            try:
                tree += [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for proc in self.procs.values():
            kill_tree(proc)
        for f in self.logs:
            f.close()
        alive = wait_exited(tree, 10)  # an orphan that init has not reaped yet has exited
        assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], alive


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("encinf"))
    try:
        yield s
    finally:
        s.close()


# --------------------------------------------------------------------------- correctness
@pytest.mark.slow
def test_binary_prediction_matches_plaintext(stack, tmp_path):
    scan = write_png(tmp_path / "scan.png", seed=3)
    r = stack.predict_cli("binary", scan, None, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    ref = plaintext_probs(stack.ckpt["binary"], scan)
    assert res["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert np.abs(np.array(res["probabilities"]) - ref).max() < 1e-2, (res["probabilities"], ref)
    # the model was served from its encrypted checkpoint (--atrest-key-file), with the figures it carries
    assert res["format"] == "xrayfed-prediction/1" and res["task"] == "binary" and res["threshold"] == [0.6]
    assert res["performance"] == BINARY_PERFORMANCE
    assert res["prediction"] == [("PNEUMONIA" if ref[1] >= 0.6 else "NORMAL")]
    text = stack.predict_cli("binary", scan, None)
    assert text.returncode == 0, text.stderr
    assert f"Result: {res['prediction'][0]}." in text.stdout
    assert "Of 100 scans with PNEUMONIA, it flagged PNEUMONIA for about 94" in text.stdout
    rec = wait_audit(stack.audit("binary"), lambda r: r["outcome"] == "ok")
    assert set(rec) == AUDIT_FIELDS
    assert rec["patient_id"] == PATIENT and rec["model_version"] == stack.ckpt["binary"].model_version
    assert rec["duration_s"] > 0 and rec["token_id"]


@pytest.mark.slow
def test_fourteen_label_dicom_prediction_matches_plaintext(stack, tmp_path):
    scan = write_dicom(tmp_path / "scan.dcm", PATIENT, seed=5)
    page = tmp_path / "result.html"
    r = stack.predict_cli("multilabel", scan, None, "--json", "--html", str(page))
    assert r.returncode == 0, r.stderr
    ref = plaintext_probs(stack.ckpt["multilabel"], scan)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    got = dict(zip(res["class_names"], res["probabilities"]))
    assert list(got) == list(NIH_LABELS)
    assert np.abs(np.array(list(got.values())) - ref).max() < 1e-2, (got, ref)
    assert ref.std() > 0.05  # probabilities really differ between labels (the check can fail)
    assert res["prediction"] == [n for n, p in zip(NIH_LABELS, ref) if p >= 0.5] and res["performance"] is None
    assert "only you can see" in page.read_text() and "not measured" in page.read_text()
    assert page.stat().st_mode & 0o077 == 0


@pytest.mark.slow
def test_concurrent_requests_get_separate_sessions(stack, tmp_path):
    scans = [write_png(tmp_path / f"s{i}.png", seed=10 + i) for i in range(2)]
    n_before = len(audit_lines(stack.audit("binary")))
    results = [None, None]

    toks = [stack.token, stack.write_token("second-patient.tok", "PAT-0002")]  # one session per token

    def run(i):
        results[i] = stack.predict_cli("binary", scans[i], toks[i], "--json")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, r in enumerate(results):
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout.strip().splitlines()[-1])
        ref = plaintext_probs(stack.ckpt["binary"], scans[i])
        assert np.abs(np.array(res["probabilities"]) - ref).max() < 1e-2
    deadline = time.time() + 20
    while len(audit_lines(stack.audit("binary"))) < n_before + 2 and time.time() < deadline:
        time.sleep(0.2)
    new = audit_lines(stack.audit("binary"))[n_before:]
    assert [r["outcome"] for r in new] == ["ok", "ok"]
    assert new[0]["session"] != new[1]["session"]


# --------------------------------------------------------------------------- authorisation
@pytest.mark.slow
def test_bad_tokens_and_foreign_dicom_are_refused(stack, tmp_path):
    from xrayfed.client.patient import predict

    png = write_png(tmp_path / "scan.png", seed=4)
    now = int(time.time())
    expired = stack.write_token("expired.tok", PATIENT, now=now - 7200, expires=now - 3600)
    good = stack.token.read_text().strip()
    prefix, body, sig = good.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["sub"] = "PAT-9999"
    body2 = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    tampered = tmp_path / "tampered.tok"
    tampered.write_text(f"{prefix}.{body2}.{sig}\n")
    foreign = stack.write_token("foreign.tok", PATIENT, key=stack.foreign_key)
    other_dicom = write_dicom(tmp_path / "other.dcm", "PAT-0002", seed=6)
    cases = [
        (png, expired, "binary", "expired"),
        (png, tampered, "binary", "altered"),
        (png, foreign, "binary", "does not trust"),
        (other_dicom, stack.token, "multilabel", "your own scans"),
    ]
    for scan, tok, svc, msg in cases:
        with pytest.raises(UserError, match=msg):
            predict(scan, stack.service(svc), tok, ca_cert=stack.ca)
    reasons = {r["reason"] for r in audit_lines(stack.audit("binary")) if r["outcome"] == "refused"}
    assert {"expired", "bad_signature", "unknown_key"} <= reasons
    rec = wait_audit(stack.audit("multilabel"), lambda r: r["reason"] == "patient_mismatch")
    assert rec["patient_id"] == PATIENT and rec["outcome"] == "refused"
    for name in ("binary", "multilabel"):
        for line in audit_lines(stack.audit(name)):
            assert set(line) == AUDIT_FIELDS  # nothing else: no scan, no result, no token


@pytest.mark.slow
def test_crypto_provider_only_serves_the_hospital(stack):
    import grpc

    from xrayfed.common import rpc

    ch = rpc.make_channel(stack.service("crypto-provider"), ca_cert=stack.root / "pki" / "ca.pem", insecure=False)
    stub = rpc.method(ch, "xrayfed.crypto_provider.v1.CryptoProvider", "StartSession")
    with pytest.raises(grpc.RpcError) as e:
        stub({"session_id": "0" * 32, "host": "127.0.0.1", "port": 1, "timeout_s": 5}, timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ch.close()


@pytest.mark.slow
def test_no_process_without_the_session_credentials_gets_in(stack, tmp_path):
    """A fourth process cannot join a session: not at the crypto provider without the session id,
    not at the hospital with another patient's token, and not a second time with the real one."""
    import grpc

    from xrayfed.common import rpc
    from xrayfed.common.mpc import dealer

    tok = stack.token.read_text().strip()
    other = stack.write_token("other.tok", "PAT-OTHER").read_text().strip()
    hosp = rpc.make_channel(stack.service("binary"), ca_cert=stack.ca, insecure=False)
    prov = rpc.make_channel(stack.service("crypto-provider"), ca_cert=stack.ca, insecure=False,
                            server_name="xrayfed-crypto-provider")
    info = rpc.call(rpc.method(hosp, "xrayfed.inference.v1.Inference", "ModelInfo"), {"token": tok}, timeout=30,
                    what="svc", target="x")
    sess = rpc.call(rpc.method(hosp, "xrayfed.inference.v1.Inference", "OpenSession"),
                    {"token": tok, "scan": {"image_size": SIZE, "channels": 1}}, timeout=30, what="svc", target="x")
    sid, tape = sess["session_id"], info["mpc"]["tape"]
    x = np.zeros((1, 1, SIZE, SIZE))
    to_h, to_c = dealer.contributions(x, info["mpc"], tape)  # as the patient does
    c_blobs, h_blobs = dealer.to_blobs(to_c), dealer.to_blobs(to_h)
    ev_c = rpc.method(prov, "xrayfed.crypto_provider.v1.CryptoProvider", "Evaluate")
    ev_h = rpc.method(hosp, "xrayfed.inference.v1.Inference", "Evaluate")
    for bad in ("0" * 32, sid[:-1] + ("0" if sid[-1] != "0" else "1"), "not-a-session"):
        with pytest.raises(grpc.RpcError) as e:
            ev_c(({"session_id": bad}, c_blobs), timeout=30)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e:  # the right session id with another patient's token
        ev_h(({"token": other, "session_id": sid}, h_blobs), timeout=30)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e:  # malformed share: refused, one line
        ev_c(({"session_id": sid}, dict(c_blobs, x=b"123")), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "scan share" in e.value.details()
    # the patient itself completes the session ... (the malformed attempt above used up the
    # crypto provider's one input, so this session ends as failed; a fresh one is served)
    with pytest.raises(grpc.RpcError) as e:
        ev_c(({"session_id": sid}, c_blobs), timeout=30)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "already" in e.value.details()
    hosp.close()
    prov.close()
    wait_no_workers(stack.procs["binary"], timeout=SESSION_TIMEOUT + 15)
    wait_no_workers(stack.procs["crypto-provider"], timeout=SESSION_TIMEOUT + 15)


@pytest.mark.slow
def test_patient_only_connects_out_and_imports_no_torch(stack, tmp_path):
    """``xrayfed predict`` never listens on a socket, connects only to the two services' ports,
    and never imports torch or CrypTen (the patient's part is numpy)."""
    scan = write_png(tmp_path / "scan.png", seed=12)
    script = tmp_path / "patient_probe.py"
    script.write_text(
        "import sys\n"
        "from xrayfed.common.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "print('MODULES', 'torch' in sys.modules, 'crypten' in sys.modules, file=sys.stderr)\n"
        "sys.exit(rc)\n")
    proc = subprocess.Popen([sys.executable, str(script), "predict", "--scan", str(scan), "--service",
                             stack.service("binary"), "--token", str(stack.token), "--ca-cert", str(stack.ca), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = set()
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for c in ps.net_connections(kind="inet"):
                seen.add((c.status, c.raddr.port if c.raddr else None))
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            break
        time.sleep(0.005)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "MODULES False False" in err
    assert seen, "no connection observed"
    assert not [c for c in seen if c[0] == psutil.CONN_LISTEN], seen
    assert {port for _, port in seen if port} <= {stack.ports["binary"], stack.ports["crypto-provider"]}, seen
    assert json.loads(out)["probabilities"]


# --------------------------------------------------------------------------- bad input, failures
@pytest.mark.slow
def test_bad_input_is_one_clear_line_and_service_stays_up(stack, tmp_path):
    from xrayfed.client.patient import predict
    from xrayfed.common import rpc

    good = write_png(tmp_path / "good.png", seed=7)
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not an image\n")
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(good.read_bytes()[:150])
    tiny = tmp_path / "tiny.png"
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tiny)
    for scan, msg in ((not_image, "not a readable image"), (truncated, "not a readable image"),
                      (tiny, "too small"), (tmp_path / "missing.png", "no file")):
        with pytest.raises(UserError, match=msg):
            predict(scan, stack.service("binary"), stack.token, ca_cert=stack.ca)
    # unreachable service, and a CLI run: exactly one line on stderr, exit status 2
    r = subprocess.run([venv_bin("xrayfed"), "predict", "--scan", str(good), "--service", f"127.0.0.1:{free_port()}",
                        "--token", str(stack.token), "--ca-cert", str(stack.ca), "--timeout", "5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("xrayfed: error: cannot reach the inference service")
    # wrong size / channel count announced to the service: refused with a clear message
    ch = rpc.make_channel(stack.service("binary"), ca_cert=stack.ca, insecure=False)
    tok = stack.token.read_text().strip()
    for scan_meta in ({"image_size": 64, "channels": 1}, {"image_size": SIZE, "channels": 3}):
        with pytest.raises(UserError, match="this model takes 1 channel"):
            rpc.call(rpc.method(ch, "xrayfed.inference.v1.Inference", "OpenSession"),
                     {"token": tok, "scan": scan_meta}, timeout=20, what="svc", target="x")
    health = rpc.call(rpc.method(ch, "xrayfed.inference.v1.Inference", "Health"), {}, timeout=10, what="svc",
                      target="x")
    assert health["ok"] is True
    ch.close()


@pytest.mark.slow
def test_killed_patient_mid_session_leaves_service_serving(stack, tmp_path):
    scan = write_png(tmp_path / "scan.png", seed=8)
    n_before = len(audit_lines(stack.audit("binary")))
    script = tmp_path / "dying_patient.py"
    script.write_text(
        "import os, signal, sys\n"
        "from xrayfed.client import patient\n"
        "import time\n"
        "def observe(name):\n"
        "    if name == 'sent_hospital':  # its share reached the hospital, the crypto provider's never will\n"
        "        time.sleep(0.5)\n"
        "        os.kill(os.getpid(), signal.SIGKILL)  # dies in the middle of the MPC session\n"
        "patient.predict(sys.argv[1], sys.argv[2], sys.argv[3], ca_cert=sys.argv[4], observe=observe)\n")
    r = subprocess.run([sys.executable, str(script), str(scan), stack.service("binary"), str(stack.token),
                        str(stack.ca)], capture_output=True, text=True, timeout=240)
    assert r.returncode == -signal.SIGKILL, r.stderr
    t0 = time.time()
    new = []
    while time.time() - t0 < SESSION_TIMEOUT + 20 and not new:
        new = [x for x in audit_lines(stack.audit("binary"))[n_before:] if x["outcome"] not in ("ok", "refused")]
        time.sleep(0.2)
    assert new and new[0]["outcome"] in ("failed", "died", "timeout"), audit_lines(stack.audit("binary"))[n_before:]
    wait_no_workers(stack.procs["binary"], timeout=SESSION_TIMEOUT + 10)
    wait_no_workers(stack.procs["crypto-provider"], timeout=SESSION_TIMEOUT + 10)
    # the next patient is served
    r = stack.predict_cli("binary", scan, None, "--json")
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_abandoned_session_is_torn_down_within_timeout(stack):
    from xrayfed.common import rpc

    n_before = len(audit_lines(stack.audit("binary")))
    ch = rpc.make_channel(stack.service("binary"), ca_cert=stack.ca, insecure=False)
    sess = rpc.call(rpc.method(ch, "xrayfed.inference.v1.Inference", "OpenSession"),
                    {"token": stack.token.read_text().strip(), "scan": {"image_size": SIZE, "channels": 1}},
                    timeout=30, what="svc", target="x")
    assert "state_dict" not in json.dumps(sess)
    assert sess["crypto_provider"]["address"] == stack.service("crypto-provider")
    t0 = time.time()
    # both parties wait for us
    assert live_workers(stack.procs["binary"]) and live_workers(stack.procs["crypto-provider"])
    wait_no_workers(stack.procs["binary"], timeout=SESSION_TIMEOUT + 15)
    wait_no_workers(stack.procs["crypto-provider"], timeout=SESSION_TIMEOUT + 15)
    assert time.time() - t0 <= SESSION_TIMEOUT + 15
    rec = wait_audit(stack.audit("binary"), lambda r: r["outcome"] != "ok" and r["event"] == "predict"
                     and r in audit_lines(stack.audit("binary"))[n_before:])
    assert rec["outcome"] in ("not_joined", "timeout", "failed")
    health = rpc.call(rpc.method(ch, "xrayfed.inference.v1.Inference", "Health"), {}, timeout=10, what="svc",
                      target="x")
    assert health["ok"] and health["sessions"] == 0
    ch.close()


# --------------------------------------------------------------------------- what each party holds
def _corr(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def _looks_uniform_ring(share: torch.Tensor) -> bool:
    """Shares of a 64-bit ring element are uniform: about half negative, spread over the ring."""
    s = share.double().ravel() / 2.0**63
    return 0.35 < float((s < 0).double().mean()) < 0.65 and 0.45 < float(s.std()) < 0.7


@pytest.mark.slow
def test_hospital_never_holds_scan_and_crypto_provider_never_holds_weights(pool, tmp_path):
    """What each computing party holds of the scan and of the weights is a uniformly random
    share; the patient gets re-randomised output shares (uniform on their own)."""
    from xrayfed.common import mpc
    from xrayfed.common.mpc import dealer
    from xrayfed.common.preprocess import prepare_scan

    ckpt = make_checkpoint(TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")), 3)
    x = prepare_scan(write_png(tmp_path / "scan.png", seed=9), SIZE)
    # what the patient shares: the scan after the model's public first layer (the default model's
    # ScatterNet features; as revealing as the scan itself, scattering being close to invertible)
    shared = torch.from_numpy(dealer.public_front(x.double().numpy(), mpc.front_of(ckpt.model)))
    assert ckpt.model.scattering and shared.shape[1] == 81
    encoded = torch.round(shared * 2**16).long()  # what a party would hold if it were not shared
    runs = []
    for i in range(2):
        d = tmp_path / f"run{i}"
        d.mkdir()
        res = mpc.run_local_session(pool, ckpt, x, timeout_s=60, observe_dir=str(d))
        runs.append((res, torch.load(d / "hospital.pt"), torch.load(d / "provider.pt")))
    ref = ckpt.build()(x).detach().numpy()
    for res, _, _ in runs:
        assert np.abs(res["logits"] - ref).max() < 1e-2

    # The test's statistics do flag the plaintext (so they can fail):
    assert _corr(encoded, shared) > 0.99 and not _looks_uniform_ring(encoded)

    h0, h1 = runs[0][1]["scan_share"], runs[1][1]["scan_share"]
    for share in (h0, h1):
        assert share.shape == encoded.shape
        assert float((share == encoded).double().mean()) < 0.01  # differs from the scan
        assert abs(_corr(share, shared)) < 0.15  # n = 81 × 8 × 8: |r| < 0.15 is > 10 sigma
        assert _looks_uniform_ring(share)
    assert float((h0 == h1).double().mean()) < 0.01  # fresh randomness per session
    assert abs(_corr(h0 - h1, shared)) < 0.15

    for _, _, provider_seen in runs:  # the crypto provider's share of the scan: the same checks
        share = provider_seen["scan_share"]
        assert abs(_corr(share, shared)) < 0.15 and _looks_uniform_ring(share)
    for res, _, _ in runs:  # each output share the patient receives is a uniform ring element
        for y in res["shares"].values():
            assert (np.abs(y.astype(np.float64)) > 2.0**40).all()

    from xrayfed.common.model import fold_standardization

    sd = {k: torch.round(v.float() * 2**16).long() for k, v in fold_standardization(ckpt.model,
                                                                                      ckpt.state_dict).items()}
    for _, _, provider_seen in runs:
        shares = provider_seen["weight_shares"]
        assert set(shares) == set(sd)
        flat_s = torch.cat([shares[k].ravel() for k in sd])
        flat_w = torch.cat([sd[k].ravel() for k in sd])
        assert float((flat_s == flat_w).double().mean()) < 0.01
        # uniform shares: r ~ N(0, 1/n); 4.5 sigma (a fixed 0.05 was only 1.8 sigma at n = 1265: flaky)
        assert abs(_corr(flat_s, flat_w)) < 4.5 / flat_w.numel() ** 0.5
        assert _looks_uniform_ring(flat_s)


class _Aborted(Exception):
    pass


class FakeContext:
    """Just enough of a grpc.ServicerContext to call a handler directly."""

    code = details = None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def abort(self, code, details):
        self.code, self.details = code, details
        raise _Aborted(details)


@pytest.mark.slow
def test_crypto_provider_outage_is_refused_cleanly_and_frees_the_slot(pool, tmp_path):
    import grpc

    from xrayfed.client.inference.gate import AuditLog
    from xrayfed.client.inference.service import InferenceService
    from xrayfed.common.checkpoint import to_bytes
    from xrayfed.common.config import InferenceServiceConfig

    ckpt = make_checkpoint(TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")), 5)
    priv, pub = tokens.generate_key(tmp_path / "k.key")
    cfg = InferenceServiceConfig(max_sessions=1, session_timeout_s=20, audit_log=tmp_path / "audit.jsonl",
                                 allow_scans_without_patient_id=True)

    def provider_down(request):
        raise UserError("cannot reach crypto provider at 127.0.0.1:1 (connection refused)")

    audit = AuditLog(cfg.audit_log)
    svc = InferenceService(cfg, ckpt, to_bytes(ckpt), pool, tokens.load_public_keys([pub]), audit, provider_down)
    tok = tokens.issue_token(tokens.load_private_key(priv), "P1", int(time.time()) + 600)
    for _ in range(2):  # with max_sessions = 1, a leaked slot would make the 2nd answer "busy"
        ctx = FakeContext()
        with pytest.raises(_Aborted):
            svc.open_session({"token": tok, "scan": {"image_size": SIZE, "channels": 1}}, ctx)
        assert ctx.code == grpc.StatusCode.UNAVAILABLE and "crypto provider" in ctx.details
    audit.close()
    recs = audit_lines(cfg.audit_log)
    assert [(r["outcome"], r["reason"]) for r in recs] == [("failed", "crypto_provider_unavailable")] * 2
    me = psutil.Process(os.getpid())
    servers = []
    for c in me.children():
        try:
            if "forkserver" in " ".join(c.cmdline()):
                servers.append(c)
        except psutil.Error:  # an earlier test's child that exited and is not reaped yet
            pass
    deadline = time.time() + 10
    while time.time() < deadline and any(
            c.status() != psutil.STATUS_ZOMBIE for s in servers for c in s.children()):
        time.sleep(0.2)
    assert not [c for s in servers for c in s.children() if c.status() != psutil.STATUS_ZOMBIE]


# --------------------------------------------------------------------------- model checks
def test_checkpoint_with_mismatching_architecture_is_refused(tmp_path):
    from xrayfed.client.inference.cli import check_model
    from xrayfed.common.cli import main

    good = make_checkpoint(TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")), 4)
    bad = Checkpoint(model=good.model.model_copy(update={"width": 16}), task=good.task, image_size=SIZE,
                     state_dict=good.state_dict)
    with pytest.raises(UserError, match="does not match the model architecture"):
        check_model(bad, crypten=False)
    backbone = Checkpoint(model=ModelSpec(arch="mobilenet_v3_small", num_outputs=1), task=good.task,
                          image_size=SIZE, state_dict={})
    with pytest.raises(UserError, match="cannot run under MPC"):
        check_model(backbone, crypten=False)
    path = tmp_path / "bad.pt"
    save_checkpoint(path, bad)
    assert load_checkpoint(path).model.width == 16
    key, pub = tokens.generate_key(tmp_path / "k.key")
    rc = main(["serve-inference", "--model", str(path), "--token-key", str(pub), "--insecure",
               "--listen", f"127.0.0.1:{free_port()}"])
    assert rc == 2


def test_service_and_crypto_provider_configs_from_toml(tmp_path):
    from xrayfed.common.config import CryptoProviderConfig, InferenceServiceConfig, load_config

    (tmp_path / "inference.toml").write_text(
        'model = "global.pt"\ntoken_keys = ["keys/token.pub"]\ncrypto_provider = "10.77.0.3:9444"\n'
        'crypto_provider_public = "provider.example:9444"\n'
        'session_timeout_s = 60\n[tls]\ncert = "tls.pem"\nkey = "tls.key"\n[crypto_provider_tls]\nca_cert = "ca.pem"\n')
    cfg = load_config(InferenceServiceConfig, tmp_path / "inference.toml", {"max_sessions": 2})
    assert cfg.model == tmp_path / "global.pt" and cfg.token_keys == [tmp_path / "keys" / "token.pub"]
    assert cfg.tls.cert == tmp_path / "tls.pem" and cfg.crypto_provider_tls.ca_cert == tmp_path / "ca.pem"
    assert (cfg.crypto_provider_public, cfg.session_timeout_s, cfg.max_sessions) == ("provider.example:9444", 60.0, 2)
    with pytest.raises(UserError, match="max_sessions"):
        load_config(InferenceServiceConfig, None, {"max_sessions": 0})
    with pytest.raises(UserError, match="unknown setting"):
        load_config(CryptoProviderConfig, None, {"provider": "TFP"})
    provider = load_config(CryptoProviderConfig, None, {"mpc_host": "10.77.0.3", "tls.insecure": True})
    assert provider.mpc_host == "10.77.0.3" and provider.tls.insecure


class PeerContext(FakeContext):
    def __init__(self, peer: str = "ipv4:127.0.0.1:1") -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


@pytest.mark.slow
def test_one_caller_cannot_hold_the_service(pool, tmp_path):
    """One valid token used to open every session slot and never join. Now: one session
    per token, two per address, a session nobody joins is freed after join_timeout_s, a rate and
    a lifetime budget per token (kept across a restart), and revoked tokens are refused."""
    import grpc

    from xrayfed.client.inference.gate import AuditLog, revoke_token
    from xrayfed.client.inference.service import InferenceService
    from xrayfed.common.checkpoint import to_bytes
    from xrayfed.common.config import InferenceServiceConfig

    ckpt = make_checkpoint(TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")), 7)
    priv, pub = tokens.generate_key(tmp_path / "k.key")
    key = tokens.load_private_key(priv)
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("")
    cfg = InferenceServiceConfig(max_sessions=4, session_timeout_s=60, join_timeout_s=3, prediction_budget_per_token=3,
                                 predictions_per_token_per_hour=10, revoked_tokens=revoked,
                                 allow_scans_without_patient_id=True, audit_log=tmp_path / "audit.jsonl")
    toks = {n: tokens.issue_token(key, n, int(time.time()) + 600) for n in ("A", "B", "C", "D")}
    audit = AuditLog(cfg.audit_log)
    silent = socket.socket()  # a crypto provider party that never answers: sessions wait for nobody
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)

    def provider(request):
        return {"host": "127.0.0.1", "port": silent.getsockname()[1]}

    svc = InferenceService(cfg, ckpt, to_bytes(ckpt), pool, tokens.load_public_keys([pub]), audit, provider)
    scan = {"image_size": SIZE, "channels": 1}

    def open_(tok, peer="ipv4:10.0.0.5:1000"):
        ctx = PeerContext(peer)
        try:
            return svc.open_session({"token": toks[tok] if tok in toks else tok, "scan": scan}, ctx), None
        except _Aborted:
            return None, (ctx.code, ctx.details)

    try:
        assert open_("A")[0] is not None
        _, (code, msg) = open_("A", "ipv4:10.0.0.9:1")  # the same token again, from anywhere
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "this token already has 1 session" in msg
        assert open_("B")[0] is not None
        _, (code, msg) = open_("C")  # a third session from the same address
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "from your address" in msg
        assert open_("D", "ipv6:[2001:db8::1]:5")[0] is not None  # another patient elsewhere is served
        # nobody joins: the slots are freed after join_timeout_s, not after the 60 s session timeout
        t0 = time.time()
        while svc.health({}, None)["sessions"] and time.time() - t0 < 30:
            time.sleep(0.2)
        assert svc.health({}, None)["sessions"] == 0 and time.time() - t0 < 15
        for _ in range(2):  # A's 2nd and 3rd prediction (budget 3) ...
            assert open_("A")[0] is not None
            while svc.health({}, None)["sessions"]:
                time.sleep(0.2)
        _, (code, msg) = open_("A")  # ... and the 4th is refused
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "used its 3 predictions" in msg
        # revocation by jti, re-read while the service runs
        revoke_token(revoked, toks["B"])
        _, (code, msg) = open_("B")
        assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in msg
    finally:
        svc.stop_all()
        audit.close()
        silent.close()
    # a restart does not reset the budget (it is counted from the audit log)
    audit2 = AuditLog(cfg.audit_log)
    svc2 = InferenceService(cfg, ckpt, to_bytes(ckpt), pool, tokens.load_public_keys([pub]), audit2, provider,
                            tape=svc.tape)
    ctx = PeerContext()
    with pytest.raises(_Aborted):
        svc2.open_session({"token": toks["A"], "scan": scan}, ctx)
    assert "used its 3 predictions" in ctx.details
    audit2.close()
    recs = audit_lines(cfg.audit_log)
    reasons = [r["reason"] for r in recs if r["outcome"] == "refused"]
    assert {"busy_token", "busy_peer", "budget_spent", "revoked"} <= set(reasons)
    assert [r for r in recs if r["outcome"] == "not_joined"] and all(r["identity_claim"] == "none" for r in recs
                                                                       if r["patient_id"])


def test_scan_without_patient_identity_is_refused_by_default(pool, tmp_path):
    """A token for patient A plus a PNG (no PatientID) of anyone used to get a prediction; by
    default the service now requires the identity claim a DICOM scan carries."""
    import grpc

    from xrayfed.client.inference.gate import AuditLog
    from xrayfed.client.inference.service import InferenceService
    from xrayfed.common.checkpoint import to_bytes
    from xrayfed.common.config import InferenceServiceConfig

    ckpt = make_checkpoint(TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")), 8)
    priv, pub = tokens.generate_key(tmp_path / "k.key")
    cfg = InferenceServiceConfig(audit_log=tmp_path / "audit.jsonl")
    audit = AuditLog(cfg.audit_log)
    calls = []
    svc = InferenceService(cfg, ckpt, to_bytes(ckpt), pool, tokens.load_public_keys([pub]), audit, calls.append)
    tok = tokens.issue_token(tokens.load_private_key(priv), "PAT-A", int(time.time()) + 600)
    ctx = PeerContext()
    with pytest.raises(_Aborted):
        svc.open_session({"token": tok, "scan": {"image_size": SIZE, "channels": 1}}, ctx)
    assert ctx.code == grpc.StatusCode.PERMISSION_DENIED and "PatientID" in ctx.details
    ctx = PeerContext()
    with pytest.raises(_Aborted):
        svc.open_session({"token": tok, "scan": {"image_size": SIZE, "channels": 1,
                                                 "dicom_patient_id": "PAT-B"}}, ctx)
    assert ctx.code == grpc.StatusCode.PERMISSION_DENIED
    audit.close()
    recs = audit_lines(cfg.audit_log)
    assert [(r["reason"], r["identity_claim"]) for r in recs] == [("no_identity_claim", "none"),
                                                                   ("patient_mismatch", "dicom_patient_id")]
    assert not calls  # no session was started for either
