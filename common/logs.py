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
