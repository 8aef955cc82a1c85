"""How long a hospital's request took, by stage: what it reports with its reply.

Stages (seconds, wall clock, :data:`~xrayfed.common.protocol.rounds.TIME_METRICS`):
``time_startup_s`` (the ClientApp process's start and imports up to the request, torch included
when it trains in its own process), ``time_data_s`` (decoding this hospital's scans; near 0 once
a warm worker holds them), ``time_train_s`` (the ledger, the model's checks, Opacus' set-up and
DP-SGD, caching the released update), ``time_local_s`` (handing the request to the hospital's
warm worker and its reply back, serialisation included). They are not private (the server could
time the reply anyway) and travel in plaintext with the reply's other figures.
"""

from __future__ import annotations

import time
from typing import Any


def train_timed(cfg, config: dict[str, Any], state_dict: dict, atrest_key=None) -> dict[str, Any]:
    """:func:`xrayfed.client.hospital.train_round`, with ``time_data_s`` and ``time_train_s``
    added to its metrics. The scans are decoded first (once per process: cached) only when the
    request passes :func:`~xrayfed.client.hospital.check_request`, as ``train_round`` does."""
    from xrayfed.client.hospital import check_request, load_local_data, train_round
    from xrayfed.common.protocol.rounds import RoundRequest

    t0 = time.perf_counter()
    data_s = 0.0
    try:
        req = RoundRequest.from_config(config)
        check_request(cfg, req)
        load_local_data(cfg, req.image_size, req.task)
        data_s = time.perf_counter() - t0
    except Exception:  # noqa: BLE001 - train_round refuses or raises it in its own words
        pass
    reply = train_round(cfg, config, state_dict, atrest_key=atrest_key)
    reply["metrics"] = dict(reply["metrics"], time_data_s=data_s, time_train_s=time.perf_counter() - t0 - data_s)
    return reply


def evaluate_timed(cfg, config: dict[str, Any], state_dict: dict) -> dict[str, float]:
    """:func:`xrayfed.client.hospital.evaluate_round` (its metrics are aggregates only)."""
    from xrayfed.client.hospital import evaluate_round

    return evaluate_round(cfg, config, state_dict)


def process_age_s() -> float:
    """Seconds since this process started (0 when that cannot be read). On Linux from its start in
    clock ticks since boot (``/proc/self/stat``) against the boot clock: exact to a tick.
    ``psutil.Process().create_time()`` adds the boot time, which Linux gives in whole seconds,
    so its ages are off by up to a second (0.67 s on the machine this was measured on)."""
    import os

    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5), counted after the name
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - a figure for the report, never a reason to fail a round
        return 0.0
