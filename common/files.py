"""Crash-safe file writes (torch-free): the one place files are replaced atomically."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path | str, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename (never half-written).

    ``mode`` is applied regardless of the umask (default 0600: owner only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
