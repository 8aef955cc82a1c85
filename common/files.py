"""Crash-safe file writes (torch-free): the one place files are replaced atomically."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def atomic_write(path: Path | str, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename (never half-written).

    ``mode`` is applied regardless of the umask (default 0600: owner only). The temp file has an
    unpredictable name and is created exclusively, never through a symbolic link: in a folder other
    users can write to, nobody can make the write land on (or re-mode) a file of their choosing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
