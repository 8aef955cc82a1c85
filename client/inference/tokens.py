"""Patient access tokens for encrypted inference: Ed25519-signed, short, offline-verifiable.

Format (one line of ASCII, safe to put in a file)::

    xrf1.<base64url(payload JSON)>.<base64url(Ed25519 signature)>

The signature covers ``b"xrayfed-token/1." + <base64url payload>`` (domain-separated). The
payload is ``{"v": 1, "sub": patient id, "iss": issuer, "aud": audience, "iat": issued-at,
"exp": expiry (Unix seconds), "jti": random token id, "kid": signing-key id}``; ``kid`` is the
first 16 hex digits of SHA-256 over the raw 32-byte public key, so the service can tell a
*tampered* token (known key, bad signature) from a *foreign-signed* one (unknown key).

Keys: hospital staff sign with an Ed25519 private key (PKCS#8 PEM, mode 0600, made by
``xrayfed token init-key`` or ``xrayfed certs init`` as
``inference/token-signing.key``); the inference service only holds the public key(s).

What a token proves: that the hospital issued access for patient ``sub`` until ``exp``. It is a
bearer token — whoever holds the file can use it until it expires; keep lifetimes short.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from xrayfed.common.errors import UserError
from xrayfed.common.files import atomic_write

PREFIX = "xrf1"
SIG_CONTEXT = b"xrayfed-token/1."
DEFAULT_AUDIENCE = "xrayfed-inference"
DEFAULT_ISSUER = "xrayfed-hospital"
MAX_LIFETIME_S = 366 * 24 * 3600
# DICOM PatientID is a LO value: up to 64 characters, no backslash or control characters.
PATIENT_ID_RE = re.compile(r"^[^\\\x00-\x1f\x7f]{1,64}$")
_DURATION_RE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class TokenError(UserError):
    """A token the service refuses; ``reason`` is a short machine-readable code for the audit log."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TokenClaims:
    sub: str
    iss: str
    aud: str
    iat: int
    exp: int
    jti: str
    kid: str


# --------------------------------------------------------------------------- helpers
def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _b64d(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _now() -> int:
    return int(_dt.datetime.now(_dt.timezone.utc).timestamp())


def validate_patient_id(pid: str) -> str:
    if not isinstance(pid, str) or pid != pid.strip() or not PATIENT_ID_RE.match(pid):
        raise UserError(
            f"patient id {pid!r}: use 1-64 printable characters without a backslash or surrounding spaces "
            "(the DICOM PatientID rules)"
        )
    return pid


def key_id(public_key) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def parse_expires(value: str, now: int | None = None) -> int:
    """``--expires``: a duration (``90m``, ``12h``, ``30d``, ``2w``, ``3600s``) or an ISO-8601 time."""
    now = _now() if now is None else now
    v = str(value).strip()
    m = _DURATION_RE.match(v.lower())
    if m:
        exp = now + int(m.group(1)) * _UNITS[m.group(2)]
    else:
        try:
            t = _dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise UserError(f"--expires {value!r}: expected a duration like 12h / 30d or an ISO time like "
                            "2026-01-31T12:00:00+00:00") from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=_dt.timezone.utc)
        exp = int(t.timestamp())
    if exp <= now:
        raise UserError(f"--expires {value!r}: lies in the past")
    if exp - now > MAX_LIFETIME_S:
        raise UserError(f"--expires {value!r}: tokens live at most 366 days")
    return exp


# --------------------------------------------------------------------------- keys
def generate_key(path: Path, force: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``path`` (private, 0600) and ``path`` with suffix ``.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = Path(path)
    pub = path.with_suffix(".pub")
    if not force:
        for p in (path, pub):
            if p.exists():
                raise UserError(f"{p} already exists; refusing to overwrite a key without --force")
    key = ed25519.Ed25519PrivateKey.generate()
    atomic_write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()), mode=0o600)
    atomic_write(pub, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo), mode=0o644)
    return path, pub


def load_private_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = Path(path)
    if not path.is_file():
        raise UserError(f"signing key: no file at {path} (make one with `xrayfed token init-key --signing-key {path}`)")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: not a readable unencrypted PEM private key ({type(e).__name__})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UserError(f"{path}: not an Ed25519 key (token signing keys are Ed25519)")
    return key


