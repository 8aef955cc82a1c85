"""``xrayfed certs``: the federation's keys and certificates (a small private PKI).

``xrayfed certs init --out DIR`` makes, with :mod:`cryptography`::

    DIR/ca.pem, ca.key                    federation CA (EC P-384, self-signed, pathlen 0)
    DIR/server.pem, server.key            SuperLink TLS certificate (EC P-256) signed by the CA;
                                          SAN = --server-name/--server-ip + localhost/127.0.0.1/::1
    DIR/inference/tls.pem, tls.key        TLS certificate of the inference service (same SANs)
    DIR/inference/token-signing.key, .pub Ed25519 key pair that signs inference access tokens
    DIR/crypto-provider/tls.pem, tls.key  TLS certificate of the crypto provider
                                          (``serve-crypto-provider``); its SANs include the
                                          role name ``xrayfed-crypto-provider``, which patients
                                          and hospitals require of it (no other certificate the
                                          CA issues carries that name)
    DIR/inference/crypto-provider.secret, the secret the inference service and the crypto
    DIR/crypto-provider/crypto-provider.secret  provider share (256 bits, the same in both
                                          folders; kept when it exists, even with ``--force``)
    DIR/hospitals/NAME/auth.key, auth.pub SuperNode authentication key pair (EC P-384, OpenSSH
                                          format: what ``flower-supernode
                                          --auth-supernode-private-key`` and ``flwr supernode
                                          register`` read)
    DIR/hospitals/NAME/ca.pem             the hospital's copy of the CA (``xrayfed client --ca-cert``)
    DIR/certs.json                        manifest: what was made, fingerprints, revocations

Every private key is written with mode 0600 and is never overwritten unless ``--force`` is
given (a clear one-line error names the file otherwise). ``hospitals/NAME`` is the folder a
hospital receives; it holds no secret of the federation other than its own key. The key pair
itself, which a hospital can also make on its machine (``xrayfed certs hospital-key``), is
:mod:`xrayfed.common.security.authkey`.

``xrayfed certs add-hospital NAME --out DIR`` adds one hospital later;
``xrayfed certs revoke-hospital NAME --out DIR`` marks it revoked in the manifest (it is no
longer registered at the next SuperLink start; ``--superlink`` also unregisters it from a
running SuperLink, see :mod:`xrayfed.server.registry`);
``xrayfed certs atrest-key --out FILE`` makes a key for encrypting checkpoints and ledgers at
rest (:mod:`xrayfed.common.security.atrest`);
``xrayfed certs decrypt-checkpoint --model CKPT --out FILE`` writes a plaintext copy (mode 0600)
of a checkpoint encrypted at rest, e.g. the final global model for ``xrayfed serve-inference``.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import re
from pathlib import Path
from typing import Any, Iterable

from xrayfed.common.errors import UserError
from xrayfed.common.files import atomic_write
from xrayfed.common.protocol.inference import CRYPTO_PROVIDER_NAME
from xrayfed.common.security.authkey import (
    KEY_MODE,
    make_auth_keypair,
    public_key_fingerprint,
    refuse_existing,
    validate_hospital_name,
)
from xrayfed.common.security.shared_secret import SECRET_NAME, make_shared_secret

MANIFEST = "certs.json"
FORMAT = "xrayfed-certs/1"
CRYPTO_PROVIDER_DIR = "crypto-provider"  # DIR/crypto-provider/: the crypto provider's TLS key and certificate
DNS_NAME_RE = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1", "::1")


# --------------------------------------------------------------------------- small helpers


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    atomic_write(path, data, mode=mode)


def _cert_fingerprint(cert) -> str:
    from cryptography.hazmat.primitives import hashes

    return "SHA256:" + cert.fingerprint(hashes.SHA256()).hex()


def _pem_private(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_public(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _validate_dns(name: str) -> str:
    if not DNS_NAME_RE.match(name) or len(name) > 253:
        raise UserError(f"--server-name {name!r}: not a valid DNS host name")
    return name.lower()


def _validate_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        raise UserError(f"--server-ip {value!r}: not an IPv4/IPv6 address") from None


# --------------------------------------------------------------------------- manifest
def read_manifest(out: Path) -> dict[str, Any]:
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: no certificate manifest here; run `xrayfed certs init --out {out}` first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable manifest ({type(e).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path}: not an xrayfed certificate manifest (expected format {FORMAT!r})")
    data.setdefault("hospitals", {})
    return data


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    _write(Path(out) / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


# --------------------------------------------------------------------------- certificates
def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xrayfed federation"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _make_ca(common_name: str, days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    name = _name(common_name)
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _make_leaf(ca_key, ca_cert, common_name: str, dns: list[str], ips: list[str], days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    san = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if not san:
        raise UserError("the server certificate needs at least one host name or IP (--server-name/--server-ip)")
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(min(now + _dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _load_ca(out: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca_pem, ca_key = out / "ca.pem", out / "ca.key"
    if not ca_pem.is_file() or not ca_key.is_file():
        raise UserError(f"{out}: no federation CA here (ca.pem/ca.key); run `xrayfed certs init --out {out}` first")
    try:
        cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
        key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise UserError(f"{out}: unreadable CA certificate or key ({type(e).__name__})") from None
    return key, cert


# --------------------------------------------------------------------------- hospital keys
def _hospital_paths(out: Path, name: str) -> dict[str, Path]:
    d = out / "hospitals" / name
    return {"dir": d, "auth_key": d / "auth.key", "auth_pub": d / "auth.pub", "ca": d / "ca.pem"}


def _make_hospital(out: Path, name: str, force: bool, manifest: dict[str, Any]) -> dict[str, Any]:
    validate_hospital_name(name)
    paths = _hospital_paths(out, name)
    refuse_existing([paths["auth_key"]], force)
    priv, pub = make_auth_keypair(comment=f"xrayfed-hospital-{name}")
    paths["dir"].mkdir(parents=True, exist_ok=True)
    _write(paths["auth_key"], priv, KEY_MODE)
    _write(paths["auth_pub"], pub)
    _write(paths["ca"], (out / "ca.pem").read_bytes())
    entry = {
        "auth_key": str(paths["auth_key"].relative_to(out)),
        "auth_pub": str(paths["auth_pub"].relative_to(out)),
        "ca": str(paths["ca"].relative_to(out)),
        "key_type": "ecdsa-sha2-nistp384 (OpenSSH)",
        "fingerprint": public_key_fingerprint(pub),
        "created": _now().isoformat(timespec="seconds"),
        "revoked": False,
    }
    manifest["hospitals"][name] = entry
    return entry


# --------------------------------------------------------------------------- public API
def init_pki(
    out: Path | str,
    *,
    server_names: Iterable[str] = (),
    server_ips: Iterable[str] = (),
    hospitals: Iterable[str] = (),
    loopback: bool = True,
    force: bool = False,
    ca_days: int = 3650,
    cert_days: int = 825,
    federation: str = "xrayfed",
) -> dict[str, Any]:
    """Create the federation's CA, server/inference certificates, token key and hospital keys.

    Returns the manifest (also written to ``out/certs.json``). Refuses (UserError) to replace
    any existing private key unless ``force``; with ``force`` the CA, server and inference
    material is replaced, the listed hospitals get new keys, and every existing hospital's
    ``ca.pem`` copy is refreshed (their keys are kept).
    """
    out = Path(out)
    dns = [_validate_dns(n) for n in server_names]
    ips = [_validate_ip(i) for i in server_ips]
    if loopback:
        dns += [n for n in LOOPBACK_NAMES if n not in dns]
        ips += [i for i in LOOPBACK_IPS if i not in ips]
    dns = list(dict.fromkeys(dns))
    ips = list(dict.fromkeys(ips))
    names = [validate_hospital_name(h) for h in hospitals]
    if len(set(names)) != len(names):
        raise UserError(f"--hospital: a name is given twice ({names})")

    keys = [out / "ca.key", out / "server.key", out / "inference" / "tls.key", out / CRYPTO_PROVIDER_DIR / "tls.key",
            out / "inference" / "token-signing.key"] + [_hospital_paths(out, n)["auth_key"] for n in names]
    refuse_existing(keys, force, hint=" (use `xrayfed certs add-hospital` to add a hospital to an existing federation)")
    if not dns and not ips:
        raise UserError("no host name or IP for the server certificate: give --server-name/--server-ip "
                        "or leave out --no-loopback")

    out.mkdir(parents=True, exist_ok=True)
    from cryptography.hazmat.primitives.asymmetric import ed25519

    ca_key, ca_cert = _make_ca(f"{federation} federation CA", ca_days)
    from cryptography.hazmat.primitives import serialization

    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write(out / "ca.key", _pem_private(ca_key), KEY_MODE)
    _write(out / "ca.pem", ca_pem)

    common = dns[0] if dns else ips[0]
    srv_key, srv_cert = _make_leaf(ca_key, ca_cert, common, dns, ips, cert_days)
    _write(out / "server.key", _pem_private(srv_key), KEY_MODE)
    _write(out / "server.pem", srv_cert.public_bytes(serialization.Encoding.PEM))

    inf = out / "inference"
    inf.mkdir(exist_ok=True)
    inf_key, inf_cert = _make_leaf(ca_key, ca_cert, common, dns, ips, cert_days)
    _write(inf / "tls.key", _pem_private(inf_key), KEY_MODE)
    _write(inf / "tls.pem", inf_cert.public_bytes(serialization.Encoding.PEM))
    _write(inf / "ca.pem", ca_pem)
    cp = out / CRYPTO_PROVIDER_DIR
    cp.mkdir(exist_ok=True)
    cp_key, cp_cert = _make_leaf(ca_key, ca_cert, CRYPTO_PROVIDER_NAME, [CRYPTO_PROVIDER_NAME] + dns, ips, cert_days)
    _write(cp / "tls.key", _pem_private(cp_key), KEY_MODE)
    _write(cp / "tls.pem", cp_cert.public_bytes(serialization.Encoding.PEM))
    _write(cp / "ca.pem", ca_pem)
    tok = ed25519.Ed25519PrivateKey.generate()
    _write(inf / "token-signing.key", _pem_private(tok), KEY_MODE)
    _write(inf / "token-signing.pub", _pem_public(tok.public_key()))
    # the secret the inference service and the crypto provider share: one copy in each one's
    # folder; an existing one is kept (even with force: both services may be running with it)
    make_shared_secret([inf / SECRET_NAME, cp / SECRET_NAME])

    old = None
    if (out / MANIFEST).is_file():
        try:
            old = read_manifest(out)
        except UserError:
            old = None
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "federation": federation,
        "created": _now().isoformat(timespec="seconds"),
        "ca": {"cert": "ca.pem", "key": "ca.key", "fingerprint": _cert_fingerprint(ca_cert),
               "not_after": ca_cert.not_valid_after_utc.isoformat()},
        "server": {"cert": "server.pem", "key": "server.key", "dns": dns, "ips": ips,
                   "fingerprint": _cert_fingerprint(srv_cert), "not_after": srv_cert.not_valid_after_utc.isoformat()},
        "inference": {"cert": "inference/tls.pem", "key": "inference/tls.key", "ca": "inference/ca.pem",
                      "token_signing_key": "inference/token-signing.key",
                      "token_signing_pub": "inference/token-signing.pub",
                      "crypto_provider_secret": f"inference/{SECRET_NAME}",
                      "fingerprint": _cert_fingerprint(inf_cert)},
        "crypto_provider": {"cert": f"{CRYPTO_PROVIDER_DIR}/tls.pem", "key": f"{CRYPTO_PROVIDER_DIR}/tls.key",
                            "ca": f"{CRYPTO_PROVIDER_DIR}/ca.pem", "name": CRYPTO_PROVIDER_NAME,
                            "secret": f"{CRYPTO_PROVIDER_DIR}/{SECRET_NAME}",
                            "fingerprint": _cert_fingerprint(cp_cert)},
        "hospitals": dict(old.get("hospitals", {})) if old else {},
    }
    for name, entry in manifest["hospitals"].items():  # refresh CA copies of kept hospitals
        p = _hospital_paths(out, name)
        if p["dir"].is_dir():
            _write(p["ca"], ca_pem)
    for name in names:
        _make_hospital(out, name, force, manifest)
    _write_manifest(out, manifest)
    return manifest


def read_auth_public_key(path: Path | str) -> bytes:
    """A hospital's SuperNode public key line (OpenSSH, EC on a NIST curve), validated."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--public-key: no file at {path}")
    data = path.read_bytes().strip()
    if b"PRIVATE KEY" in data:
        raise UserError(f"{path}: this is a PRIVATE key; the hospital sends only its auth.pub")
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise UserError(f"{path}: not an OpenSSH public key (make one with `xrayfed certs hospital-key`)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise UserError(f"{path}: Flower needs an EC key on a NIST curve (P-256/384/521); "
                        "make one with `xrayfed certs hospital-key`")
    return data + b"\n"


