"""The secret the hospital's inference service and the crypto provider share (a file each side
reads; the crypto provider compares it in constant time). ``xrayfed certs init`` makes it
(:func:`make_shared_secret`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from xrayfed.common.errors import UserError
from xrayfed.common.files import atomic_write

#: File name of the secret in each party's folder of ``xrayfed certs init``.
SECRET_NAME = "crypto-provider.secret"
SECRET_MODE = 0o600


def make_shared_secret(paths: Sequence[Path]) -> bool:
    """Make every file of ``paths`` hold the same secret (256 random bits as 64 hex digits, mode
    0600). An existing secret is never overwritten: it is kept (its mode narrowed to 0600) and
    copied to the paths that lack it (two existing copies that differ, or one shorter than 16
    characters: one-line UserError). Returns whether a new secret was
    made."""
    paths = [Path(p) for p in paths]
    have = {p: p.read_bytes().strip() for p in paths if p.is_file()}
    if len(set(have.values())) > 1:
        raise UserError(f"{' and '.join(map(str, have))}: two different crypto-provider secrets; delete the one "
                        "that is not in use and run again")
    secret = next(iter(have.values()), None)
    if secret is not None and len(secret) < 16:
        raise UserError(f"{' and '.join(map(str, have))}: the existing crypto-provider secret is too short (at least "
                        "16 characters); delete it and run again to make a new one")
    for p in have:  # a kept copy (perhaps made by hand) is the owner's alone, as a new one is
        if os.name == "posix" and p.stat().st_mode & 0o077:
            os.chmod(p, SECRET_MODE)
    made = secret is None
    if made:
        secret = os.urandom(32).hex().encode()
    for p in paths:
        if p not in have:
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(p, secret + b"\n", mode=SECRET_MODE)
    return made


def read_secret(path: Path | None, what: str) -> bytes | None:
    """The secret in ``path`` (None when no path is given); at least 16 characters. A file other
    users can read is used, with a warning naming it (never its content)."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what}: no file at {p}")
    if os.name == "posix" and p.stat().st_mode & 0o077:
        logging.getLogger(__name__).warning("%s %s is readable by other users; chmod 600 it", what, p)
    secret = p.read_bytes().strip()
    if len(secret) < 16:
        raise UserError(f"{what} {p}: too short (at least 16 characters; `xrayfed certs init` makes one: "
                        f"inference/{SECRET_NAME} and crypto-provider/{SECRET_NAME} of its --out folder)")
    return secret
