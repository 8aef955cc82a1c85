"""``xrayfed certs hospital-key``: on a hospital's machine, its SuperNode key pair
(:mod:`xrayfed.common.security.authkey`); only ``auth.pub`` goes to the operator. The argument
definitions are in :mod:`xrayfed.client.commands`."""

from __future__ import annotations

import argparse

from xrayfed.common.security.authkey import make_hospital_key, public_key_fingerprint


def hospital_key_cmd(args: argparse.Namespace) -> int:
    key, pub = make_hospital_key(args.out, name=args.name, force=args.force)
    print(f"hospital key: {key} (mode 0600, never leaves this machine); send {pub} to the federation operator "
          f"({public_key_fingerprint(pub.read_bytes())}; confirm the fingerprint with them by phone or in person)")
    return 0
