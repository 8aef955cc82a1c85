"""Warm party processes (a fork server that imported torch + CrypTen once) and the helpers that
watch a session's worker until it ends, times out or is torn down."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import time
from multiprocessing import forkserver
from typing import Any, Callable

log = logging.getLogger(__name__)


class WorkerPool:
    """Warm party processes: a fork server that imported torch + CrypTen once, at start-up.

    ``multiprocessing``'s ``forkserver`` is a zygote: a clean process (exec'd, not forked from
    the gRPC server, so no gRPC threads in it) that pre-imports this module (torch, CrypTen)
    and forks one process per session. Starting a session party then costs a fork (~10 ms),
    not the 2-5 s import. Each worker is killed by the caller on timeout and by its own alarm.
    """

    def __init__(self) -> None:
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["xrayfed.common.mpc.preload"])

    def warm(self) -> float:
        """Start the fork server now (before any gRPC thread); returns seconds it took."""
        t0 = time.perf_counter()
        p = self.ctx.Process(target=_noop, daemon=True)
        p.start()
        p.join(120)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Stop the fork server (its session workers are stopped by their owners)."""
        with contextlib.suppress(Exception):
            forkserver._forkserver._stop()

    def start(self, target, *args):
        """Start ``target(child_conn, *args)`` in a fresh worker; returns (process, parent_conn).
        The pipe is duplex: the service forwards the patient's input to the worker on it."""
        parent, child = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(target=target, args=(child, *args), daemon=True)
        proc.start()
        child.close()
        return proc, parent


def _noop() -> None:
    return None


def wait_message(conn, kinds: tuple[str, ...], deadline: float,
                 on_other: Callable[[str, Any], None] | None = None) -> tuple[str, Any]:
    """Next message of ``kinds`` from a worker before ``deadline`` (monotonic).

    Returns ``(kind, payload)``, ``("error", msg)`` if the worker reported one, ``("died", None)``
    if it exited without a word, or ``("timeout", None)``. Other messages go to ``on_other``.
    """
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout", None
        try:
            if not conn.poll(min(remaining, 1.0)):
                continue
            kind, payload = conn.recv()
        except (EOFError, OSError):
            return "died", None
        if kind in kinds or kind == "error":
            return kind, payload
        if on_other is not None:
            on_other(kind, payload)


def watch_worker(proc, conn, deadline: float, on_end: Callable[[str, Any], None],
                 join_deadline: float | None = None, on_other: Callable[[str, Any], None] | None = None) -> None:
    """Wait (in a thread) for a session worker to finish by ``deadline``; always stop and reap it.

    With ``join_deadline`` the worker must report ``joined`` (every party is in the session) by
    then, or the session is torn down at once (``not_joined``: a slot held by nobody is freed
    early). Other messages (``output``) go to ``on_other``. ``on_end(outcome, payload)`` gets ``ok`` (payload: statistics), ``failed``
    (one-line message), ``died``, ``timeout`` or ``not_joined``.
    """
    kind, payload = "died", None
    try:
        if join_deadline is not None:
            kind, payload = wait_message(conn, ("joined", "done"), min(join_deadline, deadline), on_other)
            if kind == "timeout":
                kind = "not_joined"
        if join_deadline is None or kind == "joined":
            kind, payload = wait_message(conn, ("done",), deadline, on_other)
    finally:
        stop_worker(proc)
        with contextlib.suppress(Exception):
            conn.close()
        outcome = {"done": "ok", "error": "failed"}.get(kind, kind)
        on_end(outcome, payload)


def stop_worker(proc, grace_s: float = 1.0) -> None:
    """Stop a worker process for good (SIGTERM, then SIGKILL) and reap it."""
    if proc is None:
        return
    with contextlib.suppress(Exception):
        if proc.is_alive():
            proc.terminate()
            proc.join(grace_s)
        if proc.is_alive():
            proc.kill()
        proc.join(5)
    with contextlib.suppress(Exception):
        proc.close()


