"""One MPC session's parameters and ranks, and its communication statistics."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

MODEL_OWNER_RANK = 0  # the hospital's inference service: holds the weights
PROVIDER_RANK = 1  # the crypto provider: the second computing party
WORLD_SIZE = 2  # computing parties; the patient deals the randomness and is no CrypTen rank


@dataclass
class SessionParams:
    """How one MPC session runs. ``session_id`` is secret (a TLS-protected capability of the patient)."""

    session_id: str
    timeout_s: float = 120.0
    threads: int = 1  # torch intra-op threads per party
    batch: int = 1  # scans per session (the service: always 1; the benchmark may batch)

    def to_dict(self) -> dict:
        return asdict(self)


def comm_stats(comm) -> dict:
    """CrypTen's counters of one party (rounds, bytes, time in communication)."""
    with contextlib.suppress(Exception):
        s = comm.get_communication_stats()
        return {"rounds": int(s["rounds"]), "bytes": int(s["bytes"]), "comm_time_s": float(s["time"])}
    return {}
