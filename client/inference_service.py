"""``xrayfed serve-inference`` and ``xrayfed issue-token``: the hospital's encrypted-inference service.

The service holds the federated global model and answers prediction requests without ever
seeing the patient's scan or the prediction: each request runs one MPC session between a party
process of this service (rank 0, holds the weights) and the crypto provider's party (rank 1,
``serve-ttp``), linked by TLS; the patient shares its scan, deals the randomness and adds the
two output shares (:mod:`xrayfed.common.mpc.dealer`).

gRPC API (:mod:`xrayfed.common.rpc`), service ``xrayfed.inference.v1.Inference``:

* ``ModelInfo {token}`` → what the patient needs: ``{model (architecture), image_size, task,
  model_version, threshold, mpc: {tape, tape_digest, input_pool, scattering, scale_bits}}`` — never weights.
* ``OpenSession {token, scan: {image_size, channels, dicom_patient_id|null}}`` → ``{session_id,
  crypto_provider: {address, server_name}, timeout_s, ...ModelInfo}``. The service
  1. verifies the token (Ed25519 signature by a trusted key, audience, expiry) and, for a DICOM
     scan, that the PatientID the patient's software reports is the token's subject;
  2. checks the scan metadata against the model (size, channels) and the caller's admission;
  3. asks the crypto provider to start its party (``StartSession``: session id, a fresh
     hospital key, architecture, tape);
  4. forks its party from a warm zygote (:class:`xrayfed.common.mpc.WorkerPool`), which
     connects to the crypto provider's party over TLS and shares the weights.
  A watcher thread tears the session down when it ends, when the patient's input has not come
  within ``join_timeout_s`` or after ``session_timeout_s``; the service keeps serving.
* ``Evaluate`` (binary frame) ``{token, session_id} + {x, seed}`` → ``{shape} + {y}``: the
  patient's share of its scan and its seed, for the session this token opened (once); answers
  this party's re-randomised share of the logits.

Audit log: one JSON line per request (``time, event, patient_id, claimed_patient_id, token_id,
identity_claim, model_version, outcome, reason, duration_s, session, peer``;
``claimed_patient_id`` is the unverified subject of a refused token; ``identity_claim`` says
whether the request carried the scan's patient identity — ``dicom_patient_id`` — or ``none``)
— never the scan, never the result (the service never has either), never the token itself or
the session id (``session`` is a hash of it).

One caller cannot hold the service (:class:`Admission`): at most ``max_sessions_per_token``
concurrent sessions per token and ``max_sessions_per_peer`` per IP address, at most
``predictions_per_token_per_hour`` per token and ``prediction_budget_per_token`` per token
ever (counted from the audit log, so a restart does not reset them; this also bounds model
extraction through the prediction API), and a session that nobody joins is torn down after
``join_timeout_s``. Revoked tokens (by ``jti``, ``revoked_tokens`` file) are refused. No request
may be larger than the largest legitimate one (:func:`request_limit`): gRPC refuses it before
any handler reads it, so unauthenticated callers cannot make the service buffer large messages.

Patient identity: the service never sees the scan, so it cannot prove that a scan belongs to
the token's patient. It enforces what it can: a DICOM scan's PatientID, as reported by the
patient's software, must be the token's subject; a scan without a PatientID (PNG/JPEG) is
refused unless ``allow_scans_without_patient_id`` is set. A modified patient program can
still lie about the PatientID: the token limits *who* can ask and how often, not *which*
scan they send.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hmac
import json
import logging
import os
import secrets
import sys
import threading
import time
from pathlib import Path

from xrayfed.common import mpc, rpc
from xrayfed.common.addresses import parse_hostport
from xrayfed.common.checkpoint import load_checkpoint, load_weights, to_bytes
from xrayfed.common.config import InferenceServiceConfig, load_config
from xrayfed.common.errors import UserError
from xrayfed.common.logs import RPC_EXPOSED, warn_insecure
from xrayfed.common.model import build_model
from xrayfed.common.mpc import WorkerPool, dealer
from xrayfed.common.mpc.sessions import SessionTable, answer_patient
from xrayfed.common.protocol.inference import (
    CRYPTO_PROVIDER_NAME,
    EVALUATE,
    HEALTH,
    INFERENCE_SERVICE,
    MODEL_INFO,
    OPEN_SESSION,
    START_SESSION,
    TTP_SECRET_HEADER,
    TTP_SERVICE,
)
from xrayfed.common.security import tokens
from xrayfed.common.security.shared_secret import read_secret
from xrayfed.common.security.tokens import (
    TokenError,
    check_dicom_patient_id,
    load_public_keys,
    peek_subject,
    verify_token,
)

log = logging.getLogger("xrayfed.inference")


# --------------------------------------------------------------------------- audit log
class AuditLog:
    """Append-only JSON-lines audit log (thread-safe; flushed and fsynced per line)."""

    FIELDS = ("time", "event", "patient_id", "claimed_patient_id", "token_id", "identity_claim", "model_version",
              "outcome", "reason", "duration_s", "session", "peer")

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.f = os.fdopen(fd, "a", encoding="utf-8")

    def write(self, **fields) -> None:
        rec = {k: fields.get(k) for k in self.FIELDS}
        rec["time"] = rec["time"] or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
        if rec["duration_s"] is not None:
            rec["duration_s"] = round(float(rec["duration_s"]), 3)
        line = json.dumps(rec, separators=(",", ":"), sort_keys=False)
        with self.lock:
            if self.f.closed:  # a session ending while the service shuts down
                log.warning("audit log closed; dropped: %s", line)
                return
            self.f.write(line + "\n")
            self.f.flush()
            os.fsync(self.f.fileno())

    def close(self) -> None:
        with self.lock:
            self.f.close()


# --------------------------------------------------------------------------- admission
def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string (``ipv4:1.2.3.4:555``, ``ipv6:[::1]:555``)."""
    kind, _, rest = str(peer).partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return str(peer)


