"""``xrayfed client``: a hospital joins the federation (Flower SuperNode + xrayfed ClientApp).

The hospital's config (its privacy budget included) and its data path are handed to the
ClientApp through the SuperNode's *node config*, which only the hospital sets. The scans are
read by the ClientApp inside this machine; only DP-trained weights and figures leave.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from xrayfed.client.hospital import hospital_split
from xrayfed.client.privacy import PrivacyLedger, plan_dp
from xrayfed.common.addresses import parse_hostport
from xrayfed.common.config import HospitalConfig, dump_toml, load_config
from xrayfed.common.errors import UserError
from xrayfed.common.flower_launch import flower_env, supernode_args
from xrayfed.common.logs import FLEET_EXPOSED, warn_insecure
from xrayfed.common.privacy.ledger import read_ledger
from xrayfed.common.procs import ProcessGroup, free_port, spawn, venv_bin
from xrayfed.common.security.atrest import ENV_KEY_FILE, load_key

log = logging.getLogger(__name__)


def load_hospital_config(args: argparse.Namespace):
    return load_config(
        HospitalConfig,
        args.config,
        {
            "data.path": str(args.data.resolve()) if args.data else None,
            "hospital.name": args.name,
            "hospital.state_dir": str(args.state_dir.resolve()) if args.state_dir else None,
            "hospital.device": args.device,
            "privacy.epsilon": args.epsilon,
        },
    )


def check_data(cfg) -> int:
    """Fail before joining when the data or the privacy plan cannot be used; returns N, the
    number of training scans after this hospital's partition and validation split.

    Refused here, with one line: no usable scan, δ ≥ 1/N, a budget no noise level can meet,
    a plan longer than the accountant composes (:func:`xrayfed.client.privacy.plan_dp`).
    """

    if cfg.data.path is None:
        raise UserError("data: no path (give --data PATH or [data] path in hospital.toml)")
    if not Path(cfg.data.path).exists():
        raise UserError(f"data: no such file or folder {cfg.data.path}")
    d = cfg.data
    ds, train, val = hospital_split(cfg)
    skipped = len(getattr(ds, "skipped", []))
    plan = plan_dp(cfg, len(train))
    print(f"[xrayfed] {cfg.hospital.name}: {len(ds)} usable scans in {d.path} ({d.split})"
          + (f", {skipped} unreadable file(s) skipped" if skipped else "")
          + f"; {len(train)} for DP training, {0 if val is None else len(val)} for validation; "
          f"plan: σ = {plan.noise_multiplier:.3f}, q = {plan.sample_rate:.4g}, {plan.steps} steps/round, "
          f"{plan.max_rounds} rounds for ε = {plan.epsilon_budget:g} at δ = {plan.delta:g}", flush=True)
    if val is None:
        print(f"[xrayfed] {cfg.hospital.name}: no validation scans (data.val_fraction = {d.val_fraction:g}): this "
              "hospital sends no evaluation metrics (it never evaluates on its DP-protected training scans)",
              flush=True)
    return len(train)


# What flower-supernode prints when the server does not let the hospital in -> our one-line cause.
_REFUSAL_CAUSES = (
    ("CERTIFICATE_VERIFY_FAILED", "the server's TLS certificate is not signed by the CA given with --root-cert "
                                  "(wrong ca.pem, or not the federation's server)"),
    ("Failed to activate SuperNode", "the server refused this hospital's key (--auth-key): it is not registered, "
                                     "or it was revoked"),
    ("must be registered via the CLI", "the server requires hospital authentication: pass --auth-key with this "
                                       "hospital's registered auth.key"),
    ("401 Unauthorized", "the server refused this hospital's key (it was revoked or unregistered)"),
)


def _pump(stream, seen: list[str]) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        sys.stdout.write(line)
        sys.stdout.flush()
        for marker, _ in _REFUSAL_CAUSES:
            if marker in line and marker not in seen:
                seen.append(marker)


def run_client_cmd(args: argparse.Namespace) -> int:
    import subprocess
    import threading


    parse_hostport(args.server, "--server")
    cfg = load_hospital_config(args)
    if not args.insecure and args.root_cert is None:
        raise UserError("--root-cert: required with TLS (the federation's ca.pem from `xrayfed certs init`), "
                        "or pass --insecure for a local experiment")
    link_args = supernode_args(superlink=args.server, insecure=args.insecure, root_certificates=args.root_cert,
                               auth_private_key=args.auth_key)
    key_file = getattr(args, "atrest_key_file", None)
    atrest_key = load_key(key_file)  # a bad key fails here, before joining
    if args.insecure:
        warn_insecure(f"hospital {cfg.hospital.name}", FLEET_EXPOSED)
    check_data(cfg)
    state = Path(cfg.hospital.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)


    # Fail before joining when the privacy ledger cannot be read (wrong/missing at-rest key or
    # ledger key, broken chain, cut short): one line naming the file, never a budget silently
    # starting from zero.
    read_ledger(state / PrivacyLedger.FILE, atrest_key, key_file=cfg.hospital.ledger_key_file)
    resolved = state / "hospital.resolved.toml"
    resolved.write_text(dump_toml(cfg), encoding="utf-8")
    port = args.port or free_port()
    cmd = [venv_bin("flower-supernode"), *link_args, "--port", str(port), "--node-config", f'config="{resolved}"']
    env = flower_env(state / ".flwr")
    if key_file is not None:  # the ClientApp processes (started by the SuperNode) read the key from here
        env[ENV_KEY_FILE] = str(Path(key_file).expanduser().resolve())
    print(f"[xrayfed] hospital {cfg.hospital.name} joining {args.server}; privacy ledger: "
          f"{state / 'privacy-ledger.jsonl'}"
          + (f" (encrypted at rest, key id {atrest_key.key_id.hex()})" if atrest_key is not None else "")
          + ("; only secure-aggregation (SecAgg+) training requests are accepted"
             if cfg.hospital.require_secure_aggregation else ""), flush=True)
    seen: list[str] = []
    with ProcessGroup() as group:
        node = group.add(spawn(cmd, env=env, stdout=subprocess.PIPE))
        pump = threading.Thread(target=_pump, args=(node.stdout, seen), daemon=True)
        pump.start()
        rc = node.wait()
        pump.join(timeout=5)
    if rc != 0:
        cause = next((c for m, c in _REFUSAL_CAUSES if m in seen), None)
        if cause is None:
            cause = ("the SuperNode stopped (see the lines above): the server refused this hospital or the "
                     "connection failed")
        print(f"xrayfed: error: hospital {cfg.hospital.name} could not join {args.server}: {cause}",
              file=sys.stderr, flush=True)
    return rc
