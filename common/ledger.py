"""Append-only, tamper-evident JSON-lines files (the hospitals' privacy ledgers).

Every line is a JSON object carrying ``seq`` (0, 1, 2, ...), ``prev_hash`` (the previous
line's ``hash``; 64 zeros for the first line) and ``hash`` = SHA-256 over ``prev_hash`` and the
canonical JSON of the line without ``hash``. Editing, deleting, reordering or inserting a line
breaks the chain at that line; :func:`read_ledger` then refuses the file and names the line.

Appends are ``O_APPEND`` writes followed by ``fsync``, so a crash never loses a line that was
reported written. (A truncated last line from a crash mid-write is reported as broken.)

**Encryption at rest** (optional ``key``, an :class:`~xrayfed.common.atrest.AtRestKey`): every
line is then written as its own AES-256-GCM encrypted JSON line
(:func:`xrayfed.common.atrest.encrypt_line`, its line number authenticated). The hash chain is
computed over the *plaintext* records, exactly as without a key, so an encrypted ledger is
verified the same way once decrypted. Reading an encrypted ledger without a key, or with the
wrong one, is a one-line :class:`~xrayfed.common.errors.UserError` naming the file (never a
silently wrong ε). A ledger may start in plaintext and continue encrypted (encryption switched
on later: the budget history is kept); a plaintext line *after* an encrypted one is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    from .atrest import AtRestKey

GENESIS = "0" * 64
LEDGER_CONTEXT = b"ledger"


class LedgerError(UserError):
    """A ledger file whose hash chain is broken (or that is not a ledger at all)."""

    def __init__(self, path: Path | str, line: int, reason: str) -> None:
        self.path = str(path)
        self.line = line  # 1-based line number in the file
        self.reason = reason
        super().__init__(f"{path}: line {line}: {reason}; the ledger was modified and cannot be trusted")


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def line_hash(prev_hash: str, record_without_hash: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + _canonical(record_without_hash)).hexdigest()


def read_ledger(path: Path | str, key: "AtRestKey | None" = None) -> list[dict[str, Any]]:
    """All records of a ledger, after verifying the whole hash chain.

    Raises :class:`LedgerError` naming the first bad line. A missing file is an empty ledger.
    Encrypted lines need ``key`` (see the module docstring); without it, or with the wrong
    key, a :class:`~xrayfed.common.errors.UserError` names the file.
    """
    from .atrest import ENV_KEY, ENV_KEY_FILE, decrypt_line, is_encrypted_line

    path = Path(path)
    if not path.exists():
        return []
    records: list[dict[str, Any]] = []
    prev = GENESIS
    encrypted_from: int | None = None
    with path.open("r", encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                raise LedgerError(path, n, "empty line")
            if is_encrypted_line(raw):
                if key is None:
                    raise UserError(f"{path}: the ledger is encrypted; pass --atrest-key-file FILE or set "
                                    f"{ENV_KEY_FILE} / {ENV_KEY}")
                encrypted_from = encrypted_from or n
                raw = decrypt_line(raw.strip(), key, line_no=n, context=LEDGER_CONTEXT, source=str(path))
            elif encrypted_from is not None:
                raise LedgerError(path, n, f"plaintext line after encrypted lines (from line {encrypted_from})")
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                raise LedgerError(path, n, "not valid JSON (truncated or edited)") from None
            if not isinstance(rec, dict) or "hash" not in rec:
                raise LedgerError(path, n, "no hash field")
            body = {k: v for k, v in rec.items() if k != "hash"}
            if body.get("seq") != n - 1:
                raise LedgerError(path, n, f"sequence number {body.get('seq')!r}, expected {n - 1} (line removed or inserted)")
            if body.get("prev_hash") != prev:
                raise LedgerError(path, n, "prev_hash does not match the line before (line removed, inserted or reordered)")
            if line_hash(prev, body) != rec["hash"]:
                raise LedgerError(path, n, "hash does not match the line's content (line edited)")
            prev = rec["hash"]
            records.append(rec)
    return records


def append_record(path: Path | str, record: dict[str, Any], key: "AtRestKey | None" = None) -> dict[str, Any]:
    """Verify the chain, then append ``record`` (plus seq/prev_hash/hash) durably; returns it.

    With ``key`` the line is written encrypted (the chain is over the plaintext record).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = read_ledger(path, key)
    prev = existing[-1]["hash"] if existing else GENESIS
    body = {k: v for k, v in record.items() if k not in ("seq", "prev_hash", "hash")}
    body["seq"] = len(existing)
    body["prev_hash"] = prev
    full = dict(body, hash=line_hash(prev, body))
    line = json.dumps(full, sort_keys=True, allow_nan=False)
    if key is not None:
        from .atrest import encrypt_line

        line = encrypt_line(line, key, line_no=len(existing) + 1, context=LEDGER_CONTEXT)
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return full
