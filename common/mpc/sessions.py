"""The table of MPC sessions a service runs (the hospital's inference service and the crypto
provider use the same one).

A bounded number of slots; one worker process per session, forked from the warm
:class:`~xrayfed.common.mpc.pool.WorkerPool`; a watcher thread per session that tears it down when
it ends, fails, times out or (optionally) is not joined in time, frees its slot and reports the
outcome; the patient's :class:`Exchange` with a running session (its input in, this party's
output share back); and :meth:`SessionTable.stop_all` at shutdown.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable

from xrayfed.common.mpc import dealer
from xrayfed.common.mpc.pool import WorkerPool, stop_worker, watch_worker


class Exchange:
    """The patient's one exchange with a session's party: its input is forwarded to the worker
    (once: a second attempt is refused) and this party's output share is handed back.
    ``meta`` is what the service needs to check the patient's request (e.g. the token id that
    opened the session, or the expected input shape)."""

    def __init__(self, conn, deadline: float, meta: Any = None) -> None:
        self.conn, self.deadline, self.meta = conn, deadline, meta
        self._done = threading.Event()
        self._lock = threading.Lock()
        self.used = False
        self.output: Any = None
        self.failure: str | None = None

    def on_message(self, kind: str, payload: Any) -> None:
        if kind == "output":
            self.output = payload
            self._done.set()

    def on_end(self, outcome: str, info: Any) -> None:
        if not self._done.is_set():
            self.failure = info if isinstance(info, str) and info else outcome
            self._done.set()

    def claim(self) -> bool:
        """True for the first caller only (the patient's input is accepted once per session)."""
        with self._lock:
            if self.used:
                return False
            self.used = True
            return True

    def run(self, payload: dict) -> Any:
        """Forward ``payload`` to the worker; wait for its output (RuntimeError with a reason)."""
        try:
            self.conn.send(("input", payload))
        except (OSError, ValueError):
            raise RuntimeError("the session's party has ended") from None
        if not self._done.wait(max(0.0, self.deadline - time.monotonic())):
            raise RuntimeError("timeout")
        if self.output is None:
            raise RuntimeError(self.failure or "failed")
        return self.output


def answer_patient(ex: Exchange, context, blobs: dict, shape, corrections: int | None) -> tuple[dict, dict]:
    """The ``Evaluate`` handler both services share: take the patient's one input for ``ex``
    (checked by :func:`xrayfed.common.mpc.dealer.contribution`), run it, answer this party's
    output share as a frame; every refusal is one gRPC status with a reason."""
    import grpc

    if not ex.claim():
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "this session already has its input")
    try:
        payload = dealer.contribution(blobs, shape, corrections)
    except ValueError as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    try:
        out = ex.run(payload)
    except RuntimeError as e:
        context.abort(grpc.StatusCode.ABORTED, f"the encrypted session failed ({e})")
    return {"shape": out["shape"]}, {"y": out["y"]}


class SessionTable:
    def __init__(self, pool: WorkerPool, max_sessions: int, name: str = "session") -> None:
        self.pool = pool
        self.name = name
        self._slots = threading.BoundedSemaphore(max_sessions)
        self._lock = threading.Lock()
        self._workers: dict[str, Any] = {}
        self._exchanges: dict[str, Exchange] = {}

    def reserve(self) -> bool:
        """Take a slot now, or False when every slot is in use (never waits)."""
        return self._slots.acquire(blocking=False)

    def release(self) -> None:
        """Give back a slot taken by :meth:`reserve` for a session that was never handed off."""
        self._slots.release()

    def start(self, target: Callable, *args) -> tuple[Any, Any]:
        """Fork ``target(conn, *args)`` from the warm pool; returns ``(process, conn)``."""
        return self.pool.start(target, *args)

    @staticmethod
    def discard(proc, conn) -> None:
        """Stop a worker that was started but never handed off."""
        stop_worker(proc)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def hand_off(self, session_id: str, tag: str, proc, conn, deadline: float,
                 on_end: Callable[[str, Any], None], join_deadline: float | None = None,
                 meta: Any = None) -> Exchange:
        """The session runs on its own from here: a watcher thread stops and reaps its worker by
        ``deadline`` (or ``join_deadline`` if the patient's input has not arrived by then), frees
        the slot and calls ``on_end(outcome, info)``. Returns the session's :class:`Exchange`
        (carrying ``meta``)."""
        ex = Exchange(conn, deadline, meta)
        with self._lock:
            self._workers[session_id] = proc
            self._exchanges[session_id] = ex

        def ended(outcome: str, info: Any) -> None:
            with self._lock:
                self._workers.pop(session_id, None)
                self._exchanges.pop(session_id, None)
            ex.on_end(outcome, info)
            self._slots.release()
            on_end(outcome, info)

        threading.Thread(target=watch_worker, args=(proc, conn, deadline, ended, join_deadline, ex.on_message),
                         name=f"{self.name}-{tag}", daemon=True).start()
        return ex

    def exchange(self, session_id: str) -> Exchange | None:
        """The running session ``session_id`` (a secret capability), or None."""
        with self._lock:
            return self._exchanges.get(session_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._workers)

    def stop_all(self) -> None:
        with self._lock:
            procs = list(self._workers.values())
        for p in procs:
            stop_worker(p)
