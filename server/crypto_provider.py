"""``xrayfed serve-crypto-provider``: the crypto provider — the second computing party of every
encrypted prediction.

Run by someone who does not collude with the hospital (e.g. the federation operator). Per
session its party (rank 1) holds a random share of the model's weights and of the patient's
scan, computes the encrypted forward pass together with the hospital's party over one TLS link,
and returns its share of the logits to the patient, re-randomised. It never holds a plaintext
scan, weight or result. If it colluded with the hospital, the two together could open the
patient's scan; with the patient, the weights — that is the non-collusion assumption. (It is no
trusted third party: the patient deals the correlated randomness, :mod:`xrayfed.common.mpc.dealer`.)

gRPC API (:mod:`xrayfed.common.rpc`), service ``xrayfed.crypto_provider.v1.CryptoProvider``
(:data:`xrayfed.common.protocol.inference.CRYPTO_PROVIDER_SERVICE`):

* ``StartSession {session_id, hospital_key, model, image_size, tape, timeout_s,
  join_timeout_s}`` → ``{host, port}``: only the hospital's inference service may call it (the
  shared secret in metadata ``x-xrayfed-crypto-provider-secret``, compared in constant time, over TLS). A
  warm pre-forked party listens on ``mpc_host`` (port picked by the OS) for the one TLS
  connection that proves ``hospital_key``.
* ``Evaluate`` (the patient; binary frame) ``{session_id} + {x, seed, corrections}`` → ``{shape}
  + {y}``: the session id is the patient's capability (the hospital gave it to the patient and to
  this service only, both over TLS); a session accepts one input.
* ``Health {}`` → ``{"ok": true, "sessions": n}``.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import re
import sys
import threading
import time

from xrayfed.common import mpc, rpc
from xrayfed.common.addresses import parse_hostport
from xrayfed.common.config import CryptoProviderConfig, load_config
from xrayfed.common.logs import RPC_EXPOSED, warn_insecure
from xrayfed.common.modelspec import ModelSpec
from xrayfed.common.mpc import WorkerPool, dealer
from xrayfed.common.mpc.sessions import SessionTable, answer_patient
from xrayfed.common.protocol.inference import (
    CRYPTO_PROVIDER_SECRET_HEADER,
    CRYPTO_PROVIDER_SERVICE,
    EVALUATE,
    HEALTH,
    START_SESSION,
)
from xrayfed.common.security.shared_secret import read_secret

log = logging.getLogger("xrayfed.crypto_provider")
SESSION_ID_RE = re.compile(r"^[0-9a-f]{32}$")


class CryptoProviderService:
    def __init__(self, cfg, pool, secret: bytes | None) -> None:
        self.cfg = cfg
        self.secret = secret
        self.sessions = SessionTable(pool, cfg.max_sessions, name="crypto-provider")

    # ----------------------------------------------------------------- handlers
    def _authorise(self, context) -> None:
        import grpc

        if self.secret is None:
            return
        got = dict(context.invocation_metadata()).get(CRYPTO_PROVIDER_SECRET_HEADER, "")
        if not hmac.compare_digest(got.encode(), self.secret):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "crypto provider: missing or wrong service secret")

    def health(self, request: dict, context) -> dict:
        self._authorise(context)
        return {"ok": True, "sessions": len(self.sessions)}

    def start_session(self, request: dict, context) -> dict:
        import grpc

        self._authorise(context)
        sid = request.get("session_id")
        key = request.get("hospital_key")
        timeout_s = request.get("timeout_s", self.cfg.session_timeout_s)
        join_s = request.get("join_timeout_s", 30.0)
        if not (isinstance(sid, str) and SESSION_ID_RE.match(sid)):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id: 32 hex digits expected")
        if not (isinstance(key, str) and SESSION_ID_RE.match(key)):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "hospital_key: 32 hex digits expected")
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0 or not isinstance(join_s, (int, float)):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "timeout_s must be a positive number")
        try:
            spec = ModelSpec(**request.get("model", {}))
            size = int(request.get("image_size"))
            tape = dealer.check_tape(request.get("tape"))
        except Exception as e:  # noqa: BLE001 - one line back to the hospital
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model/tape: {type(e).__name__}")
        timeout_s = min(float(timeout_s), self.cfg.session_timeout_s)
        if not self.sessions.reserve():
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the crypto provider is busy (max_sessions reached)")
        handed_off = False
        proc = conn = None
        try:
            params = mpc.SessionParams(session_id=sid, timeout_s=timeout_s, threads=self.cfg.threads_per_party)
            deadline = time.monotonic() + timeout_s
            join_deadline = time.monotonic() + min(float(join_s), timeout_s)
            cert = None if self.cfg.tls.insecure else str(self.cfg.tls.cert)
            tkey = None if self.cfg.tls.insecure else str(self.cfg.tls.key)
            proc, conn = self.sessions.start(mpc.provider_worker, params.to_dict(), spec.model_dump(), size, tape,
                                             key.encode(), self.cfg.mpc_host, cert, tkey, float(join_s))
            kind, port = mpc.wait_message(conn, ("listening",), min(deadline, time.monotonic() + 30))
            if kind != "listening":
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              f"the crypto provider's party did not start ({kind}{': ' + port if port else ''})")
            tag = mpc.session_tag(sid)

            def on_end(outcome, info, t0=time.monotonic()):
                log.info("session %s ended: %s (%.2fs)", tag, outcome, time.monotonic() - t0)

            self.sessions.hand_off(sid, tag, proc, conn, deadline, on_end, join_deadline=join_deadline,
                                   meta=(mpc.shared_input_shape(spec, size), dealer.correction_sizes(tape)))
            handed_off = True
            return {"host": self.cfg.mpc_host, "port": int(port)}
        finally:
            if not handed_off:
                self.sessions.discard(proc, conn)
                self.sessions.release()

    def evaluate(self, request: tuple, context) -> tuple:
        import grpc

        header, blobs = request
        sid = header.get("session_id")
        ex = self.sessions.exchange(sid) if isinstance(sid, str) and SESSION_ID_RE.match(sid) else None
        if ex is None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no such session (it ended, or the id is wrong)")
        shape, corrections = ex.meta
        return answer_patient(ex, context, blobs, shape, corrections)

    def stop_all(self) -> None:
        self.sessions.stop_all()


def serve_cmd(args: argparse.Namespace) -> int:
    cfg = load_config(CryptoProviderConfig, args.config, {
        "listen": args.listen, "tls.cert": str(args.cert) if args.cert else None,
        "tls.key": str(args.key) if args.key else None, "secret": str(args.secret) if args.secret else None,
        "session_timeout_s": args.session_timeout, "max_sessions": args.max_sessions,
        "mpc_host": args.mpc_host, "tls.insecure": True if args.insecure else None,
    })
    return serve(cfg)


def serve(cfg, ready: threading.Event | None = None, stop: threading.Event | None = None) -> int:
    host, port = parse_hostport(cfg.listen, "listen")
    secret = read_secret(cfg.secret, "crypto provider secret (--secret)")
    creds = None if cfg.tls.insecure else rpc.server_credentials(cfg.tls.cert, cfg.tls.key, "serve-crypto-provider")
    if cfg.tls.insecure:
        warn_insecure("serve-crypto-provider", RPC_EXPOSED)
    if secret is None:
        print("xrayfed: WARNING: serve-crypto-provider without --secret: anyone who reaches it can start sessions",
              file=sys.stderr, flush=True)

    # Warm the zygote (imports torch + CrypTen once) BEFORE any gRPC thread exists.
    pool = WorkerPool()
    warm_s = pool.warm()
    svc = CryptoProviderService(cfg, pool, secret)
    handlers = {START_SESSION: svc.start_session, EVALUATE: svc.evaluate, HEALTH: svc.health}
    server, bound = rpc.start_server(CRYPTO_PROVIDER_SERVICE, handlers,
                                     host=host, port=port, creds=creds, max_workers=2 * cfg.max_sessions + 4,
                                     what="serve-crypto-provider", listen=cfg.listen)
    print(f"xrayfed serve-crypto-provider: listening on {host}:{bound}, MPC party links on {cfg.mpc_host} (workers "
          f"warm in {warm_s:.1f}s, max {cfg.max_sessions} sessions, timeout {cfg.session_timeout_s:.0f}s)", flush=True)
    try:
        return rpc.run_until_stopped(server, svc.stop_all, ready, stop)
    finally:
        pool.close()
