"""Starting the hospital's encrypted-inference service, and the staff's token commands: the
handlers of ``xrayfed serve-inference`` and ``xrayfed token init-key | issue | revoke`` (their
arguments are in :mod:`xrayfed.client.commands`).

``serve-inference`` loads the checkpoint (decrypted with the at-rest key when it is encrypted:
``--atrest-key-file`` or the environment, :func:`xrayfed.common.security.atrest.load_checkpoint`) and refuses one that cannot run under MPC
(:func:`check_model`), connects to the crypto provider (:func:`crypto_provider_caller`), warms
the MPC worker pool before any gRPC thread exists, and serves
:class:`~xrayfed.client.inference.service.InferenceService` until stopped.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import threading

from xrayfed.client.inference import tokens
from xrayfed.client.inference.gate import AuditLog, revoke_token
from xrayfed.client.inference.service import InferenceService, start_grpc
from xrayfed.client.inference.tokens import load_public_keys
from xrayfed.common import mpc, rpc
from xrayfed.common.addresses import parse_hostport
from xrayfed.common.checkpoint import load_weights, to_bytes
from xrayfed.common.config import InferenceServiceConfig, load_config
from xrayfed.common.errors import UserError
from xrayfed.common.files import atomic_write
from xrayfed.common.logs import RPC_EXPOSED, warn_insecure
from xrayfed.common.model import build_model
from xrayfed.common.mpc import WorkerPool
from xrayfed.common.protocol.inference import (
    CRYPTO_PROVIDER_NAME,
    CRYPTO_PROVIDER_SECRET_HEADER,
    CRYPTO_PROVIDER_SERVICE,
    START_SESSION,
)
from xrayfed.common.security.atrest import load_checkpoint, load_key
from xrayfed.common.security.shared_secret import read_secret


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
        cmodel = mpc.build_crypten_model(ckpt.model)
        mpc.load_crypten_weights(cmodel, ckpt.model, ckpt.state_dict, what=what)


def crypto_provider_caller(cfg):
    """A function that asks the crypto provider to join a session (UserError when it cannot)."""
    secret = read_secret(cfg.crypto_provider_secret, "crypto provider secret (--crypto-provider-secret)")
    tls = cfg.crypto_provider_tls
    if tls.insecure:
        warn_insecure("serve-inference → crypto provider", RPC_EXPOSED)
    channel = rpc.make_channel(cfg.crypto_provider, ca_cert=tls.ca_cert, insecure=tls.insecure,
                               server_name=CRYPTO_PROVIDER_NAME)
    stub = rpc.method(channel, CRYPTO_PROVIDER_SERVICE, START_SESSION)
    metadata = ((CRYPTO_PROVIDER_SECRET_HEADER, secret.decode()),) if secret else None

    def call(request: dict) -> dict:
        return rpc.call(stub, request, timeout=35.0, what="crypto provider", target=cfg.crypto_provider,
                        metadata=metadata)

    return call


def serve(cfg, ready: threading.Event | None = None, stop: threading.Event | None = None, atrest_key=None) -> int:
    """Serve ``cfg.model`` until stopped; ``atrest_key`` decrypts a checkpoint encrypted at rest."""
    host, port = parse_hostport(cfg.listen, "listen")
    if cfg.model is None:
        raise UserError("serve-inference: --model CHECKPOINT is required")
    ckpt = load_checkpoint(cfg.model, atrest_key)
    check_model(ckpt, crypten=False)
    keys = load_public_keys(cfg.token_keys)
    creds = None if cfg.tls.insecure else rpc.server_credentials(cfg.tls.cert, cfg.tls.key, "serve-inference")
    if cfg.tls.insecure:
        warn_insecure("serve-inference", RPC_EXPOSED)
    crypto_provider = crypto_provider_caller(cfg)

    # Warm the zygote (torch + CrypTen imported once) BEFORE any gRPC thread exists; then check
    # the checkpoint with the CrypTen back end (imports CrypTen here too).

    pool = WorkerPool()
    warm_s = pool.warm()
    check_model(ckpt)
    audit = AuditLog(cfg.audit_log)

    svc = InferenceService(cfg, ckpt, to_bytes(ckpt), pool, keys, audit, crypto_provider)
    server, bound = start_grpc(svc, host=host, port=port, creds=creds, listen=cfg.listen)
    print(f"xrayfed serve-inference: listening on {host}:{bound}; model {ckpt.model_version} "
          f"({ckpt.task.kind}, {len(ckpt.task.class_names)} classes, {ckpt.image_size} px); "
          f"crypto provider {cfg.crypto_provider}; workers warm in {warm_s:.1f}s", flush=True)
    try:
        return rpc.run_until_stopped(server, svc.stop_all, ready, stop)
    finally:
        audit.close()
        pool.close()


def serve_cmd(args: argparse.Namespace) -> int:
    def s(v):
        return str(v) if v is not None else None

    cfg = load_config(InferenceServiceConfig, args.config, {
        "model": s(args.model), "listen": args.listen,
        "token_keys": [str(k) for k in args.token_key] if args.token_key else None,
        "audience": args.audience, "tls.cert": s(args.cert), "tls.key": s(args.key),
        "crypto_provider": args.crypto_provider, "crypto_provider_tls.ca_cert": s(args.ca_cert),
        "crypto_provider_secret": s(args.crypto_provider_secret), "crypto_provider_public": args.crypto_provider_public,
        "session_timeout_s": args.session_timeout, "max_sessions": args.max_sessions,
        "audit_log": s(args.audit_log), "tls.insecure": True if args.insecure else None,
        "max_sessions_per_token": args.max_sessions_per_token, "max_sessions_per_peer": args.max_sessions_per_peer,
        "join_timeout_s": args.join_timeout, "predictions_per_token_per_hour": args.rate_per_hour,
        "prediction_budget_per_token": args.budget_per_token, "revoked_tokens": s(args.revoked_tokens),
        "allow_scans_without_patient_id": args.allow_scans_without_patient_id,
        "crypto_provider_tls.insecure": True if args.insecure else None,
    })
    return serve(cfg, atrest_key=load_key(getattr(args, "atrest_key_file", None)))


def token_init_key_cmd(args: argparse.Namespace) -> int:
    """``xrayfed token init-key``: the Ed25519 key pair that signs patients' tokens."""
    return _init_key(args.signing_key, force=args.force)


