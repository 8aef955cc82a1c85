"""``xrayfed certs ...``: the handlers of the operator's PKI commands (the PKI itself is
:mod:`xrayfed.server.pki`; the arguments are in :mod:`xrayfed.server.commands`). The hospital's
``certs hospital-key`` is :mod:`xrayfed.client.keys`."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from xrayfed.common.errors import UserError
from xrayfed.common.files import atomic_write
from xrayfed.common.flower_launch import write_flwr_home
from xrayfed.common.security.atrest import load_checkpoint, load_key, make_atrest_key
from xrayfed.common.security.authkey import KEY_MODE, refuse_existing
from xrayfed.server.pki import MANIFEST, add_hospital, init_pki, read_manifest, revoke_hospital
from xrayfed.server.registry import unregister_hospital


def init_cmd(args: argparse.Namespace) -> int:
    m = init_pki(args.out, server_names=args.server_name, server_ips=args.server_ip, hospitals=args.hospital,
                 loopback=not args.no_loopback, force=args.force, federation=args.federation)
    srv = m["server"]
    print(f"CA and server certificate in {args.out} (SAN: {', '.join(srv['dns'] + srv['ips'])})")
    for name in m["hospitals"]:
        print(f"hospital {name}: give {args.out / 'hospitals' / name}/ to the hospital (auth.key stays secret)")
    print(f"secret the inference service and the crypto provider share: {args.out / m['inference']['crypto_provider_secret']}"
          f" and {args.out / m['crypto_provider']['secret']} (the same, mode 0600; an existing one is kept)")
    print(f"ca.key signs certificates: keep it offline; manifest: {args.out / MANIFEST}")
    return 0


def add_hospital_cmd(args: argparse.Namespace) -> int:
    e = add_hospital(args.out, args.name, force=args.force, public_key=args.public_key)
    where = args.out / "hospitals" / args.name
    if args.public_key is None:
        print(f"hospital {args.name}: {where}/ ({e['fingerprint']}); give this folder to the hospital "
              "(auth.key stays secret)")
    else:
        print(f"hospital {args.name}: public key imported to {where}/auth.pub ({e['fingerprint']}); "
              f"give the hospital {where}/ca.pem")
    print(f"register it: add {where}/auth.pub to the server's [network] hospital_keys (registered at every "
          "start); to admit it into a running federation see deploy/RUNBOOK.md, 'Register a hospital'")
    return 0


def revoke_hospital_cmd(args: argparse.Namespace) -> int:
    out = Path(args.out)
    manifest = read_manifest(out)
    if args.name not in manifest["hospitals"]:
        raise UserError(f"hospital {args.name!r}: not in {out / MANIFEST}")
    if args.superlink:
        with tempfile.TemporaryDirectory(prefix="xrayfed-flwr-") as tmp:
            home = write_flwr_home(Path(tmp), args.superlink, root_certificates=out / "ca.pem")
            node = unregister_hospital(home, out / manifest["hospitals"][args.name]["auth_pub"])
        print(f"hospital {args.name}: SuperNode {node} unregistered; the SuperLink refuses its key from now on")
    try:
        revoke_hospital(out, args.name)
    except OSError as e:  # e.g. a read-only mount of certs.json inside the server's container
        raise UserError(f"{out / MANIFEST}: cannot mark {args.name} revoked ({e.strerror}); run "
                        f"`xrayfed certs revoke-hospital {args.name} --out PKI` where the pki folder is writable, "
                        "or the next server start registers it again") from None
    print(f"hospital {args.name}: revoked" + (" and unregistered from the running SuperLink" if args.superlink else
                                              "; it is not registered at the next server start"))
    return 0


def atrest_key_cmd(args: argparse.Namespace) -> int:
    path = make_atrest_key(args.out, force=args.force)
    print(f"at-rest key written to {path} (mode 0600); set XRAYFED_ATREST_KEY_FILE={path} or pass --atrest-key-file",
          file=sys.stdout)
    return 0


def decrypt_checkpoint(checkpoint: Path | str, out: Path | str, key, *, force: bool = False) -> Path:
    """Write a plaintext copy (mode 0600) of a (possibly encrypted) checkpoint; returns ``out``."""
    out = Path(out)
    refuse_existing([out], force)
    from xrayfed.common.checkpoint import to_bytes  # lazy: the other certs commands run without torch

    ckpt = load_checkpoint(checkpoint, key)  # wrong key / modified file: one-line UserError
    atomic_write(out, to_bytes(ckpt), mode=KEY_MODE)
    return out


def decrypt_checkpoint_cmd(args: argparse.Namespace) -> int:
    key = load_key(args.atrest_key_file)
    path = decrypt_checkpoint(args.model, args.out, key, force=args.force)
    print(f"plaintext model written to {path} (mode 0600): it holds the model weights, keep it on the "
          "inference host only")
    return 0
