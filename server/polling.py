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

import threading
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


#: Seconds before a reply's part (an object) that is not on the SuperLink yet is asked for again,
#: doubling on each miss up to Flower's cap (10 s); Flower starts at 1 s.
OBJECT_RETRY_S = 0.05


def prompt_object_pulls() -> None:
    """A reply is listed by the SuperLink as soon as the SuperNode has pushed the message, and its
    parts (the model's arrays: objects) follow it; a pull of the reply in between finds a part
    missing, and Flower 1.41 asks for it again after 1 s (``PULL_INITIAL_BACKOFF``), then 2 s, 4 s…
    (``flwr/supercore/inflatable/inflatable_utils.py``: ``pull_objects``). The ServerApp asks its
    own SuperLink (loopback), so here a missing part is asked for again after ``OBJECT_RETRY_S``,
    doubling as in Flower. Only where the ServerApp's grid pulls (``flwr.superlink.grid.http_grid``;
    called by the ServerApp at its start)."""
    import sys

    from xrayfed.common.flower_launch import prompt_object_pulls as prompt

    grid_module = sys.modules.get("flwr.superlink.grid.http_grid")
    if grid_module is not None and hasattr(grid_module, "pull_objects"):
        prompt(grid_module, OBJECT_RETRY_S)


# --------------------------------------------------------------------------- the ServerApp's end
class _UploaderClock:
    """Flower's ``time`` module as ``flwr.supercore.logger`` sees it: counts the sleeps its log
    uploader thread begins (it sleeps once after each pass: take every queued line, push them)
    and notes whether the pass before each one pushed without an error."""

    def __init__(self, module) -> None:
        self._module = module
        self.sleeps = 0
        self.clean = 0  # sleeps begun after a pass whose push (if any) went through
        self.failed = False

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        if not self.failed:
            self.clean += 1
        self._module.sleep(seconds)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


#: Seconds between two looks at the log queue and the uploader while the ServerApp ends.
FLUSH_LOOK_S = 0.01


def _uploader(logger) -> threading.Thread | None:
    """The thread running Flower's ``_log_uploader`` in this process (None when there is none)."""
    for t in threading.enumerate():
        if getattr(t, "_target", None) is logger._log_uploader and t.is_alive():  # noqa: SLF001
            return t
    return None


def prompt_log_flush() -> None:
    """Flower 1.41's ServerApp process, once its app has returned, waits for its queue of log
    lines to empty and then 1 s more before it reports the run finished
    (``flwr.supercore.logger.flush_logs``, called from ``flwr/superlink/runtime/run_serverapp.py``):
    the SuperLink's log stream to ``flwr run --stream`` ends at that report, so lines pushed after
    it would not reach the operator. The 1 s is a guess at how long the last push takes; here the
    flush waits for the queue to empty and then for the uploader to begin a sleep after a pass
    whose push went through (it sleeps after each pass: at most Flower's upload interval, 0.2 s,
    plus the push; a failed push is tried again in the next pass). It returns at once when the
    uploader is gone, and within Flower's timeout (3 s) in any case. Where the uploader thread is
    not found (another Flower), Flower's own flush stays. Only in a ``flwr-serverapp`` process."""
    import sys

    import flwr.supercore.logger as logger

    runner = sys.modules.get("flwr.superlink.runtime.run_serverapp")
    if runner is None or not hasattr(runner, "flush_logs") or getattr(runner.flush_logs, "_xrayfed", False):
        return
    uploader = _uploader(logger)
    args = getattr(uploader, "_args", ())  # (log_queue, node_id, run_id, client) while it runs
    if uploader is None or len(args) != 4:
        return
    clock = _UploaderClock(logger.time)
    client = args[3]  # the uploader's own: it looks its `PushLogs` up at each push
    push = client.PushLogs

    def noting_push(request):
        try:
            out = push(request)
        except BaseException:
            clock.failed = True
            raise
        clock.failed = False
        return out

    try:
        client.PushLogs = noting_push
    except AttributeError:  # a client that takes no attribute: Flower's own flush stays
        return
    logger.time = clock

    def flush_logs(log_queue, timeout: float = 3.0) -> bool:
        deadline = time.monotonic() + timeout
        while not log_queue.empty():
            if time.monotonic() >= deadline or not uploader.is_alive():
                return False
            time.sleep(FLUSH_LOOK_S)
        begun = clock.clean
        while clock.clean == begun:  # a clean sleep begun now follows the push of every line taken so far
            if time.monotonic() >= deadline or not uploader.is_alive():
                return False
            time.sleep(FLUSH_LOOK_S)
        return True

    flush_logs._xrayfed = True  # type: ignore[attr-defined]
    runner.flush_logs = flush_logs