def load_public_keys(paths) -> dict[str, object]:
    """Trusted token-signing public keys (PEM), by key id. At least one is required."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    keys: dict[str, object] = {}
    for p in paths or []:
        p = Path(p)
        if not p.is_file():
            raise UserError(f"token public key: no file at {p}")
        try:
            key = serialization.load_pem_public_key(p.read_bytes())
        except (ValueError, TypeError) as e:
            raise UserError(f"{p}: not a readable PEM public key ({type(e).__name__})") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise UserError(f"{p}: not an Ed25519 public key")
        keys[key_id(key)] = key
    if not keys:
        raise UserError("no token public key given (--token-key FILE): the service could not check any token")
    return keys


# --------------------------------------------------------------------------- issue / verify
def issue_token(private_key, patient_id: str, expires: int, *, issuer: str = DEFAULT_ISSUER,
                audience: str = DEFAULT_AUDIENCE, now: int | None = None) -> str:
    now = _now() if now is None else now
    payload = {
        "v": 1,
        "sub": validate_patient_id(patient_id),
        "iss": issuer,
        "aud": audience,
        "iat": int(now),
        "exp": int(expires),
        "jti": secrets.token_hex(12),
        "kid": key_id(private_key.public_key()),
    }
    body = _b64e(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    sig = private_key.sign(SIG_CONTEXT + body.encode("ascii"))
    return f"{PREFIX}.{body}.{_b64e(sig)}"


def peek_subject(token: str) -> str | None:
    """The (unverified) subject, for audit lines of refused tokens. Never trust it for access."""
    try:
        sub = json.loads(_b64d(token.strip().split(".")[1]))["sub"]
    except Exception:  # noqa: BLE001 - any garbage means "unknown"
        return None
    return sub if isinstance(sub, str) and PATIENT_ID_RE.match(sub) else None


def peek_claims(token: str) -> dict:
    """The token's (unverified) claims, e.g. its ``jti`` to revoke it. Never trust them for access."""
    try:
        claims = json.loads(_b64d(token.strip().split(".")[1]))
    except Exception:  # noqa: BLE001 - any garbage means "no claims"
        return {}
    return claims if isinstance(claims, dict) else {}


def verify_token(token: str, public_keys: dict[str, object], *, audience: str = DEFAULT_AUDIENCE,
                 now: int | None = None, leeway_s: int = 60) -> TokenClaims:
    """Check signature, key, audience and lifetime; raise :class:`TokenError` with a clear message."""
    from cryptography.exceptions import InvalidSignature

    now = _now() if now is None else now
    parts = token.strip().split(".") if isinstance(token, str) else []
    if len(parts) != 3 or parts[0] != PREFIX:
        raise TokenError("malformed",
                         "token is malformed (not an xrayfed patient token); ask the hospital for a new one")
    try:
        payload = json.loads(_b64d(parts[1]))
        sig = _b64d(parts[2])
    except (ValueError, UnicodeDecodeError):
        raise TokenError("malformed", "token is malformed (bad encoding); ask the hospital for a new one") from None
    if not isinstance(payload, dict):
        raise TokenError("malformed", "token is malformed (bad payload)")
    kid = payload.get("kid")
    key = public_keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise TokenError("unknown_key", "token is signed by a key this service does not trust (foreign-signed)")
    try:
        key.verify(sig, SIG_CONTEXT + parts[1].encode("ascii"))
    except InvalidSignature:
        raise TokenError("bad_signature", "token signature is invalid (the token was altered)") from None
    try:
        claims = TokenClaims(sub=str(payload["sub"]), iss=str(payload["iss"]), aud=str(payload["aud"]),
                             iat=int(payload["iat"]), exp=int(payload["exp"]), jti=str(payload["jti"]), kid=kid)
    except (KeyError, TypeError, ValueError):
        raise TokenError("malformed", "token is malformed (missing claims)") from None
    if payload.get("v") != 1:
        raise TokenError("malformed", f"token version {payload.get('v')!r} is not supported")
    if claims.aud != audience:
        raise TokenError("wrong_audience", f"token is for {claims.aud!r}, not for this service ({audience!r})")
    if claims.exp <= now - leeway_s:
        when = _dt.datetime.fromtimestamp(claims.exp, _dt.timezone.utc).isoformat(timespec="seconds")
        raise TokenError("expired", f"token expired at {when}; ask the hospital for a new one")
    if claims.iat > now + leeway_s:
        raise TokenError("not_yet_valid", "token is not valid yet (issued in the future: check the clocks)")
    if not PATIENT_ID_RE.match(claims.sub):
        raise TokenError("malformed", "token subject is not a valid patient id")
    return claims


def check_dicom_patient_id(claims: TokenClaims, dicom_patient_id: str | None) -> None:
    """A DICOM scan's PatientID (as reported by the patient's software) must be the token's subject."""
    if dicom_patient_id is None:
        return
    if str(dicom_patient_id).strip() != claims.sub:
        raise TokenError("patient_mismatch",
                         "the DICOM scan's PatientID does not match the patient this token was issued to; "
                         "you can only get predictions for your own scans")


def read_token_file(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--token: no file at {path}")
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        raise UserError(f"--token {path}: not a token file (expected one line of text)") from None
    if not text.startswith(PREFIX + "."):
        raise UserError(f"--token {path}: not an xrayfed patient token")
    return text
