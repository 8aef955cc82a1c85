"""Denial of service at the public ports, and a hospital trusting the wrong CA.

Every test uses real sockets on 127.0.0.1 (and 127.0.0.2-5 as other callers), ports chosen
free at run time, real TLS with certificates from the project's PKI (``init_pki``), with the
time limits lowered through the components' own parameters so the attacks take seconds.

* The Fleet gateway: slow senders (headers, then one body byte at a time; or headers one byte
  at a time) cannot hold its request slots, and a registered hospital is still served.
* The crypto provider's MPC port: idle connections cannot keep the hospital's party out.
* The inference service: a request larger than any legitimate one is refused by gRPC before
  any handler (or memory) is spent on it, and the service keeps serving.
* ``xrayfed client`` with another federation's ca.pem: one line naming the CA file, at once.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from xrayfed.common.errors import UserError
from xrayfed.common.procs import free_port
from xrayfed.server.pki import init_pki, public_key_fingerprint

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    init_pki(root / "fed", hospitals=["h1"])
    return root / "fed"


def _signed_headers(private_key_path: Path) -> dict[str, str]:
    """What flower-supernode sends with every Fleet request when it authenticates."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_ssh_private_key(Path(private_key_path).read_bytes(), password=None)
    stamp = dt.datetime.now(dt.timezone.utc).isoformat()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return {"flwr-public-key": base64.b64encode(pem).decode(), "flwr-timestamp": stamp,
            "flwr-signature": base64.b64encode(key.sign(stamp.encode(), ec.ECDSA(hashes.SHA256()))).decode()}


