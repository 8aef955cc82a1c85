"""The gRPC service of the hospital's encrypted-inference service (``xrayfed serve-inference``).

The service holds the federated global model and answers prediction requests without ever
seeing the patient's scan or the prediction: each request runs one MPC session between a party
process of this service (rank 0, holds the weights) and the crypto provider's party (rank 1,
``serve-crypto-provider``), linked by TLS; the patient shares its scan, deals the randomness and
adds the two output shares (:mod:`xrayfed.common.mpc.dealer`). Who may ask, how often, and the
audit log are the gate's (:mod:`xrayfed.client.inference.gate`); starting the service from its
config is :mod:`xrayfed.client.inference.cli`.

gRPC API (:mod:`xrayfed.common.rpc`), service ``xrayfed.inference.v1.Inference``:

* ``ModelInfo {token}`` → what the patient needs: ``{model (architecture), image_size, task,
  model_version, threshold, performance, mpc: {tape, tape_digest, input_pool, scattering, scale_bits}}``
  — never weights. ``performance``: the checkpoint's measured sensitivity/specificity on held-out
  scans (``null``: not measured), told to the patient with the result.
* ``OpenSession {token, scan: {image_size, channels, dicom_patient_id|null}}`` → ``{session_id,
  crypto_provider: {address, server_name}, timeout_s, ...ModelInfo}``. The service
  1. verifies the token (Ed25519 signature by a trusted key, audience, expiry, not revoked) and,
     for a DICOM scan, that the PatientID the patient's software reports is the token's subject;
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

No request may be larger than the largest legitimate one (:func:`request_limit`): gRPC refuses
it before any handler reads it, so unauthenticated callers cannot make the service buffer large
messages.

Patient identity: the service never sees the scan, so it cannot prove that a scan belongs to
the token's patient. It enforces what it can: a DICOM scan's PatientID, as reported by the
patient's software, must be the token's subject; a scan without a PatientID (PNG/JPEG) is
refused unless ``allow_scans_without_patient_id`` is set. A modified patient program can
still lie about the PatientID: the token limits *who* can ask and how often, not *which*
scan they send.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time

from xrayfed.client.inference.gate import Admission, AuditLog, RevocationList, peer_host
from xrayfed.client.inference.tokens import TokenError, check_dicom_patient_id, peek_subject, verify_token
from xrayfed.common import mpc, rpc
from xrayfed.common.errors import UserError
from xrayfed.common.mpc import dealer
from xrayfed.common.mpc.dealer import SEED_BYTES
from xrayfed.common.mpc.sessions import SessionTable, answer_patient
from xrayfed.common.protocol.inference import (
    CRYPTO_PROVIDER_NAME,
    EVALUATE,
    HEALTH,
    INFERENCE_SERVICE,
    MODEL_INFO,
    OPEN_SESSION,
)

log = logging.getLogger("xrayfed.inference")


def model_metadata(ckpt) -> dict:
    """What ``ModelInfo`` tells a patient about the served checkpoint (never weights)."""
    return {
        "model": ckpt.model.model_dump(mode="json"),
        "image_size": int(ckpt.image_size),
        "task": ckpt.task.to_dict(),
        "model_version": ckpt.model_version,
        "threshold": ckpt.threshold,
        "performance": ckpt.performance,
    }


class InferenceService:
    def __init__(self, cfg, ckpt, ckpt_bytes: bytes, pool, public_keys: dict, audit: AuditLog, crypto_provider,
                 tape: list | None = None) -> None:
        self.cfg = cfg
        self.ckpt = ckpt
        self.ckpt_bytes = ckpt_bytes
        self.keys = public_keys
        self.audit = audit
        # callable(StartSession request) -> {host, port} of the crypto provider's party; raises UserError
        self.crypto_provider = crypto_provider
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
                at = self.crypto_provider({"session_id": sid, "hospital_key": hospital_key, "model": self.meta["model"],
                               "image_size": self.meta["image_size"], "tape": self.tape, "timeout_s": timeout_s,
                               "join_timeout_s": float(self.cfg.join_timeout_s)})
                provider_at = (str(at["host"]), int(at["port"]))
            except (UserError, KeyError, TypeError, ValueError) as e:
                self.audit.write(event="predict", patient_id=claims.sub, token_id=claims.jti, identity_claim=ident,
                                 model_version=self.meta["model_version"], outcome="failed",
                                 reason="crypto_provider_unavailable",
                                 duration_s=time.monotonic() - t0, session=tag, peer=peer)
                log.warning("session %s: crypto provider unavailable: %s", tag, e)
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              "the crypto provider is unavailable; try again later")
            proc, conn = self.sessions.start(mpc.model_owner_worker, params.to_dict(), self.ckpt_bytes, provider_at,
                                             hospital_key.encode(), self.tape,
                                             None if self.cfg.crypto_provider_tls.ca_cert is None
                                             else str(self.cfg.crypto_provider_tls.ca_cert),
                                             bool(self.cfg.crypto_provider_tls.insecure))

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
            "crypto_provider": {"address": self.cfg.crypto_provider_public or self.cfg.crypto_provider,
                                "server_name": CRYPTO_PROVIDER_NAME},
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


def request_limit(ckpt) -> int:
    """The largest request the inference service accepts, in bytes: an ``Evaluate`` frame with the
    patient's int64 share of the scan for this model (after its public first layer) and its seed,
    plus ``rpc.REQUEST_OVERHEAD`` for the token and the rest (the JSON requests are far smaller).
    gRPC refuses anything larger (RESOURCE_EXHAUSTED) before a handler sees it, so an
    unauthenticated caller cannot make the service buffer more than this per request."""
    import numpy as np

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

