"""A hospital's SuperNode authentication key pair: what both the operator and the hospital make.

The operator's PKI (:mod:`xrayfed.server.pki`: ``xrayfed certs init`` / ``add-hospital``) makes
hospital key pairs with it, and a hospital makes its own on its machine (``xrayfed certs
hospital-key``, :mod:`xrayfed.client.keys`) and sends only ``auth.pub`` to the operator. The
SuperLink, its gateway and registry name keys by :func:`public_key_fingerprint`.

Key: EC P-384 in OpenSSH format (what ``flower-supernode --auth-supernode-private-key`` and
``flwr supernode register`` read). A private key is written with mode 0600 and never
overwritten unless ``force`` is given.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Iterable

from xrayfed.common.errors import UserError
from xrayfed.common.files import atomic_write

HOSPITAL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
KEY_MODE = 0o600


def refuse_existing(paths: Iterable[Path], force: bool, hint: str = "") -> None:
    if force:
        return
    for p in paths:
        if p.exists():
            raise UserError(f"{p} already exists; refusing to overwrite a key without --force{hint}")


def validate_hospital_name(name: str) -> str:
    if not isinstance(name, str) or not HOSPITAL_NAME_RE.match(name):
        raise UserError(
            f"hospital name {name!r}: use 1-64 letters, digits, '_', '.', '-' (starting with a letter or digit)"
        )
    return name


def make_auth_keypair(comment: str = "") -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair: (OpenSSH private key, OpenSSH public key line).

    Flower 1.41 wants an elliptic-curve key on a NIST curve (we use P-384): the SuperNode reads
    the private key with ``load_ssh_private_key`` (unencrypted) and ``flwr supernode register``
    reads the public key with ``load_ssh_public_key`` (``ecdsa-sha2-nistp384 AAAA... comment``).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        pub += b" " + comment.encode()
    return priv, pub + b"\n"


def public_key_fingerprint(public_key: Path | str | bytes) -> str:
    """SHA-256 fingerprint (OpenSSH style) of an OpenSSH or PEM public key."""
    from cryptography.hazmat.primitives import serialization

    data = Path(public_key).read_bytes() if isinstance(public_key, (str, Path)) else bytes(public_key)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError) as e:
        raise UserError(f"not a public key ({type(e).__name__})") from None
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    return "SHA256:" + base64.b64encode(hashlib.sha256(base64.b64decode(blob)).digest()).decode().rstrip("=")


def make_hospital_key(out: Path | str, *, name: str = "", force: bool = False) -> tuple[Path, Path]:
    """On the hospital's machine: ``out/auth.key`` (mode 0600, stays there) and ``out/auth.pub``
    (sent to the operator for ``xrayfed certs add-hospital NAME --public-key auth.pub``)."""
    out = Path(out)
    key, pub = out / "auth.key", out / "auth.pub"
    refuse_existing([key], force)
    priv, pub_line = make_auth_keypair(comment=f"xrayfed-hospital-{validate_hospital_name(name)}" if name else "")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(key, priv, mode=KEY_MODE)
    atomic_write(pub, pub_line, mode=0o644)
    return key, pub