class RevocationList:
    """Revoked token ids (``jti``), one per line (``#`` comments), re-read when the file changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path else None
        self._mtime: float | None = None
        self._ids: frozenset[str] = frozenset()
        if self.path is not None and not self.path.is_file():
            raise UserError(f"revoked_tokens: no file at {self.path} (create an empty one, or add ids with "
                            "`xrayfed issue-token --revoke`)")

    def __contains__(self, jti: str) -> bool:
        if self.path is None:
            return False
        try:
            m = self.path.stat().st_mtime_ns
        except OSError:  # a revocation list that disappears revokes everything: fail closed
            log.error("revocation list %s cannot be read: refusing every token", self.path)
            return True
        if m != self._mtime:
            ids = set()
            for line in self.path.read_text(encoding="utf-8").splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    ids.add(line)
            self._ids, self._mtime = frozenset(ids), m
        return jti in self._ids


def revoke_token(list_path: Path, token_or_jti: str) -> str:
    """Append a token id to a revocation list (from a token file, a token or a bare jti)."""
    text = token_or_jti.strip()
    p = Path(text)
    if len(text) < 256 and p.is_file():
        text = tokens.read_token_file(p)
    if text.startswith(tokens.PREFIX + "."):
        jti = tokens.peek_claims(text).get("jti")
        if not jti:
            raise UserError("--revoke: that token has no jti")
    else:
        jti = text
    if not jti or any(c.isspace() or c == "#" for c in jti):
        raise UserError(f"--revoke: {token_or_jti!r} is neither a token file, a token nor a token id")
    list_path = Path(list_path)
    list_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(list_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(jti + "\n")
        f.flush()
        os.fsync(f.fileno())
    return jti


class Admission:
    """Who may open a session now: per-token and per-peer concurrency, per-token rate and
    lifetime budget. Sessions opened before a restart count (read back from the audit log)."""

    HOUR = 3600.0

    def __init__(self, cfg, audit_path: Path | None = None) -> None:
        self.cfg = cfg
        self.lock = threading.Lock()
        self.by_token: dict[str, int] = {}
        self.by_peer: dict[str, int] = {}
        self.starts: dict[str, list[float]] = {}  # wall-clock starts per token (last hour kept)
        self.total: dict[str, int] = {}
        if audit_path is not None and Path(audit_path).is_file():
            self._replay(Path(audit_path))

    def _replay(self, path: Path) -> None:
        now = time.time()
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                r = json.loads(line)
                if r.get("event") != "predict" or r.get("outcome") in (None, "refused") or not r.get("token_id"):
                    continue
                jti = str(r["token_id"])
                self.total[jti] = self.total.get(jti, 0) + 1
                t = _dt.datetime.fromisoformat(str(r["time"])).timestamp()
                if now - t < self.HOUR:
                    self.starts.setdefault(jti, []).append(t)
            except (ValueError, TypeError, KeyError):
                continue

    def admit(self, jti: str, peer: str) -> tuple[str, str] | None:
        """Reserve a session for ``jti`` from ``peer``; None, or ``(reason, message)`` when refused."""
        c, now = self.cfg, time.time()
        with self.lock:
            if self.by_token.get(jti, 0) >= c.max_sessions_per_token:
                return "busy_token", (f"this token already has {self.by_token[jti]} session(s) open (at most "
                                      f"{c.max_sessions_per_token}); finish or wait for it")
            if self.by_peer.get(peer, 0) >= c.max_sessions_per_peer:
                return "busy_peer", (f"{self.by_peer[peer]} session(s) are already open from your address (at most "
                                     f"{c.max_sessions_per_peer}); try again shortly")
            if self.total.get(jti, 0) >= c.prediction_budget_per_token:
                return "budget_spent", (f"this token has used its {c.prediction_budget_per_token} predictions; ask "
                                        "the hospital for a new token")
            recent = [t for t in self.starts.get(jti, []) if now - t < self.HOUR]
            self.starts[jti] = recent
            if len(recent) >= c.predictions_per_token_per_hour:
                wait = int(self.HOUR - (now - min(recent))) + 1
                return "rate_limited", (f"at most {c.predictions_per_token_per_hour} predictions per hour per token; "
                                        f"try again in {wait} s")
            self.by_token[jti] = self.by_token.get(jti, 0) + 1
            self.by_peer[peer] = self.by_peer.get(peer, 0) + 1
            recent.append(now)
            self.total[jti] = self.total.get(jti, 0) + 1
        return None

    def release(self, jti: str, peer: str, *, counted: bool = True) -> None:
        """End a reservation; ``counted = False`` when no session was started (gives the
        prediction back)."""
        with self.lock:
            for d, k in ((self.by_token, jti), (self.by_peer, peer)):
                n = d.get(k, 0) - 1
                if n > 0:
                    d[k] = n
                else:
                    d.pop(k, None)
            if not counted:
                self.total[jti] = max(0, self.total.get(jti, 0) - 1)
                if self.starts.get(jti):
                    self.starts[jti].pop()


# --------------------------------------------------------------------------- the service
def model_metadata(ckpt) -> dict:
    return {
        "model": ckpt.model.model_dump(mode="json"),
        "image_size": int(ckpt.image_size),
        "task": ckpt.task.to_dict(),
        "model_version": ckpt.model_version,
        "threshold": ckpt.threshold,
    }


class InferenceService:
    def __init__(self, cfg, ckpt, ckpt_bytes: bytes, pool, public_keys: dict, audit: AuditLog, ttp,
                 tape: list | None = None) -> None:
        self.cfg = cfg
        self.ckpt = ckpt
        self.ckpt_bytes = ckpt_bytes
        self.keys = public_keys
        self.audit = audit
        self.ttp = ttp  # callable(request dict) -> dict, raises UserError
        self.meta = model_metadata(ckpt)
        self.sessions = SessionTable(pool, cfg.max_sessions, name="session")
        self.tape = tape if tape is not None else mpc.record_tape(ckpt.model, ckpt.image_size)
        self.meta["mpc"] = {"tape": self.tape, "tape_digest": dealer.tape_digest(self.tape),
                            **mpc.front_of(ckpt.model), "scale_bits": dealer.SCALE_BITS}
        self.admission = Admission(cfg, getattr(audit, "path", None))
        self.revoked = RevocationList(cfg.revoked_tokens)

    # ----------------------------------------------------------------- helpers
    def _verify(self, request: dict, context, t0: float, event: str):
        import grpc


        token = request.get("token")
        try:
            if not isinstance(token, str):
                raise TokenError("malformed", "no token in the request")
            claims = verify_token(token, self.keys, audience=self.cfg.audience)
            if claims.jti in self.revoked:
                raise TokenError("revoked", "this token was revoked by the hospital; ask it for a new one")
            return claims
        except TokenError as e:
            self.audit.write(event=event, claimed_patient_id=peek_subject(token) if isinstance(token, str) else None,
                             model_version=self.meta["model_version"], outcome="refused", reason=e.reason,
                             duration_s=time.monotonic() - t0, peer=context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))

    def _refuse(self, context, code, message: str, *, claims, reason: str, t0: float, event="predict",
                identity_claim: str | None = None):
        self.audit.write(event=event, patient_id=claims.sub, token_id=claims.jti, identity_claim=identity_claim,
                         model_version=self.meta["model_version"], outcome="refused", reason=reason,
                         duration_s=time.monotonic() - t0, peer=context.peer())
        context.abort(code, message)

    # ----------------------------------------------------------------- handlers
    def model_info(self, request: dict, context) -> dict:
        self._verify(request, context, time.monotonic(), "model_info")
        return dict(self.meta)

    def open_session(self, request: dict, context) -> dict:
        import grpc


        t0 = time.monotonic()
        claims = self._verify(request, context, t0, "predict")
        scan = request.get("scan")
        if not isinstance(scan, dict):
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "request has no scan description",
                         claims=claims, reason="bad_request", t0=t0)
        dicom_id = scan.get("dicom_patient_id")
        if dicom_id is not None and not isinstance(dicom_id, str):
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "dicom_patient_id must be a string",
                         claims=claims, reason="bad_request", t0=t0)
        ident = "dicom_patient_id" if dicom_id is not None else "none"
        try:
            check_dicom_patient_id(claims, dicom_id)
        except TokenError as e:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, str(e), claims=claims, reason=e.reason, t0=t0,
                         identity_claim=ident)
        if dicom_id is None and not self.cfg.allow_scans_without_patient_id:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                         "this service only accepts scans that carry your patient identity (a DICOM file with "
                         "PatientID); PNG/JPEG scans are not accepted here (hospital setting "
                         "allow_scans_without_patient_id)", claims=claims, reason="no_identity_claim", t0=t0,
                         identity_claim=ident)
        size, chans = scan.get("image_size"), scan.get("channels")
        want_size, want_ch = int(self.ckpt.image_size), int(self.ckpt.model.in_channels)
        if size != want_size or chans != want_ch:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"scan is {chans} channel(s) x {size} px; this model takes {want_ch} channel(s) x "
                         f"{want_size} px (prepare the scan with the model's image_size)",
                         claims=claims, reason="bad_scan_shape", t0=t0)
        peer = context.peer()
        who = peer_host(peer)
        refused = self.admission.admit(claims.jti, who)
        if refused is not None:
            self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, refused[1], claims=claims, reason=refused[0],
                         t0=t0, identity_claim=ident)
        if not self.sessions.reserve():
            self.admission.release(claims.jti, who, counted=False)
            self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         "the inference service is busy (all MPC sessions in use); try again shortly",
                         claims=claims, reason="busy", t0=t0, identity_claim=ident)

        sid = secrets.token_hex(16)
        hospital_key = secrets.token_hex(16)
        tag = mpc.session_tag(sid)
        timeout_s = float(self.cfg.session_timeout_s)
        deadline = time.monotonic() + timeout_s
        join_deadline = time.monotonic() + float(self.cfg.join_timeout_s)
        params = mpc.SessionParams(session_id=sid, timeout_s=timeout_s, threads=self.cfg.threads_per_party)
        proc = conn = None
        handed_off = False
        try:
            try:
                at = self.ttp({"session_id": sid, "hospital_key": hospital_key, "model": self.meta["model"],
                               "image_size": self.meta["image_size"], "tape": self.tape, "timeout_s": timeout_s,
                               "join_timeout_s": float(self.cfg.join_timeout_s)})
                provider_at = (str(at["host"]), int(at["port"]))
            except (UserError, KeyError, TypeError, ValueError) as e:
                self.audit.write(event="predict", patient_id=claims.sub, token_id=claims.jti, identity_claim=ident,
                                 model_version=self.meta["model_version"], outcome="failed", reason="ttp_unavailable",
                                 duration_s=time.monotonic() - t0, session=tag, peer=peer)
                log.warning("session %s: crypto provider unavailable: %s", tag, e)
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              "the crypto provider is unavailable; try again later")
            proc, conn = self.sessions.start(mpc.model_owner_worker, params.to_dict(), self.ckpt_bytes, provider_at,
                                             hospital_key.encode(), self.tape,
                                             None if self.cfg.ttp_tls.ca_cert is None else str(self.cfg.ttp_tls.ca_cert),
                                             bool(self.cfg.ttp_tls.insecure))

            def on_end(outcome, info):
                self.admission.release(claims.jti, who)
                reason = None if outcome == "ok" else (info if isinstance(info, str) else outcome)
                self.audit.write(event="predict", patient_id=claims.sub, token_id=claims.jti, identity_claim=ident,
                                 model_version=self.meta["model_version"], outcome=outcome,
                                 reason=(reason or None) and str(reason)[:200],
                                 duration_s=time.monotonic() - t0, session=tag, peer=peer)
                log.info("session %s: %s in %.2fs", tag, outcome, time.monotonic() - t0)

            # meta: the token id that opened the session (Evaluate must come with the same token)
            self.sessions.hand_off(sid, tag, proc, conn, deadline, on_end, join_deadline=join_deadline,
                                   meta=claims.jti)
            handed_off = True
        except RuntimeError as e:
            log.error("session %s: %s", tag, e)
            self.audit.write(event="predict", patient_id=claims.sub, token_id=claims.jti, identity_claim=ident,
                             model_version=self.meta["model_version"], outcome="failed", reason="worker_start",
                             duration_s=time.monotonic() - t0, session=tag, peer=peer)
            context.abort(grpc.StatusCode.INTERNAL, "the service could not start an MPC session")
        finally:
            if not handed_off:
                self.sessions.discard(proc, conn)
                self.sessions.release()
                self.admission.release(claims.jti, who)
        log.info("session %s opened for a patient", tag)
        return {
            "session_id": sid,
            "crypto_provider": {"address": self.cfg.ttp_public or self.cfg.ttp, "server_name": CRYPTO_PROVIDER_NAME},
            "timeout_s": timeout_s,
            **self.meta,
        }

    def evaluate(self, request: tuple, context) -> tuple:
        """The patient's share of the scan and its seed in; this party's share of the logits out."""
        import grpc

        header, blobs = request
        t0 = time.monotonic()
        claims = self._verify(header, context, t0, "evaluate")
        sid = header.get("session_id")
        ex = self.sessions.exchange(sid) if isinstance(sid, str) else None
        if ex is None or not hmac.compare_digest(str(ex.meta), claims.jti):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no such session for this token (it ended, or the id "
                                                             "is wrong)")
        return answer_patient(ex, context, blobs, mpc.shared_input_shape(self.ckpt.model, self.ckpt.image_size), None)

    def health(self, request: dict, context) -> dict:
        return {"ok": True, "sessions": len(self.sessions), "model_version": self.meta["model_version"]}

    def stop_all(self) -> None:
        self.sessions.stop_all()


def ttp_caller(cfg):
    """A function that asks the TTP service to join a session (UserError when it cannot)."""
    secret = read_secret(cfg.ttp_secret, "TTP secret (--ttp-secret)")
    if cfg.ttp_tls.insecure:
        warn_insecure("serve-inference → TTP", RPC_EXPOSED)
    channel = rpc.make_channel(cfg.ttp, ca_cert=cfg.ttp_tls.ca_cert, insecure=cfg.ttp_tls.insecure,
                               server_name=CRYPTO_PROVIDER_NAME)
    stub = rpc.method(channel, TTP_SERVICE, START_SESSION)
    metadata = ((TTP_SECRET_HEADER, secret.decode()),) if secret else None

    def call(request: dict) -> dict:
        return rpc.call(stub, request, timeout=35.0, what="crypto provider", target=cfg.ttp, metadata=metadata)

    return call


def check_model(ckpt, *, crypten: bool = True) -> None:
    """Refuse a checkpoint that cannot be served under MPC, with one clear line.

    First without CrypTen (fast, before anything starts): the architecture must be XrayNet, the
    outputs must fit the task and the weights must match the architecture. Then (``crypten``)
    the encrypted model is built from the same layer plan and the weights are loaded and
    verified through the CrypTen back end.
    """
    what = f"checkpoint (model {ckpt.model_version})"
    if ckpt.model.arch != "xraynet":
        raise UserError(f"{what}: architecture {ckpt.model.arch!r} cannot run under MPC (GroupNorm has no CrypTen "
                        "implementation); encrypted inference serves 'xraynet' models")
    if ckpt.model.num_outputs != ckpt.task.num_outputs:
        raise UserError(f"{what}: the model has {ckpt.model.num_outputs} outputs but the {ckpt.task.kind} task with "
                        f"{len(ckpt.task.class_names)} classes needs {ckpt.task.num_outputs}")
    load_weights(build_model(ckpt.model), ckpt.state_dict, what=what)
    if crypten:
        from xrayfed.common import mpc

        cmodel = mpc.build_crypten_model(ckpt.model)
        mpc.load_crypten_weights(cmodel, ckpt.model, ckpt.state_dict, what=what)


def request_limit(ckpt) -> int:
    """The largest request the inference service accepts, in bytes: an ``Evaluate`` frame with the
    patient's int64 share of the scan for this model (after its public first layer) and its seed,
    plus ``rpc.REQUEST_OVERHEAD`` for the token and the rest (the JSON requests are far smaller).
    gRPC refuses anything larger (RESOURCE_EXHAUSTED) before a handler sees it, so an
    unauthenticated caller cannot make the service buffer more than this per request."""
    import numpy as np

    from xrayfed.common.mpc.dealer import SEED_BYTES

    shape = mpc.shared_input_shape(ckpt.model, ckpt.image_size)
    return 8 * int(np.prod(shape)) + SEED_BYTES + rpc.REQUEST_OVERHEAD


def start_grpc(svc: InferenceService, *, host: str, port: int, creds, listen: str):
    """The service's gRPC server: requests no larger than :func:`request_limit`, at most
    ``max_sessions + 8`` handled at once and twice that many in progress or queued (more are
    refused with RESOURCE_EXHAUSTED). Returns ``(server, bound_port)``."""
    workers = svc.cfg.max_sessions + 8
    return rpc.start_server(
        INFERENCE_SERVICE, {MODEL_INFO: svc.model_info, OPEN_SESSION: svc.open_session, EVALUATE: svc.evaluate,
                            HEALTH: svc.health},
        host=host, port=port, creds=creds, max_workers=workers, what="serve-inference", listen=listen,
        max_request=request_limit(svc.ckpt), max_concurrent_rpcs=2 * workers)


def serve(cfg, ready: threading.Event | None = None, stop: threading.Event | None = None) -> int:
    host, port = parse_hostport(cfg.listen, "listen")
    if cfg.model is None:
        raise UserError("serve-inference: --model CHECKPOINT is required")
    ckpt = load_checkpoint(cfg.model)
    check_model(ckpt, crypten=False)
    keys = load_public_keys(cfg.token_keys)
    creds = None if cfg.tls.insecure else rpc.server_credentials(cfg.tls.cert, cfg.tls.key, "serve-inference")
    if cfg.tls.insecure:
        warn_insecure("serve-inference", RPC_EXPOSED)
    ttp = ttp_caller(cfg)

    # Warm the zygote (torch + CrypTen imported once) BEFORE any gRPC thread exists; then check
    # the checkpoint with the CrypTen back end (imports CrypTen here too).

    pool = WorkerPool()
    warm_s = pool.warm()
    check_model(ckpt)
    audit = AuditLog(cfg.audit_log)

    svc = InferenceService(cfg, ckpt, to_bytes(ckpt), pool, keys, audit, ttp)
    server, bound = start_grpc(svc, host=host, port=port, creds=creds, listen=cfg.listen)
    print(f"xrayfed serve-inference: listening on {host}:{bound}; model {ckpt.model_version} "
          f"({ckpt.task.kind}, {len(ckpt.task.class_names)} classes, {ckpt.image_size} px); "
          f"TTP {cfg.ttp}; workers warm in {warm_s:.1f}s", flush=True)
    try:
        return rpc.run_until_stopped(server, svc.stop_all, ready, stop)
    finally:
        audit.close()
        pool.close()


def _cmd_serve(args: argparse.Namespace) -> int:
    def s(v):
        return str(v) if v is not None else None

    cfg = load_config(InferenceServiceConfig, args.config, {
        "model": s(args.model), "listen": args.listen,
        "token_keys": [str(k) for k in args.token_key] if args.token_key else None,
        "audience": args.audience, "tls.cert": s(args.cert), "tls.key": s(args.key), "ttp": args.ttp,
        "ttp_tls.ca_cert": s(args.ttp_ca), "ttp_secret": s(args.ttp_secret), "ttp_public": args.ttp_public,
        "session_timeout_s": args.session_timeout, "max_sessions": args.max_sessions,
        "audit_log": s(args.audit_log), "tls.insecure": True if args.insecure else None,
        "max_sessions_per_token": args.max_sessions_per_token, "max_sessions_per_peer": args.max_sessions_per_peer,
        "join_timeout_s": args.join_timeout, "predictions_per_token_per_hour": args.rate_per_hour,
        "prediction_budget_per_token": args.budget_per_token, "revoked_tokens": s(args.revoked_tokens),
        "allow_scans_without_patient_id": args.allow_scans_without_patient_id,
        "ttp_tls.insecure": True if args.insecure else None,
    })
    return serve(cfg)


def _cmd_issue(args: argparse.Namespace) -> int:
    if args.revoke:
        if args.revocation_list is None:
            raise UserError("issue-token --revoke: give --revocation-list FILE (the service's revoked_tokens)")
        jti = revoke_token(args.revocation_list, args.revoke)
        print(f"token {jti} revoked: added to {args.revocation_list} (serve-inference re-reads it)")
        return 0
    if args.key is None:
        raise UserError("issue-token: --key KEY is required (the hospital's Ed25519 signing key)")
    if args.init_key:
        priv, pub = tokens.generate_key(args.key, force=args.force)
        print(f"signing key: {priv} (keep secret, mode 0600)\npublic key:  {pub} (give to serve-inference --token-key)")
        return 0
    if not args.patient_id:
        raise UserError("issue-token: --patient-id is required")
    key = tokens.load_private_key(args.key)
    exp = tokens.parse_expires(args.expires)
    tok = tokens.issue_token(key, args.patient_id, exp, issuer=args.issuer or tokens.DEFAULT_ISSUER,
                             audience=args.audience or tokens.DEFAULT_AUDIENCE)
    when = _dt.datetime.fromtimestamp(exp, _dt.timezone.utc).isoformat(timespec="seconds")
    if args.out:
        from xrayfed.common.files import atomic_write

        atomic_write(args.out, (tok + "\n").encode(), mode=0o600)
        print(f"token for patient {args.patient_id!r} (expires {when}, id {tokens.peek_claims(tok)['jti']}) "
              f"written to {args.out}", file=sys.stderr)
    else:
        print(tok)
        print(f"token for patient {args.patient_id!r} expires {when} (id {tokens.peek_claims(tok)['jti']})",
              file=sys.stderr)
    return 0
