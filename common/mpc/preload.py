"""Imported by the worker pool's fork server (the zygote) only, and on purpose for its side
effect: torch, CrypTen (through the import shim), the party code and what a party loads
(checkpoint, model) are imported once there, so each session's worker is a fork that pays no
import."""

from xrayfed.common import checkpoint, model  # noqa: F401  (what a party loads per session)
from xrayfed.common.mpc import parties  # noqa: F401  (torch + the party code)
from xrayfed.common.mpc.compat import import_crypten

import_crypten()
