"""Logging set-up, one place for every xrayfed process (the CLI, and the ServerApp/ClientApp
processes that Flower starts on its own)."""

from __future__ import annotations

import logging
import re
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
    # Flower's logger has its own console handler and logs at DEBUG: passed on to the root
    # logger too, every Flower line would be printed twice and its DEBUG lines once.
    logging.getLogger("flwr").propagate = False


def configure_flower_logging(verbose: bool = False, stream: IO[str] | None = None) -> None:
    """Flower's console handler (in a process that imported Flower): INFO (DEBUG with
    ``verbose``), and colours only when ``stream`` (default: stderr) is a terminal; Flower
    colours its level names with escape codes otherwise, also in files and pipes."""
    from flwr.common.logger import update_console_handler

    out = stream or sys.stderr
    update_console_handler(level=logging.DEBUG if verbose else logging.INFO,
                           colored=bool(getattr(out, "isatty", lambda: False)()))
    logging.getLogger("flwr").propagate = False


#: An ANSI escape sequence (colours, cursor moves): what :func:`strip_ansi` removes.
ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences (Flower colours its level names)."""
    return ANSI_ESCAPE.sub("", text)


_LEVELS = r"(?P<level>DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)"
#: Where a line of another process's output starts a log record, and whose it is.
_RECORD_STARTS = (
    # xrayfed's logging (configure_logging): "[HH:MM:SS ]LEVEL name: message"
    re.compile(rf"^(?:\d\d:\d\d:\d\d )?{_LEVELS} (?P<name>[A-Za-z_][\w.]*): "),
    # Flower's console handler "LEVEL :   message", uvicorn's "LEVEL:     message"
    re.compile(rf"^{_LEVELS}\s*(?:\d[\d :.,/-]*)?:\s"),
    # the SuperLink's access log "2026-01-01T00:00:00.000Z LEVEL [uvicorn.access] ...",
    # the ServerApp's streamed log "01/01/2026 00:00:00:LEVEL:message"
    re.compile(rf"^\d[\d/:.TZ -]*[ :]{_LEVELS}[ :]"),
    # Python's warnings ("path.py:12: UserWarning: ...")
    re.compile(r"^\S+:\d+: (?P<warning>\w*Warning): "),
)


class LogRelay:
    """Which lines of a child process's output (a SuperNode with its ClientApps, a SuperLink,
    ``flwr run``) reach the user: without ``verbose`` xrayfed's own lines (``[xrayfed] ...``,
    ``xrayfed: ...``, records of the ``xrayfed`` loggers) and every ERROR/CRITICAL record, whoever
    wrote it; Flower's, gRPC's, uvicorn's, Ray's lines and Python warnings only with ``verbose``.
    A line that starts no record (a traceback, a continued message) goes with the record before
    it; a traceback is always shown. Escape codes are removed unless ``keep_colours``. One relay per stream (it remembers the
    last record)."""

    def __init__(self, verbose: bool = False, keep_colours: bool = False) -> None:
        self.verbose, self.keep_colours = verbose, keep_colours
        self._last = True

    def is_ours(self, line: str) -> bool:
        """Whether ``line`` (without escape codes) is one a user sees without ``verbose``."""
        plain = strip_ansi(line).rstrip("\r\n")
        if "[xrayfed]" in plain or plain.startswith(("xrayfed:", "Traceback (most recent call last)")):
            self._last = True
            return True
        for pattern in _RECORD_STARTS:
            m = pattern.match(plain)
            if m is None:
                continue
            d = m.groupdict()
            if d.get("warning"):
                self._last = False
            else:
                level = d["level"]
                self._last = level in ("ERROR", "CRITICAL") or str(d.get("name") or "").startswith("xrayfed")
            return self._last
        if not plain.strip() or plain[:1].isspace() or plain.startswith("During handling") \
                or re.match(r"^\w+(\.\w+)*(Error|Exception|Exit|Interrupt)\b", plain):
            return self._last  # a continuation (indented, a traceback) goes with its record
        self._last = False  # a third party's print ("Successfully installed ...", "Using SuperLink ...")
        return False

    def __call__(self, line: str) -> str | None:
        """``line`` as the user sees it, or None when it is shown only with ``verbose``."""
        keep = self.is_ours(line) or self.verbose
        if not keep:
            return None
        return line if self.keep_colours else strip_ansi(line)


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