class _Upstream(BaseHTTPRequestHandler):
    """Stands in for the SuperLink behind the gateway: answers every POST with 200 at once."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *a):
        pass


def _slow_sender(port: int, ctx: ssl.SSLContext, source: str, request: bytes, drip: bytes | None,
                 out: list, limit_s: float = 20.0) -> None:
    """Connect from ``source`` over TLS, send ``request``, then one byte of ``drip`` every 0.2 s
    until the gateway answers or closes; ``out`` gets ``(first line of the answer or 'closed',
    seconds)``. Bounded by ``limit_s``."""
    t0 = time.monotonic()
    raw = socket.socket()
    try:
        raw.bind((source, 0))
        raw.settimeout(5)
        raw.connect(("127.0.0.1", port))
        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        s.sendall(request)
        s.settimeout(0.2)
        i = 0
        while time.monotonic() - t0 < limit_s:
            try:
                data = s.recv(4096)
            except socket.timeout:
                if drip is not None:
                    s.sendall(drip[i % len(drip):i % len(drip) + 1])
                    i += 1
                continue
            out.append((data.split(b"\r\n", 1)[0].decode() if data else "closed", time.monotonic() - t0))
            return
        out.append(("held", time.monotonic() - t0))
    except (OSError, ssl.SSLError):
        out.append(("closed", time.monotonic() - t0))
    finally:
        raw.close()


def test_slow_senders_cannot_hold_the_gateway(pki):
    """Unauthenticated callers from four addresses send headers with Content-Length: 60000, then
    one body byte at a time. They get at most the unauthenticated pool (the rest 503 at once),
    are cut off with 408 once the minimum rate is missed, and meanwhile a request signed by the
    registered hospital is served at once; a caller sending its headers byte by byte is closed."""
    import httpx

    from xrayfed.server import gateway

    up = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    h1 = pki / "hospitals" / "h1"
    port = free_port()
    # Small limits so the attack takes seconds: 8 slots, 4 per address, 4 for unsigned requests;
    # an unsigned 60000-byte body must arrive within 1 s + 60000 / 15000 B/s = 5 s.
    gw = gateway.FleetGateway("127.0.0.1", port, f"http://127.0.0.1:{up.server_address[1]}",
                              certfile=pki / "server.pem", keyfile=pki / "server.key", upstream_ca=pki / "ca.pem",
                              registered_keys=lambda: {public_key_fingerprint(h1 / "auth.pub")},
                              max_concurrent=8, max_per_client=4, max_unauthenticated_concurrent=4,
                              header_timeout_s=1.0, body_floor_s=1.0, min_rate=15000).start()
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    request = b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n"
    results: list = []
    threads = [threading.Thread(target=_slow_sender, args=(port, ctx, f"127.0.0.{2 + i % 4}", request, b"x" * 60000,
                                                           results)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while gw._active + gw.stats["busy"] < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gw._active + gw.stats["busy"] == 8  # every slow sender has reached the gateway
        # the registered hospital (e.g. activating) is served while the slow senders are in flight
        with httpx.Client(verify=ctx, base_url=f"https://127.0.0.1:{port}", timeout=10) as c:
            t0 = time.monotonic()
            r = c.post("/v1/fleet/activate-node", content=b"{}", headers=_signed_headers(h1 / "auth.key"))
            assert r.status_code == 200 and time.monotonic() - t0 < 5
            # unsigned requests share a pool that is full now
            assert c.post("/v1/fleet/activate-node", content=b"{}").status_code == 503
        for t in threads:
            t.join(30)
        # 4 refused at once (the unsigned pool is full), 4 cut off: 408 (or the connection
        # closed right after it), soon after the 5 s their 60000 bytes were allowed
        assert len(results) == 8 and sum(code == "HTTP/1.1 503 Service Unavailable" for code, _ in results) == 4
        cut = [(code, s) for code, s in results if "503" not in code]
        assert all(code in ("HTTP/1.1 408 Request Timeout", "closed") and s < 12 for code, s in cut), results
        deadline = time.monotonic() + 5  # the gateway frees a slot right after answering
        while gw._active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gw.stats["slow_body"] == 4 and gw._active == 0
        # the slots are free again: an unsigned small request passes
        with httpx.Client(verify=ctx, base_url=f"https://127.0.0.1:{port}", timeout=10) as c:
            assert c.post("/v1/fleet/activate-node", content=b"{}").status_code == 200
        # headers one byte at a time: the connection is closed after the header deadline (1 s)
        slow_headers: list = []
        _slow_sender(port, ctx, "127.0.0.2", b"P", request[1:], slow_headers)
        assert slow_headers[0][0] == "closed" and slow_headers[0][1] < 5, slow_headers
        assert gw.stats["slow_headers"] == 1
    finally:
        for t in threads:
            t.join(30)
        gw.stop()
        up.shutdown()
        up.server_close()


def test_slow_body_is_cut_off_with_authentication_off(pki):
    """Without hospital authentication every request is unsigned: the minimum rate applies to
    all of them (sizes and the shared pool stay as they are: anyone may be a hospital)."""
    from xrayfed.server import gateway

    up = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    port = free_port()
    gw = gateway.FleetGateway("127.0.0.1", port, f"http://127.0.0.1:{up.server_address[1]}",
                              certfile=pki / "server.pem", keyfile=pki / "server.key", upstream_ca=pki / "ca.pem",
                              body_floor_s=1.0, min_rate=30000).start()
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    out: list = []
    try:
        _slow_sender(port, ctx, "127.0.0.1",
                     b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n", b"x" * 60000,
                     out)
        assert out[0][0] in ("HTTP/1.1 408 Request Timeout", "closed") and out[0][1] < 10, out
        assert gw.stats["slow_body"] == 1
    finally:
        gw.stop()
        up.shutdown()
        up.server_close()


def test_idle_connections_do_not_keep_the_hospital_off_the_mpc_port(tmp_path, monkeypatch):
    """More idle connections than the handshake bound are opened to the crypto provider's MPC
    port first; the hospital's party connects last and is accepted at once, and the idle ones
    are closed. One more idle connection alone is closed after the pre-authentication time."""
    import torch

    from xrayfed.common.mpc import channel

    init_pki(tmp_path / "pki")
    pki = tmp_path / "pki"
    srv = channel.server_context(str(pki / "crypto-provider" / "tls.pem"), str(pki / "crypto-provider" / "tls.key"))
    cli = channel.client_context(str(pki / "ca.pem"))
    key = b"0123456789abcdef0123456789abcdef"
    monkeypatch.setattr(channel, "MAX_PENDING_HANDSHAKES", 4)
    monkeypatch.setattr(channel, "PREAUTH_TIMEOUT_S", 1.5)

    def accept(lsock, got):
        try:
            got["link"] = channel.accept_hospital(lsock, key, time.monotonic() + 20, tls=srv, timeout_s=10)
        except channel.LinkError as e:
            got["error"] = e

    # 1. idle connections first (plain TCP, and TLS that never sends the key), then the hospital
    lsock = channel.listen("127.0.0.1")
    port = lsock.getsockname()[1]
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(6)]
    idle += [cli.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                             server_hostname=channel.ROLE_NAME, do_handshake_on_connect=False) for _ in range(2)]
    got: dict = {}
    t = threading.Thread(target=accept, args=(lsock, got))
    t.start()
    link = None
    try:
        t0 = time.monotonic()
        link = channel.connect_provider("127.0.0.1", port, key, tls=cli, server_name=channel.ROLE_NAME, timeout_s=5)
        t.join(10)
        assert "link" in got and time.monotonic() - t0 < 5, got
        link.send_tensor(torch.arange(3))
        assert torch.equal(got["link"].recv_tensor_into(torch.zeros(3, dtype=torch.long)), torch.arange(3))
        for s in idle:  # every other connection was closed by the crypto provider
            s.settimeout(5)
            try:
                assert s.recv(1) == b""
            except (ConnectionResetError, ssl.SSLError, OSError):
                pass
    finally:
        t.join(10)
        for s in idle:
            s.close()
        if link is not None:
            link.close()
        if "link" in got:
            got["link"].close()
        lsock.close()
    # 2. a connection that completes TLS and then sends nothing is closed after PREAUTH_TIMEOUT_S
    lsock = channel.listen("127.0.0.1")
    got = {}
    t = threading.Thread(target=accept, args=(lsock, got))
    t.start()
    s = cli.wrap_socket(socket.create_connection(("127.0.0.1", lsock.getsockname()[1]), timeout=5),
                        server_hostname=channel.ROLE_NAME)
    try:
        s.settimeout(10)
        t0 = time.monotonic()
        try:
            assert s.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            pass
        assert time.monotonic() - t0 < 5
        link = channel.connect_provider("127.0.0.1", lsock.getsockname()[1], key, tls=cli,
                                        server_name=channel.ROLE_NAME, timeout_s=5)
        t.join(10)
        assert "link" in got
        link.close()
        got["link"].close()
    finally:
        s.close()
        t.join(25)
        lsock.close()


def test_oversized_request_is_refused_before_authentication(tmp_path):
    """A request larger than the biggest legitimate one (an Evaluate frame with this model's
    scan share) is refused by gRPC with RESOURCE_EXHAUSTED before the service reads it, 60 MB
    included; a legitimate call right after is served, and a legitimate-size Evaluate frame
    reaches the service (which then refuses it for what it is: no such session)."""
    import grpc
    import numpy as np
    import torch

    from xrayfed.client.inference.gate import AuditLog
    from xrayfed.client.inference.service import InferenceService, request_limit, start_grpc
    from xrayfed.common import rpc
    from xrayfed.common.checkpoint import Checkpoint, to_bytes
    from xrayfed.common.config import InferenceServiceConfig
    from xrayfed.common.model import build_model, default_model
    from xrayfed.common.mpc import shared_input_shape
    from xrayfed.common.prediction import TaskSpec
    from xrayfed.common.protocol.inference import EVALUATE, HEALTH, INFERENCE_SERVICE, MODEL_INFO, OPEN_SESSION
    from xrayfed.client.inference import tokens

    init_pki(tmp_path / "pki")
    pki = tmp_path / "pki"
    torch.manual_seed(0)
    spec = default_model(32, 1).model_copy(update={"width": 8, "depth": 2})
    ckpt = Checkpoint(model=spec, task=TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")), image_size=32,
                      state_dict=build_model(spec).state_dict())
    priv, pub = tokens.generate_key(tmp_path / "k.key")
    token = tokens.issue_token(tokens.load_private_key(priv), "PAT-1", int(time.time()) + 600)
    cfg = InferenceServiceConfig(audit_log=tmp_path / "audit.jsonl", allow_scans_without_patient_id=True)
    audit = AuditLog(cfg.audit_log)
    svc = InferenceService(cfg, ckpt, to_bytes(ckpt), None, tokens.load_public_keys([pub]), audit,
                           lambda request: {})
    limit = request_limit(ckpt)
    n = int(np.prod(shared_input_shape(spec, 32)))
    assert 8 * n < limit < 1 << 20  # the scan share fits; nothing near the old 64 MiB does
    server, port = start_grpc(svc, host="127.0.0.1", port=0, listen="127.0.0.1:0",
                              creds=rpc.server_credentials(pki / "inference" / "tls.pem", pki / "inference" / "tls.key",
                                                           "test"))
    ch = rpc.make_channel(f"127.0.0.1:{port}", ca_cert=pki / "inference" / "ca.pem", insecure=False)
    try:
        open_session = rpc.method(ch, INFERENCE_SERVICE, OPEN_SESSION)
        for size in (limit + 1, 60 << 20):  # just over the limit, and the 60 MB of the attack
            big = {"token": "x" * (size - len(rpc.dumps({"token": ""})))}
            assert len(rpc.dumps(big)) == size
            with pytest.raises(grpc.RpcError) as e:
                open_session(big, timeout=30)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        assert not audit.path.exists() or not audit.path.read_text().strip()  # no handler ran
        info = rpc.method(ch, INFERENCE_SERVICE, MODEL_INFO)({"token": token}, timeout=30)
        assert info["image_size"] == 32
        assert rpc.method(ch, INFERENCE_SERVICE, HEALTH)({}, timeout=30)["ok"]
        # a legitimate Evaluate frame (this model's share + seed) is under the limit
        frame = ({"token": token, "session_id": "0" * 32}, {"x": b"\0" * (8 * n), "seed": b"\0" * 16})
        with pytest.raises(grpc.RpcError) as e:
            rpc.method(ch, INFERENCE_SERVICE, EVALUATE)(frame, timeout=30)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "no such session" in e.value.details()
    finally:
        ch.close()
        server.stop(grace=None).wait(5)
        audit.close()


def _tls_server(cert: Path, key: Path, stop: threading.Event) -> tuple[socket.socket, threading.Thread]:
    """A TLS server on 127.0.0.1 that completes handshakes and closes (bounded by ``stop``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    lsock.settimeout(0.2)

    def serve():
        while not stop.is_set():
            try:
                raw, _ = lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            raw.settimeout(5)
            try:
                ctx.wrap_socket(raw, server_side=True).close()
            except (OSError, ssl.SSLError):
                raw.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return lsock, t


def test_hospital_with_another_ca_gets_one_clear_line_at_once(tmp_path, capsys):
    """A hospital whose --ca-cert is another federation's CA: `xrayfed client` stops before
    starting its SuperNode with one line naming that CA file (it used to retry for minutes)."""
    from xrayfed.client.supernode import check_server_certificate
    from xrayfed.common import cli

    init_pki(tmp_path / "ours", hospitals=["h1"])
    init_pki(tmp_path / "other")
    ours, other = tmp_path / "ours" / "hospitals" / "h1" / "ca.pem", tmp_path / "other" / "ca.pem"
    stop = threading.Event()
    lsock, t = _tls_server(tmp_path / "ours" / "server.pem", tmp_path / "ours" / "server.key", stop)
    server = f"127.0.0.1:{lsock.getsockname()[1]}"
    try:
        assert check_server_certificate(server, ours) is True
        with pytest.raises(UserError) as e:
            check_server_certificate(server, other)
        msg = str(e.value)
        assert str(other) in msg and "not signed by this CA" in msg and "\n" not in msg
        # the command itself: one line, before anything else (the data folder does not even exist)
        t0 = time.monotonic()
        rc = cli.main(["client", "--server", server, "--ca-cert", str(other), "--name", "h1",
                       "--data", str(tmp_path / "no-data"), "--state-dir", str(tmp_path / "state")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and time.monotonic() - t0 < 15
        assert err.count("\n") == 0 and err.startswith("xrayfed: error: --ca-cert ") and str(other) in err, err
        assert "does not verify" in err and "not signed by this CA" in err
        # a server that is not listening yet is not an error: the SuperNode keeps trying
        assert check_server_certificate(f"127.0.0.1:{free_port()}", ours, timeout=5) is False
    finally:
        stop.set()
        lsock.close()
        t.join(5)
