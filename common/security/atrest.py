"""Encryption at rest for checkpoints, ledgers and other files (AES-256-GCM, ``cryptography``).

Key: 32 random bytes, from (first match wins)

1. an explicit key file (``--atrest-key-file FILE``),
2. ``XRAYFED_ATREST_KEY_FILE`` = path of a key file,
3. ``XRAYFED_ATREST_KEY`` = the key itself, 64 hex digits or base64 of 32 bytes.

A key file holds the same text (``xrayfed certs atrest-key --out FILE`` writes one, mode 0600).
Without any of them nothing is encrypted (and encrypted files cannot be read).

File format (binary)::

    b"XRFENC" | version (1 byte = 1) | reserved (1 byte = 0) | key id (8 bytes) | nonce (12 bytes)
    | AES-256-GCM ciphertext + 16-byte tag

The 28-byte header is authenticated (associated data) together with a ``context`` label
(``b"checkpoint"``, ``b"ledger"``...), so a file cannot be passed off as another kind. The key
id (a hash of the key) tells a wrong key apart from a modified file. The AES key is derived
from the configured key with HKDF-SHA256, a fresh random nonce is drawn for every encryption.

Ledgers (JSON lines, append-only): every line is encrypted on its own by :func:`encrypt_line`
into a JSON object ``{"enc": "aes-256-gcm/1", "kid": ..., "n": LINE, "ct": base64}`` whose
associated data includes the line number, so lines cannot be reordered, duplicated or moved
between files without detection; appending stays a plain ``O_APPEND`` write of one line. The
keyed hash chain of :mod:`xrayfed.common.privacy.ledger` (HMAC with a subkey of this key) detects
removed lines, and its head anchors detect a truncated tail. With a key configured, a ledger
line that is not encrypted is refused.

A wrong key or a modified file is a :class:`~xrayfed.common.errors.UserError`
(``<file>: cannot decrypt: wrong key or the file was modified``), never garbage.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Mapping

from xrayfed.common.errors import UserError
from xrayfed.common.files import atomic_write

log = logging.getLogger(__name__)

ENV_KEY = "XRAYFED_ATREST_KEY"
ENV_KEY_FILE = "XRAYFED_ATREST_KEY_FILE"
MAGIC = b"XRFENC"
VERSION = 1
HEADER_LEN = len(MAGIC) + 2 + 8 + 12  # magic, version, reserved, key id, nonce
TAG_LEN = 16
LINE_ALG = "aes-256-gcm/1"


class AtRestKey:
    """A 256-bit at-rest key (the secret never appears in repr/str/logs)."""

    __slots__ = ("_aes", "_ledger_mac", "key_id", "source")

    def __init__(self, raw: bytes, source: str = "key") -> None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        if len(raw) != 32:
            raise UserError(f"{source}: an at-rest key must be 32 bytes (64 hex digits), got {len(raw)} bytes")
        self._aes = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"xrayfed-atrest",
                         info=b"xrayfed at-rest AES-256-GCM v1").derive(raw)
        # A separate subkey keys the privacy ledger's HMAC chain (xrayfed.common.privacy.ledger).
        self._ledger_mac = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"xrayfed-atrest",
                                info=b"xrayfed ledger HMAC-SHA256 v1").derive(raw)
        self.key_id = hashlib.sha256(b"xrayfed-atrest-key-id\x00" + raw).digest()[:8]
        self.source = source

    @classmethod
    def generate(cls) -> "AtRestKey":
        return cls(os.urandom(32), source="generated key")

    def __repr__(self) -> str:
        return f"AtRestKey(id={self.key_id.hex()}, source={self.source!r})"

    __str__ = __repr__


# --------------------------------------------------------------------------- keys
def parse_key(text: str | bytes, source: str = "key") -> AtRestKey:
    """A key from its text form: 64 hex digits or base64 (standard or URL-safe) of 32 bytes."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise UserError(f"{source}: not a key (expected 64 hex digits or base64 of 32 bytes)") from None
    t = "".join(text.split())
    raw: bytes | None = None
    if len(t) == 64:
        try:
            raw = bytes.fromhex(t)
        except ValueError:
            raw = None
    if raw is None:
        try:
            raw = base64.b64decode(t.replace("-", "+").replace("_", "/") + "=" * (-len(t) % 4), validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != 32:
        raise UserError(f"{source}: not a key (expected 64 hex digits or base64 of 32 bytes)")
    return AtRestKey(raw, source=source)


def read_key_file(path: Path | str) -> AtRestKey:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"at-rest key file: no file at {path}")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        log.warning("at-rest key file %s is readable by other users; chmod 600 it", path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise UserError(f"at-rest key file {path}: cannot read ({e.strerror})") from None
    return parse_key(text, source=str(path))


def load_key(key_file: Path | str | None = None, env: Mapping[str, str] | None = None,
             required: bool = False) -> AtRestKey | None:
    """The configured at-rest key: ``key_file``, else $XRAYFED_ATREST_KEY_FILE, else
    $XRAYFED_ATREST_KEY; None when none is set (UserError if ``required``)."""
    env = os.environ if env is None else env
    if key_file:
        return read_key_file(key_file)
    if env.get(ENV_KEY_FILE):
        return read_key_file(env[ENV_KEY_FILE])
    if env.get(ENV_KEY):
        return parse_key(env[ENV_KEY], source=f"${ENV_KEY}")
    if required:
        raise UserError(f"no at-rest key: pass --atrest-key-file FILE or set {ENV_KEY_FILE} / {ENV_KEY} "
                        "(make one with `xrayfed certs atrest-key --out FILE`)")
    return None


def make_atrest_key(path: Path | str, *, force: bool = False) -> Path:
    """Write a fresh 256-bit at-rest key (64 hex digits, mode 0600) to ``path``; an existing file
    is replaced only with ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} already exists; refusing to overwrite a key without --force")
    atomic_write(path, (os.urandom(32).hex() + "\n").encode(), mode=0o600)
    return path


def add_key_argument(parser, help: str | None = None) -> None:
    """Add ``--atrest-key-file`` to an argparse parser (see :func:`load_key`)."""
    parser.add_argument("--atrest-key-file", type=Path, default=None, metavar="FILE",
                        help=(help or "encrypt checkpoints/ledgers at rest with this key")
                        + f" (default: ${ENV_KEY_FILE} or ${ENV_KEY}; none = plaintext)")


# --------------------------------------------------------------------------- bytes
def is_encrypted(blob: bytes) -> bool:
    return len(blob) >= len(MAGIC) and blob[: len(MAGIC)] == MAGIC


def _aad(header: bytes, context: bytes) -> bytes:
    return header + b"|" + context


def encrypt_bytes(data: bytes, key: AtRestKey, *, context: bytes = b"") -> bytes:
    """AES-256-GCM encrypt ``data`` (header + ciphertext + tag; see the module docstring)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    header = MAGIC + bytes([VERSION, 0]) + key.key_id + nonce
    return header + AESGCM(key._aes).encrypt(nonce, bytes(data), _aad(header, context))


def decrypt_bytes(blob: bytes, key: AtRestKey | None, *, context: bytes = b"", source: str = "data") -> bytes:
    """Inverse of :func:`encrypt_bytes`; a wrong key or any modification is a UserError."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not is_encrypted(blob):
        raise UserError(f"{source}: not an xrayfed encrypted file")
    if len(blob) < HEADER_LEN + TAG_LEN:
        raise UserError(f"{source}: cannot decrypt: wrong key or the file was modified (truncated)")
    version = blob[len(MAGIC)]
    if version != VERSION:
        raise UserError(f"{source}: encrypted with format version {version}; this xrayfed reads version {VERSION}")
    if key is None:
        raise UserError(f"{source}: the file is encrypted; pass --atrest-key-file or set {ENV_KEY_FILE} / {ENV_KEY}")
    header = blob[:HEADER_LEN]
    kid = header[len(MAGIC) + 2 : len(MAGIC) + 10]
    nonce = header[len(MAGIC) + 10 :]
    try:
        return AESGCM(key._aes).decrypt(nonce, blob[HEADER_LEN:], _aad(header, context))
    except InvalidTag:
        hint = " (it was encrypted with a different key)" if kid != key.key_id else ""
        raise UserError(f"{source}: cannot decrypt: wrong key or the file was modified{hint}") from None


# --------------------------------------------------------------------------- files
def write_encrypted(path: Path | str, data: bytes, key: AtRestKey | None, *, context: bytes = b"",
                    mode: int | None = None) -> None:
    """Atomically write ``data`` to ``path``, encrypted when ``key`` is set (else plaintext).

    ``mode``: file mode (default 0600 encrypted, 0644 plaintext).
    """
    payload = encrypt_bytes(data, key, context=context) if key is not None else bytes(data)
    atomic_write(Path(path), payload, mode=mode if mode is not None else (0o600 if key is not None else 0o644))


def read_maybe_encrypted(path: Path | str, key: AtRestKey | None, *, context: bytes = b"",
                         require_encrypted: bool = False) -> bytes:
    """The plaintext of ``path``: decrypted if it is encrypted, as-is otherwise.

    ``require_encrypted`` refuses a plaintext file (e.g. when a key is configured, so that a
    swapped-in unencrypted checkpoint is not silently accepted).
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    if is_encrypted(blob):
        return decrypt_bytes(blob, key, context=context, source=str(path))
    if require_encrypted:
        raise UserError(f"{path}: not encrypted, but an at-rest key is configured (refusing a plaintext file)")
    return blob


def save_checkpoint(path: Path | str, ckpt, key: AtRestKey | None) -> None:
    """:func:`xrayfed.common.checkpoint.save_checkpoint`, encrypted when ``key`` is set."""
    from xrayfed.common.checkpoint import to_bytes  # lazy: `xrayfed --help` loads this module, not torch

    write_encrypted(path, to_bytes(ckpt), key, context=b"checkpoint")


def load_checkpoint(path: Path | str, key: AtRestKey | None = None, *, require_encrypted: bool = False):
    """The checkpoint at ``path``: the one reader of checkpoint files, for every command.

    An encrypted file is decrypted with ``key``; without a key it is the one line ``<path>: the
    file is encrypted; pass --atrest-key-file or set ...``, the same for every command (serve-inference,
    explain, export, certs decrypt-checkpoint, the server). ``require_encrypted`` refuses a plaintext
    file (a run directory with a key configured). A wrong key or a modified file is one line too."""
    from xrayfed.common.checkpoint import from_bytes  # lazy: `xrayfed --help` loads this module, not torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint: no file at {path}")
    data = read_maybe_encrypted(path, key, context=b"checkpoint", require_encrypted=require_encrypted)
    return from_bytes(data, source=str(path))


# --------------------------------------------------------------------------- JSON lines
def _line_aad(key_id: bytes, line_no: int, context: bytes) -> bytes:
    return b"xrayfed-line/1|" + key_id + b"|" + str(int(line_no)).encode() + b"|" + context


def encrypt_line(text: str, key: AtRestKey, *, line_no: int, context: bytes = b"ledger") -> str:
    """One encrypted JSON line (no newline) holding ``text``; ``line_no`` is bound to it."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if "\n" in text:
        raise ValueError("encrypt_line: text must be a single line")
    nonce = os.urandom(12)
    ct = AESGCM(key._aes).encrypt(nonce, text.encode("utf-8"), _line_aad(key.key_id, line_no, context))
    return json.dumps({"enc": LINE_ALG, "kid": key.key_id.hex(), "n": int(line_no),
                       "ct": base64.b64encode(nonce + ct).decode("ascii")}, separators=(",", ":"))


def is_encrypted_line(line: str) -> bool:
    s = line.lstrip()
    return s.startswith('{"enc":') and LINE_ALG in s[:40]


def decrypt_line(line: str, key: AtRestKey | None, *, line_no: int, context: bytes = b"ledger",
                 source: str = "ledger") -> str:
    """Inverse of :func:`encrypt_line` for the line at ``line_no`` (UserError if wrong/modified)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    where = f"{source}: line {line_no}"
    try:
        obj = json.loads(line)
        if obj.get("enc") != LINE_ALG:
            raise ValueError
        blob = base64.b64decode(obj["ct"], validate=True)
        kid = bytes.fromhex(obj["kid"])
    except (ValueError, KeyError, TypeError, binascii.Error, AttributeError):
        raise UserError(f"{where}: cannot decrypt: wrong key or the file was modified (not an encrypted line)") from None
    if key is None:
        raise UserError(f"{where}: the file is encrypted; pass --atrest-key-file or set {ENV_KEY_FILE} / {ENV_KEY}")
    if len(blob) < 12 + TAG_LEN:
        raise UserError(f"{where}: cannot decrypt: wrong key or the file was modified")
    try:
        return AESGCM(key._aes).decrypt(blob[:12], blob[12:], _line_aad(key.key_id, line_no, context)).decode("utf-8")
    except InvalidTag:
        hint = " (it was encrypted with a different key)" if kid != key.key_id else ""
        raise UserError(f"{where}: cannot decrypt: wrong key or the file was modified{hint}") from None
