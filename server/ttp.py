"""``xrayfed serve-ttp``: the crypto provider — CrypTen's trusted third party (TTP).

Run by someone who does not collude with the hospital (e.g. the federation operator). It deals
the correlated randomness (Beaver triples, wrap counts, random bits) of each encrypted
prediction and never sees a scan, a weight or a result: it only generates random values and
sends them; nothing the parties compute is sent to it. If it colluded with the hospital, the
two together could open the patient's scan — that is the non-collusion assumption.

gRPC API (JSON messages, see :mod:`xrayfed.common.rpc`), service ``xrayfed.ttp.v1.TTP``:

* ``StartSession {session_id, host, port, timeout_s}`` → ``{"ok": true}``: joins the session's
  rendezvous ``host:port`` as rank 2 from a warm pre-forked worker and serves until the
  hospital's party (rank 0) ends the session, the connection breaks or ``timeout_s`` passes.
  Only the hospital's inference service may call it: the request must carry the shared secret
  (metadata ``x-xrayfed-ttp-secret``, compared in constant time) over TLS.
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
from xrayfed.common.config import TTPConfig, load_config
from xrayfed.common.logs import RPC_EXPOSED, warn_insecure
from xrayfed.common.mpc import WorkerPool
from xrayfed.common.mpc.sessions import SessionTable
from xrayfed.common.protocol.inference import (
    HEALTH,
    START_SESSION,
    TTP_SECRET_HEADER,
    TTP_SERVICE,
)
from xrayfed.common.security.shared_secret import read_secret

log = logging.getLogger("xrayfed.ttp")
SESSION_ID_RE = re.compile(r"^[0-9a-f]{32}$")


class TTPService:
    def __init__(self, cfg, pool, secret: bytes | None) -> None:
        self.cfg = cfg
        self.secret = secret
        self.sessions = SessionTable(pool, cfg.max_sessions, name="ttp")

    # ----------------------------------------------------------------- handlers
    def _authorise(self, context) -> None:
        import grpc

        if self.secret is None:
            return
        got = dict(context.invocation_metadata()).get(TTP_SECRET_HEADER, "")
        if not hmac.compare_digest(got.encode(), self.secret):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "TTP: missing or wrong service secret")

    def health(self, request: dict, context) -> dict:
        self._authorise(context)
        return {"ok": True, "sessions": len(self.sessions)}

    def start_session(self, request: dict, context) -> dict:
        import grpc


        self._authorise(context)
        sid = request.get("session_id")
        host = request.get("host")
        port = request.get("port")
        timeout_s = request.get("timeout_s", self.cfg.session_timeout_s)
        if not (isinstance(sid, str) and SESSION_ID_RE.match(sid)):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id: 32 hex digits expected")
        if not (isinstance(host, str) and 0 < len(host) < 256 and isinstance(port, int) and 0 < port < 65536):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "host/port: a rendezvous address is required")
        if self.cfg.allowed_rendezvous and host not in self.cfg.allowed_rendezvous:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"rendezvous host {host!r} is not allowed")
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "timeout_s must be a positive number")
        timeout_s = min(float(timeout_s), self.cfg.session_timeout_s)
        if not self.sessions.reserve():
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "TTP is busy (max_sessions reached)")
        handed_off = False
        proc = conn = None
        try:
            params = mpc.SessionParams(session_id=sid, host=host, port=port, timeout_s=timeout_s,
                                       threads=self.cfg.threads_per_party)
            deadline = time.monotonic() + timeout_s
            proc, conn = self.sessions.start(mpc.ttp_worker, params.to_dict())
            kind, payload = mpc.wait_message(conn, ("connected",), min(deadline, time.monotonic() + 30))
            if kind != "connected":
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              f"TTP could not join the session rendezvous ({kind}{': ' + payload if payload else ''})")
            tag = mpc.session_tag(sid)

            def on_end(outcome, info, t0=time.monotonic()):
                log.info("session %s ended: %s (%.2fs)", tag, outcome, time.monotonic() - t0)

            self.sessions.hand_off(sid, tag, proc, conn, deadline, on_end)
            handed_off = True
            return {"ok": True}
        finally:
            if not handed_off:
                self.sessions.discard(proc, conn)
                self.sessions.release()

    def stop_all(self) -> None:
        self.sessions.stop_all()


def _cmd_serve(args: argparse.Namespace) -> int:
    cfg = load_config(TTPConfig, args.config, {
        "listen": args.listen, "tls.cert": str(args.cert) if args.cert else None,
        "tls.key": str(args.key) if args.key else None, "secret": str(args.secret) if args.secret else None,
        "session_timeout_s": args.session_timeout, "max_sessions": args.max_sessions,
        "allowed_rendezvous": args.allow_rendezvous, "tls.insecure": True if args.insecure else None,
    })
    return serve(cfg)


def serve(cfg, ready: threading.Event | None = None, stop: threading.Event | None = None) -> int:
    host, port = parse_hostport(cfg.listen, "listen")
    secret = read_secret(cfg.secret, "TTP secret (--secret)")
    creds = None if cfg.tls.insecure else rpc.server_credentials(cfg.tls.cert, cfg.tls.key, "serve-ttp")
    if cfg.tls.insecure:
        warn_insecure("serve-ttp", RPC_EXPOSED)
    if secret is None:
        print("xrayfed: WARNING: serve-ttp without --secret: anyone who reaches it can start TTP sessions",
              file=sys.stderr, flush=True)

    # Warm the zygote (imports torch + CrypTen once) BEFORE any gRPC thread exists.

    pool = WorkerPool()
    warm_s = pool.warm()
    svc = TTPService(cfg, pool, secret)
    server, bound = rpc.start_server(TTP_SERVICE, {START_SESSION: svc.start_session, HEALTH: svc.health},
                                     host=host, port=port, creds=creds, max_workers=cfg.max_sessions + 4,
                                     what="serve-ttp", listen=cfg.listen)
    print(f"xrayfed serve-ttp: listening on {host}:{bound} (workers warm in {warm_s:.1f}s, "
          f"max {cfg.max_sessions} sessions, timeout {cfg.session_timeout_s:.0f}s)", flush=True)
    try:
        return rpc.run_until_stopped(server, svc.stop_all, ready, stop)
    finally:
        pool.close()
