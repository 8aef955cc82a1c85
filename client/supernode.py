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

from xrayfed.common.errors import UserError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="run a hospital client (Flower SuperNode + DP training)",
                       description="Join a federation as a hospital: train on local scans with differential privacy.")
    p.add_argument("--server", required=True, help="the federation server HOST:PORT")
    p.add_argument("--data", type=Path, help="the hospital's scans (overrides [data] path)")
    p.add_argument("--config", type=Path, help="hospital.toml (privacy budget, training settings)")
    p.add_argument("--name", help="override [hospital] name")
    p.add_argument("--state-dir", type=Path, help="override [hospital] state_dir (privacy ledger lives here)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override [hospital] device (default auto)")
    p.add_argument("--epsilon", type=float, help="override [privacy] epsilon (this hospital's total ε budget)")
    p.add_argument("--insecure", action="store_true", help="no TLS (local experiments only; prints a warning)")
    p.add_argument("--root-cert", type=Path, help="CA certificate (PEM) that signed the server's certificate")
    p.add_argument("--auth-key", type=Path, help="this hospital's SuperNode authentication private key")
    p.add_argument("--port", type=int, help="local port of the SuperNode's ClientApp API (default: a free port)")
    p.set_defaults(func=run_client_cmd)


def load_hospital_config(args: argparse.Namespace):
    from xrayfed.common.config import HospitalConfig, load_config

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
    """Fail before joining when the data cannot be used; returns the number of usable scans."""
    from xrayfed.common.data import load_dataset

    if cfg.data.path is None:
        raise UserError("data: no path (give --data PATH or [data] path in hospital.toml)")
    if not Path(cfg.data.path).exists():
        raise UserError(f"data: no such file or folder {cfg.data.path}")
    ds = load_dataset(Path(cfg.data.path), split=cfg.data.split, image_size=16)
    skipped = len(getattr(ds, "skipped", []))
    print(f"[xrayfed] {cfg.hospital.name}: {len(ds)} usable scans in {cfg.data.path} ({cfg.data.split})"
          + (f", {skipped} unreadable file(s) skipped" if skipped else ""), flush=True)
    return len(ds)


def run_client_cmd(args: argparse.Namespace) -> int:
    from xrayfed.common.config import dump_toml
    from xrayfed.common.flower_security import flower_env, supernode_args, warn_insecure
    from xrayfed.common.procs import ProcessGroup, free_port, parse_hostport, spawn, venv_bin

    parse_hostport(args.server, "--server")
    cfg = load_hospital_config(args)
    if not args.insecure and args.root_cert is None:
        raise UserError("--root-cert: required with TLS (the federation's ca.pem from `xrayfed certs init`), "
                        "or pass --insecure for a local experiment")
    link_args = supernode_args(superlink=args.server, insecure=args.insecure, root_certificates=args.root_cert,
                               auth_private_key=args.auth_key)
    if args.insecure:
        warn_insecure(f"hospital {cfg.hospital.name}")
    check_data(cfg)
    state = Path(cfg.hospital.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    resolved = state / "hospital.resolved.toml"
    resolved.write_text(dump_toml(cfg), encoding="utf-8")
    port = args.port or free_port()
    cmd = [venv_bin("flower-supernode"), *link_args, "--port", str(port), "--node-config", f'config="{resolved}"']
    print(f"[xrayfed] hospital {cfg.hospital.name} joining {args.server}; privacy ledger: "
          f"{state / 'privacy-ledger.jsonl'}", flush=True)
    with ProcessGroup() as group:
        node = group.add(spawn(cmd, env=flower_env(state / ".flwr")))
        rc = node.wait()
    if rc != 0 and args.auth_key is not None:
        print(f"xrayfed: error: the server refused hospital {cfg.hospital.name} (its key is not registered or was "
              "revoked), or the connection failed; see the lines above", file=sys.stderr)
    return rc
