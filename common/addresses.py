"""``HOST:PORT`` addresses: the one parser every command and config uses (torch-free)."""

from __future__ import annotations

from xrayfed.common.errors import UserError


def split_hostport(value: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (``[::1]:9092`` for IPv6); ``ValueError`` otherwise.
    Port 0 ("any free port") only with ``allow_port_zero``."""
    host, sep, port = str(value).rpartition(":")
    low = 0 if allow_port_zero else 1
    if not sep or not host or not port.isdigit() or not low <= int(port) < 65536:
        raise ValueError("expected HOST:PORT (e.g. 127.0.0.1:9092)")
    return host.strip("[]"), int(port)


def parse_hostport(value: str, what: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """:func:`split_hostport` for a command-line value: one-line ``UserError`` naming ``what``."""
    try:
        return split_hostport(value, allow_port_zero=allow_port_zero)
    except ValueError:
        raise UserError(f"{what} {value!r}: expected HOST:PORT (e.g. 127.0.0.1:9092)") from None
