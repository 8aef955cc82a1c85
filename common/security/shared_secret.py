"""The secret the hospital's inference service and the crypto provider share (a file each side
reads; the crypto provider compares it in constant time)."""

from __future__ import annotations

from pathlib import Path

from xrayfed.common.errors import UserError


def read_secret(path: Path | None, what: str) -> bytes | None:
    """The secret in ``path`` (None when no path is given); at least 16 characters."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what}: no file at {p}")
    secret = p.read_bytes().strip()
    if len(secret) < 16:
        raise UserError(f"{what} {p}: too short (use e.g. `openssl rand -hex 32 > {p}`)")
    return secret
