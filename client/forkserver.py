"""The hospital's SuperExec with a fork server for its per-message ClientApp processes.

Flower 1.41's SuperExec starts a fresh ``flwr-clientapp`` process for every message the hospital
receives (``flwr/supercore/superexec/executor/subprocess_executor.py``: ``Popen`` by name); each
one imports Flower and the ClientApp (:mod:`xrayfed.client.client_app`) before it reads its
message, about 1.3 s of CPU (three hospitals × six messages in a 5-round run, on the cores their
DP training needs), and tears the interpreter down again at its end.

``python -m xrayfed.client.forkserver FLOWER-SUPEREXEC-ARGS`` (what the SuperNode starts instead
of ``flower-superexec`` with ``[hospital] fork_clientapps``, see
:func:`xrayfed.common.flower_launch.run_supernode`; usually not as a fresh interpreter but in a
process forked from the SuperNode with Flower imported, which calls :func:`preload` while the
SuperNode waits to join and :func:`run_superexec` once Flower starts its SuperExec: its command
line in ``ps`` is then the SuperNode's) imports Flower's SuperExec, Flower's
``flwr-clientapp`` entry point and the ClientApp, then forks a fork server from itself *before*
Flower's SuperExec starts (no thread, no connection, no secret exists yet), and runs Flower's
SuperExec. Each ``flwr-clientapp`` start the SuperExec asks for is a fork of that fork server:
one fresh process per message still, running Flower's ``flwr-clientapp`` with exactly the
SuperExec's arguments (its task's token), in the SuperExec's environment and output streams; it
ends as :mod:`multiprocessing` ends its forked processes (its threads joined, logs flushed,
``os._exit``). What a message no longer pays for is the imports and the interpreter's teardown.

Fork safety: the fork server holds no thread (OpenBLAS is loaded with one; the fork server does
not serve if a second thread exists, and the SuperExec then starts ``flwr-clientapp`` itself, as
Flower does); numpy's global random generator, which Flower's SecAgg+ quantization draws from,
is seeded afresh from the OS in each child (Python's ``random`` is reseeded at fork by Python
itself); keys and masks come from ``os.urandom`` and OpenSSL, which are fork-aware. A child's
``--parent-pid`` still names the SuperExec, so it stops when the SuperExec goes, as before; the
fork server stops with the SuperExec too. A ClientApp process shows the SuperExec's command line
in ``ps`` (its parent is the fork server).

Wire format (a socket pair): the fork server writes ``READY`` once; each request is one JSON line
``{"argv": [...], "quiet": bool}`` and its answer one JSON line ``{"pid": N}`` or ``{"error": "..."}``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import select
import socket
import sys
from types import SimpleNamespace

READY = b"READY"
#: Seconds between two looks at the parent (the SuperExec) while no request comes.
PARENT_CHECK_S = 0.5
#: Seconds the SuperExec waits for the fork server's answer to a fork; past it, it starts
#: ``flwr-clientapp`` itself from then on.
ANSWER_S = 30.0


def _threads() -> int:
    """Threads of this process (native ones included: a library's thread pool counts); Python's
    own count where the system does not say."""
    import threading

    from xrayfed.common.flower_launch import process_threads

    n = process_threads()
    return threading.active_count() if n is None else n


def preload() -> None:
    """Import Flower's SuperExec and what every ``flwr-clientapp`` process imports before it
    handles its message. OpenBLAS (loaded with numpy) starts a thread pool unless told otherwise:
    it is loaded with one thread here, and the variable restored (the children inherit the
    SuperExec's environment unchanged; the torch-free ClientApp does no linear algebra that a
    pool would speed up)."""
    old = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import flwr.cli.install  # noqa: F401 - the FAB installation every message repeats
        import flwr.supercore.cli  # noqa: F401 - the SuperExec itself
        import flwr.supernode.cli.flwr_clientapp  # noqa: F401 - Flower's entry point and its runtime
        import httpcore  # noqa: F401 - what httpx imports only when a client is made (each process makes one)

        import xrayfed.client.client_app  # noqa: F401 - the ClientApp Flower loads by name
        import xrayfed.client.supernode  # noqa: F401 - the run-finished stage
        import xrayfed.common.security.atrest  # noqa: F401 - the at-rest key of the training stage
    finally:
        if old is None:
            os.environ.pop("OPENBLAS_NUM_THREADS", None)
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = old


# --------------------------------------------------------------------------- the fork server
def _send(sock: socket.socket, answer: dict) -> None:
    sock.sendall(json.dumps(answer).encode() + b"\n")


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(sock: socket.socket, parent_pid: int) -> tuple[list[str], bool] | None:
    """Answer requests on ``sock`` until the SuperExec (``parent_pid``) is gone: ``None`` in the
    fork server, ``(argv, quiet)`` in a forked child, which then runs its message."""
    buf = b""
    while True:
        if os.getppid() != parent_pid:
            return None
        ready, _, _ = select.select([sock], [], [], PARENT_CHECK_S)
        _reap()
        if not ready:
            continue
        chunk = sock.recv(65536)
        if not chunk:
            return None  # the SuperExec closed its end
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                req = json.loads(line)
                argv = [str(a) for a in req["argv"]]
                quiet = bool(req.get("quiet"))
            except (ValueError, KeyError, TypeError):
                _send(sock, {"error": "malformed request"})
                continue
            if _threads() > 1:
                _send(sock, {"error": "the fork server holds a thread"})
                continue
            try:
                pid = os.fork()
            except OSError as e:
                _send(sock, {"error": f"fork failed ({e.strerror})"})
                continue
            if pid == 0:
                sock.close()
                return argv, quiet
            _send(sock, {"pid": pid})


def _fork_server(sock: socket.socket, parent_pid: int) -> None:
    """The fork server's whole life (a forked child of the SuperExec; never returns)."""
    from xrayfed.common.flower_launch import exit_without_teardown

    code = 0
    try:
        gc.freeze()  # the imports' objects: no child's garbage collection touches (and so copies) them
        if _threads() > 1:
            print("xrayfed: the ClientApp fork server holds a thread after its imports; the SuperExec starts "
                  "each ClientApp process itself", file=sys.stderr, flush=True)
            return
        sock.sendall(READY + b"\n")
        job = serve(sock, parent_pid)
        if job is not None:
            code = _child(*job)
    except BaseException:  # noqa: BLE001 - a fork server (or child) never runs the SuperExec's code
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        # no interpreter teardown of every module the SuperExec imported: it would cost more CPU
        # than the message (each object's page copied on write on the way: 0.65 s measured here)
        exit_without_teardown(code)


def _child(argv: list[str], quiet: bool) -> int:
    """In a forked child: run ``flwr-clientapp`` with ``argv`` (its arguments after the command);
    its exit code."""
    if quiet:
        devnull = os.open(os.devnull, os.O_WRONLY)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
    if "numpy" in sys.modules:
        import numpy as np

        np.random.seed()  # fresh entropy from the OS: no two children share the generator's state
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    sys.argv = ["flwr-clientapp", *argv]
    try:
        flwr_clientapp()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


# --------------------------------------------------------------------------- the SuperExec's side
class ForkServer:
    """The SuperExec's end of its fork server (forked from the SuperExec at once)."""

    def __init__(self, close: tuple[int, ...] = ()) -> None:
        """``close``: file descriptors of the SuperExec's that the fork server and its children
        do not keep."""
        mine, theirs = socket.socketpair()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            mine.close()
            for fd in close:
                os.close(fd)
            _fork_server(theirs, parent)  # never returns
        theirs.close()
        self.sock, self.pid = mine, pid
        self.state = "starting"  # -> "ready" | "gone"
        self.buf = b""

    def _alive(self) -> bool:
        try:
            return os.waitpid(self.pid, os.WNOHANG)[0] == 0
        except ChildProcessError:
            return False

    def _line(self, timeout: float) -> bytes | None:
        """The fork server's next line: ``b""`` when none came within ``timeout`` seconds, None
        when it is gone."""
        import time

        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            ready, _, _ = select.select([self.sock], [], [], min(max(left, 0.0), 0.5))
            if not ready:
                if left <= 0:
                    return b""
                if not self._alive():
                    return None
                continue
            chunk = self.sock.recv(4096)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def _give_up(self, why: str) -> None:
        import signal

        from flwr.supercore import log  # Flower's logger: one of the SuperExec's lines

        if self.state != "gone":
            log(logging.WARNING, "ClientApp fork server: %s; starting `flwr-clientapp` processes directly", why)
        self.state = "gone"
        if self._alive():
            os.kill(self.pid, signal.SIGKILL)
        self.sock.close()

    def launch(self, args: list[str], kw: dict):
        """Fork ``args`` (``flwr-clientapp ...``; ``kw``: the SuperExec's ``Popen`` keywords) from
        the fork server: an object with its ``pid``, or None when the fork server cannot (then
        Flower's own ``Popen`` starts it)."""
        import subprocess

        if self.state == "gone" or set(kw) - {"stdout", "stderr"}:
            return None
        try:
            if self.state == "starting":
                ready = self._line(5.0)
                if ready != READY:
                    self._give_up("it stopped before it was ready" if ready is None else "not ready")
                    return None
                self.state = "ready"
            quiet = kw.get("stdout") is subprocess.DEVNULL
            _send(self.sock, {"argv": args[1:], "quiet": quiet})
            answer = self._line(ANSWER_S)
        except OSError as e:
            self._give_up(f"gone ({type(e).__name__})")
            return None
        if not answer:
            self._give_up("no answer")
            return None
        try:
            reply = json.loads(answer)
        except ValueError:
            reply = {"error": "a malformed answer"}
        if "pid" not in reply:
            self._give_up(str(reply.get("error", "refused")))
            return None
        return SimpleNamespace(pid=int(reply["pid"]), args=args)


#: Seconds the SuperExec waits between two asks for a task when its SuperNode wakes it for each
#: message it receives (``--wake-fd``); Flower's own interval without it (xrayfed: 0.2 s).
WOKEN_POLL_S = 1.0


class _WakeClock:
    """Flower's ``time`` module as the SuperExec's main loop sees it: its wait between two asks
    for a task ends as soon as the SuperNode writes to ``fd`` (it received a message), at the
    latest after ``max(seconds, WOKEN_POLL_S)``."""

    def __init__(self, module, fd: int) -> None:
        self._module, self._fd = module, fd
        os.set_blocking(fd, False)

    def sleep(self, seconds: float) -> None:
        ready, _, _ = select.select([self._fd], [], [], max(float(seconds), WOKEN_POLL_S))
        if ready:
            try:
                if not os.read(self._fd, 4096):  # the SuperNode is gone: Flower's own wait from now on
                    self.sleep = lambda s: self._module.sleep(float(s))
            except BlockingIOError:
                pass

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def run_superexec(argv: list[str]) -> None:
    """Flower's ``flower-superexec`` (its arguments in ``argv``) whose ``flwr-clientapp``
    processes are forked by a fork server (see the module docstring); a leading ``--wake-fd N``:
    the SuperNode writes a byte there for each message it receives (:class:`_WakeClock`)."""
    import subprocess

    from xrayfed.common.flower_launch import Subprocess, run_without_teardown

    wake = None
    if argv[:1] == ["--wake-fd"]:
        wake, argv = int(argv[1]), argv[2:]
    preload()
    forks = ForkServer(close=() if wake is None else (wake,))
    import flwr.supercore.superexec.executor.subprocess_executor as executor
    import flwr.supercore.superexec.run_superexec as loop
    from flwr.supercore.cli import flower_superexec

    executor.subprocess = Subprocess(subprocess, "flwr-clientapp", forks.launch)
    if wake is not None:
        loop.time = _WakeClock(loop.time, wake)  # the module's own name for `time`: its main loop only
    sys.argv = ["flower-superexec", *argv]
    run_without_teardown(flower_superexec)


if __name__ == "__main__":
    run_superexec(sys.argv[1:])
