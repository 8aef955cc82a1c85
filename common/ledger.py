"""Append-only, tamper-evident JSON-lines files (the hospitals' privacy ledgers).

Every line is a JSON object carrying ``seq`` (0, 1, 2, ...), ``prev_hash`` (the previous
line's ``hash``; 64 zeros for the first line) and ``hash`` = SHA-256 over ``prev_hash`` and the
canonical JSON of the line without ``hash``. Editing, deleting, reordering or inserting a line
breaks the chain at that line; :func:`read_ledger` then refuses the file and names the line.

Appends are ``O_APPEND`` writes followed by ``fsync``, so a crash never loses a line that was
reported written. (A truncated last line from a crash mid-write is reported as broken.)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import UserError

GENESIS = "0" * 64


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


def read_ledger(path: Path | str) -> list[dict[str, Any]]:
    """All records of a ledger, after verifying the whole hash chain.

    Raises :class:`LedgerError` naming the first bad line. A missing file is an empty ledger.
    """
    path = Path(path)
    if not path.exists():
        return []
    records: list[dict[str, Any]] = []
    prev = GENESIS
    with path.open("r", encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                raise LedgerError(path, n, "empty line")
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


def append_record(path: Path | str, record: dict[str, Any]) -> dict[str, Any]:
    """Verify the chain, then append ``record`` (plus seq/prev_hash/hash) durably; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = read_ledger(path)
    prev = existing[-1]["hash"] if existing else GENESIS
    body = {k: v for k, v in record.items() if k not in ("seq", "prev_hash", "hash")}
    body["seq"] = len(existing)
    body["prev_hash"] = prev
    full = dict(body, hash=line_hash(prev, body))
    data = (json.dumps(full, sort_keys=True, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return full
