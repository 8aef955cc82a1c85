"""The ServerApp's ``Grid`` with a short reply poll, and a record of each exchange's timing.

Flower 1.41's ``Grid.send_and_receive`` (``flwr/superlink/grid/http_grid.py``) pushes the
messages and then asks the SuperLink for replies every 3 s: a round whose hospitals all replied
waited on average 1.5 s more (a SecAgg+ round, four exchanges, about 6 s). :class:`PromptGrid`
asks every ``REPLY_POLL_S`` instead. The ServerApp and its SuperLink run on the operator's
machine (the ServerAppIo API on loopback), so the shorter poll costs a few small local requests
per second and nothing on the hospitals' network.

Every exchange is noted in :attr:`PromptGrid.calls` (message type, how many messages and replies,
when it started and ended, Unix seconds): what the round's breakdown in ``metrics.jsonl`` is made of.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

#: Seconds between two asks for replies (Flower's own: 3 s).
REPLY_POLL_S = 0.2


class PromptGrid:
    """Wraps a Flower ``Grid`` (everything else is the wrapped grid's)."""

    def __init__(self, grid, poll_s: float = REPLY_POLL_S) -> None:
        self._grid = grid
        self.poll_s = float(poll_s)
        self.calls: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable, *, timeout: float | None = None) -> list:
        """Push ``messages``, then collect their replies until all are in or ``timeout``
        seconds have passed (None: no limit), as Flower's own does, asking every ``poll_s``."""
        msgs = list(messages)
        kind = msgs[0].metadata.message_type if msgs else ""
        start = time.time()
        ids = set(self._grid.push_messages(msgs))
        end = None if timeout is None else start + timeout
        replies: list = []
        while ids:
            got = list(self._grid.pull_messages(ids))
            replies.extend(got)
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if not ids or (end is not None and time.time() >= end):
                break
            time.sleep(self.poll_s if end is None else max(0.0, min(self.poll_s, end - time.time())))
        self.calls.append({"type": kind, "sent": len(msgs), "replies": len(replies), "start": start,
                           "end": time.time()})
        return replies


#: The per-hospital stages of :data:`xrayfed.common.protocol.rounds.TIME_METRICS`, as the
#: breakdown names them.
HOSPITAL_STAGES = (("startup_s", "time_startup_s"), ("data_s", "time_data_s"), ("train_s", "time_train_s"),
                   ("local_s", "time_local_s"))


def round_breakdown(calls: list[dict[str, Any]], round_start: float, eval_start: float, eval_s: float, now: float,
                    hospitals: list[dict[str, Any]]) -> dict[str, Any]:
    """Where one round's seconds went, from the server's clock and the hospitals' own figures:

    ``wait_s`` (from the round's start to its first message: waiting for enough hospitals),
    ``exchange_s`` (first message sent → last reply in, every exchange of the round),
    ``hospital_s`` (the slowest hospital's own time, ``startup_s`` + ``data_s`` + ``train_s`` +
    ``local_s``, each of its stages given for that hospital), ``transfer_s`` (``exchange_s`` −
    ``hospital_s``: serialisation, the network and Flower's polling), ``aggregate_s`` (last reply
    → evaluation), ``eval_s`` (server-side evaluation) and ``other_s`` (checkpoints, the rest).
    ``calls``: this round's :attr:`PromptGrid.calls`; times are Unix seconds."""
    def own(h: dict[str, Any]) -> float:
        return sum(float(h.get(k) or 0.0) for _, k in HOSPITAL_STAGES)

    out: dict[str, Any] = {"total_s": now - round_start}
    first = min((c["start"] for c in calls), default=None)
    out["wait_s"] = max(0.0, (first if first is not None else now) - round_start)
    exchange = sum(c["end"] - c["start"] for c in calls)
    out["exchange_s"] = exchange
    timed = [h for h in hospitals if any(h.get(k) is not None for _, k in HOSPITAL_STAGES)]
    slowest = max(timed, key=own, default=None)
    out["hospital_s"] = own(slowest) if slowest is not None else 0.0
    if slowest is not None:
        out["slowest"] = str(slowest.get("hospital", "?"))
        out.update({name: float(slowest.get(k) or 0.0) for name, k in HOSPITAL_STAGES})
    out["transfer_s"] = max(0.0, exchange - out["hospital_s"])
    replied_by = max((c["end"] for c in calls), default=None)
    out["aggregate_s"] = max(0.0, eval_start - replied_by) if replied_by is not None else 0.0
    out["eval_s"] = eval_s
    out["other_s"] = max(0.0, out["total_s"] - out["wait_s"] - exchange - out["aggregate_s"] - eval_s)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def breakdown_text(t: dict[str, Any]) -> str:
    """The summary line's part: ``wait W | hospitals H (start-up S, data D, DP training T, local L) |
    transfer X | aggregate A | eval E`` (seconds)."""
    hosp = f"hospitals {t.get('hospital_s', 0):.1f}s"
    if "slowest" in t:
        hosp += (f" (start-up {t['startup_s']:.1f}, data {t['data_s']:.1f}, DP training {t['train_s']:.1f}, "
                 f"local {t['local_s']:.1f})")
    return (f"wait {t.get('wait_s', 0):.1f}s, {hosp}, transfer {t.get('transfer_s', 0):.1f}s, "
            f"aggregate {t.get('aggregate_s', 0):.1f}s, eval {t.get('eval_s', 0):.1f}s")
