"""The table of MPC sessions a service runs (the hospital's inference service and the crypto
provider's TTP service use the same one).

A bounded number of slots; one worker process per session, forked from the warm
:class:`~xrayfed.common.mpc.pool.WorkerPool`; a watcher thread per session that tears it down when
it ends, fails, times out or (optionally) is not joined in time, frees its slot and reports the
outcome; and :meth:`SessionTable.stop_all` at shutdown.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

from xrayfed.common.mpc.pool import WorkerPool, stop_worker, watch_worker


class SessionTable:
    def __init__(self, pool: WorkerPool, max_sessions: int, name: str = "session") -> None:
        self.pool = pool
        self.name = name
        self._slots = threading.BoundedSemaphore(max_sessions)
        self._lock = threading.Lock()
        self._workers: dict[str, Any] = {}

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
                 on_end: Callable[[str, Any], None], join_deadline: float | None = None) -> None:
        """The session runs on its own from here: a watcher thread stops and reaps its worker by
        ``deadline`` (or ``join_deadline`` if the parties have not all joined by then), frees the
        slot and calls ``on_end(outcome, info)``."""
        with self._lock:
            self._workers[session_id] = proc

        def ended(outcome: str, info: Any) -> None:
            with self._lock:
                self._workers.pop(session_id, None)
            self._slots.release()
            on_end(outcome, info)

        threading.Thread(target=watch_worker, args=(proc, conn, deadline, ended, join_deadline),
                         name=f"{self.name}-{tag}", daemon=True).start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._workers)

    def stop_all(self) -> None:
        with self._lock:
            procs = list(self._workers.values())
        for p in procs:
            stop_worker(p)