def add_hospital(out: Path | str, name: str, *, force: bool = False,
                 public_key: Path | str | None = None) -> dict[str, Any]:
    """Add (or with ``force`` re-key, un-revoking it) one hospital; returns its manifest entry.

    With ``public_key`` (the hospital's own ``auth.pub``, made on its machine by
    ``xrayfed certs hospital-key``) only the public key is stored: the private key never
    leaves the hospital.
    """
    out = Path(out)
    manifest = read_manifest(out)
    _load_ca(out)
    validate_hospital_name(name)
    paths = _hospital_paths(out, name)
    if name in manifest["hospitals"] and not force:
        raise UserError(f"hospital {name!r} already exists ({paths['dir']}); refusing to replace its key without "
                        "--force")
    if public_key is None:
        entry = _make_hospital(out, name, force, manifest)
    else:
        pub = read_auth_public_key(public_key)
        paths["dir"].mkdir(parents=True, exist_ok=True)
        if paths["auth_key"].exists():  # an old key made here no longer belongs to this hospital
            paths["auth_key"].unlink()
        _write(paths["auth_pub"], pub)
        _write(paths["ca"], (out / "ca.pem").read_bytes())
        entry = {
            "auth_key": None,
            "auth_pub": str(paths["auth_pub"].relative_to(out)),
            "ca": str(paths["ca"].relative_to(out)),
            "key_type": pub.split()[0].decode() + " (OpenSSH, made by the hospital)",
            "fingerprint": public_key_fingerprint(pub),
            "created": _now().isoformat(timespec="seconds"),
            "revoked": False,
        }
        manifest["hospitals"][name] = entry
    _write_manifest(out, manifest)
    return entry


def revoke_hospital(out: Path | str, name: str) -> dict[str, Any]:
    """Mark a hospital revoked in the manifest (it is left out of :func:`hospital_public_keys`)."""
    out = Path(out)
    manifest = read_manifest(out)
    if name not in manifest["hospitals"]:
        raise UserError(f"hospital {name!r}: not in {out / MANIFEST} (known: {sorted(manifest['hospitals'])})")
    entry = manifest["hospitals"][name]
    entry["revoked"] = True
    entry["revoked_at"] = _now().isoformat(timespec="seconds")
    _write_manifest(out, manifest)
    return entry


def hospital_public_keys(out: Path | str, include_revoked: bool = False) -> dict[str, Path]:
    """``{name: path of auth.pub}`` of the hospitals to register with the SuperLink."""
    out = Path(out)
    manifest = read_manifest(out)
    return {
        name: out / e["auth_pub"]
        for name, e in sorted(manifest["hospitals"].items())
        if include_revoked or not e.get("revoked")
    }

