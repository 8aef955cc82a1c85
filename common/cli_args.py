"""What the role's ``commands`` modules share: a handler that imports its module only when
its command runs (so ``xrayfed --help`` imports no torch, flwr or CrypTen)."""

from __future__ import annotations

import importlib
from typing import Callable


def handler(module: str, function: str) -> Callable:
    """``function`` of ``module``, imported when the command runs."""

    def run(args):
        return getattr(importlib.import_module(module), function)(args)

    run.__qualname__ = f"{module}.{function}"
    return run
