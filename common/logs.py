"""Logging set-up, one place for every xrayfed process (the CLI, and the ServerApp/ClientApp
processes that Flower starts on its own)."""

from __future__ import annotations

import logging
import sys
from typing import IO

#: What --insecure exposes on Flower's channels, and on xrayfed's own gRPC services.
FLEET_EXPOSED = ("traffic, model updates and keys are readable and forgeable on the network, and hospitals are "
                 "not authenticated")
RPC_EXPOSED = "tokens and session ids travel in the clear"


def configure_logging(verbose: bool = False, timestamps: bool = False) -> None:
    """INFO (DEBUG with ``verbose``) to stderr. HTTP client libraries are kept at WARNING unless
    ``verbose``: they log one line per Flower request (the Fleet gateway forwards many)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=("%(asctime)s " if timestamps else "") + "%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def warn_insecure(what: str, exposed: str, stream: IO[str] | None = None) -> str:
    """Print (and return) the one warning line of ``--insecure``: what runs without TLS and what
    that exposes (:data:`FLEET_EXPOSED`, :data:`RPC_EXPOSED`)."""
    line = f"xrayfed: WARNING: --insecure: {what} runs WITHOUT TLS ({exposed}); use it for local experiments only"
    print(line, file=stream or sys.stderr, flush=True)
    return line


#: Longest text of another party's (a hospital's refusal reason, a peer's error) put in one log line.
UNTRUSTED_MAX_CHARS = 300


def untrusted(text: object, limit: int = UNTRUSTED_MAX_CHARS) -> str:
    """``text`` from another party made safe for one log or report line: every control or line-
    separator character (newline, carriage return, escape sequences, U+2028…) is written as its
    escape (``\\n``, ``\\x1b``), and the text is cut to ``limit`` characters (``…``). Callers put
    it in quotes after whose text it is (``hospital h1's reason: "…"``), so it can never pass
    for a line of this process's own."""
    s = str(text)
    out = []
    for ch in s[: limit + 1]:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif o < 0x20 or o == 0x7F or 0x80 <= o < 0xA0 or ch in "\u2028\u2029\u0085":
            out.append(repr(ch)[1:-1] if ch not in "\u2028\u2029" else f"\\u{o:04x}")
        else:
            out.append(ch)
    s2 = "".join(out)
    if len(s) > limit:
        s2 = s2[: max(0, limit - 1)] + "…"
    return s2
