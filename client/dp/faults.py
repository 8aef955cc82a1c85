"""Deliberate DP faults for the privacy audit's benchmark and tests — never part of a hospital's run.

The audit (:mod:`xrayfed.client.audit`) must be able to fail: with one of these faults injected
the audited lower bound on ε must exceed the claimed ε. The switch is a Python context manager
only (:func:`injected`): no command, config key or environment variable reaches it, and with no
fault injected (the only state a hospital's process is ever in) every hook below is the identity.

* ``noise_0.1``: the Gaussian noise is drawn with 0.1 × σC instead of σC.
* ``no_clipping``: per-unit gradients are summed unclipped (the noise is still σC).
* ``accountant_half_q``: the accountant (planning σ, and the ε it reports) is told the sample
  rate q/2 while training samples at q.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

FAULTS: tuple[str, ...] = ("noise_0.1", "no_clipping", "accountant_half_q")

_active: str | None = None


@contextmanager
def injected(name: str) -> Iterator[None]:
    """Run the block with fault ``name`` (one of :data:`FAULTS`) in this process's DP code."""
    global _active
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
    before, _active = _active, name
    try:
        yield
    finally:
        _active = before


def active() -> str | None:
    """The injected fault, or None (always None in a hospital's run)."""
    return _active


def noise_scale() -> float:
    """Factor on the noise std σC (1 unless ``noise_0.1``)."""
    return 0.1 if _active == "noise_0.1" else 1.0


def clipping_on() -> bool:
    """Whether per-unit gradients are clipped to C (True unless ``no_clipping``)."""
    return _active != "no_clipping"


def accountant_rate(q: float) -> float:
    """The sample rate the accountant is told for a plan sampling at ``q`` (q unless
    ``accountant_half_q``)."""
    return q / 2 if _active == "accountant_half_q" else q
