"""Logging set-up, one place for every xrayfed process (the CLI, and the ServerApp/ClientApp
processes that Flower starts on its own)."""

from __future__ import annotations

import logging


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