def token_issue_cmd(args: argparse.Namespace) -> int:
    """``xrayfed token issue``: sign one patient's token (stdout, or ``--out`` with mode 0600)."""
    return _issue(args.signing_key, args.patient_id, args)


def token_revoke_cmd(args: argparse.Namespace) -> int:
    """``xrayfed token revoke``: add a token's id to the service's revocation list."""
    return _revoke(args.revocation_list, args.token)


def issue_token_cmd(args: argparse.Namespace) -> int:
    """``xrayfed issue-token`` (old form of the three ``token`` actions, chosen by its flags)."""
    if args.revoke:
        if args.revocation_list is None:
            raise UserError("issue-token --revoke: give --revocation-list FILE (the service's revoked_tokens)")
        return _revoke(args.revocation_list, args.revoke)
    if args.key is None:
        raise UserError("issue-token: --key KEY is required (the hospital's Ed25519 signing key)")
    if args.init_key:
        return _init_key(args.key, force=args.force)
    if not args.patient_id:
        raise UserError("issue-token: --patient-id is required")
    return _issue(args.key, args.patient_id, args)


def _init_key(path, *, force: bool) -> int:
    priv, pub = tokens.generate_key(path, force=force)
    print(f"signing key: {priv} (keep secret, mode 0600)\npublic key:  {pub} (give to serve-inference --token-key)")
    return 0


def _revoke(revocation_list, token: str) -> int:
    jti = revoke_token(revocation_list, token)
    print(f"token {jti} revoked: added to {revocation_list} (serve-inference re-reads it)")
    return 0


def _issue(signing_key, patient_id: str, args: argparse.Namespace) -> int:
    """Sign a token for ``patient_id`` with ``args.expires``, ``.audience``, ``.issuer``, ``.out``."""
    key = tokens.load_private_key(signing_key)
    exp = tokens.parse_expires(args.expires)
    tok = tokens.issue_token(key, patient_id, exp, issuer=args.issuer or tokens.DEFAULT_ISSUER,
                             audience=args.audience or tokens.DEFAULT_AUDIENCE)
    when = _dt.datetime.fromtimestamp(exp, _dt.timezone.utc).isoformat(timespec="seconds")
    if args.out:
        atomic_write(args.out, (tok + "\n").encode(), mode=0o600)
        print(f"token for patient {patient_id!r} (expires {when}, id {tokens.peek_claims(tok)['jti']}) "
              f"written to {args.out}", file=sys.stderr)
    else:
        print(tok)
        print(f"token for patient {patient_id!r} expires {when} (id {tokens.peek_claims(tok)['jti']})",
              file=sys.stderr)
    return 0
