"""Child processes that never outlive us: process groups, tree kills, free ports, readiness."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Mapping, Sequence

import psutil

from xrayfed.common import cores
from xrayfed.common.errors import UserError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (picked by the OS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None,
                  what: str = "service") -> None:
    """Block until ``host:port`` accepts TCP connections (or raise UserError)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise UserError(f"{what} exited with status {proc.returncode} before listening on {host}:{port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.2)
    raise UserError(f"{what} did not start listening on {host}:{port} within {timeout:.0f}s")


def venv_bin(name: str) -> str:
    """Path of a console script installed beside this Python (the project's venv)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def spawn(cmd: Sequence[str], *, log: IO | None = None, env: dict | None = None, cwd: str | None = None,
          stdout=None, pass_fds: Sequence[int] = ()) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so the whole tree can be stopped together);
    ``pass_fds``: file descriptors it inherits (besides its standard streams)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.Popen(
        list(cmd),
        stdout=stdout if stdout is not None else (log or None),
        stderr=subprocess.STDOUT if (log is not None or stdout is not None) else None,
        stdin=subprocess.DEVNULL,
        env=full_env,
        cwd=cwd,
        start_new_session=True,
        pass_fds=tuple(pass_fds),
    )


def wait_exited(procs: list[psutil.Process], timeout: float,
                 popen: subprocess.Popen | None = None) -> list[psutil.Process]:
    """Wait until each of ``procs`` has exited; those still running after ``timeout`` seconds.
    A zombie has exited: an orphan (a descendant whose parent ended first) stays one until the
    machine's init reaps it, which some inits do only every second or two. This process's own
    children are reaped here (``popen`` through its ``poll``, which keeps its exit code; any
    other child by ``waitpid``, so a caller that owns one through another ``Popen`` passes that)."""
    deadline = time.monotonic() + timeout
    alive, pause = list(procs), 0.002
    while alive:
        still = []
        for p in alive:
            try:
                if not p.is_running():  # gone, or its pid already reused by another process
                    continue
                if p.status() != psutil.STATUS_ZOMBIE:
                    still.append(p)
                elif popen is not None and p.pid == popen.pid:
                    popen.poll()
                elif p.ppid() == os.getpid():  # an orphan handed to this process (PID 1 in a container)
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(p.pid, os.WNOHANG)
            except psutil.NoSuchProcess:
                pass
            except psutil.AccessDenied:  # cannot tell: treated as running (SIGKILL after the timeout)
                still.append(p)
        alive = still
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    return alive


def kill_tree(proc: subprocess.Popen | int | None, timeout: float = 5.0) -> None:
    """Stop a process, its process group and every descendant: SIGTERM, then SIGKILL; returns
    once each has exited (an orphaned zombie counts, :func:`wait_exited`)."""
    if proc is None:
        return
    pid = proc if isinstance(proc, int) else proc.pid
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    popen = proc if isinstance(proc, subprocess.Popen) else None
    alive = wait_exited(procs, timeout, popen)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    wait_exited(alive, timeout, popen)
    if isinstance(proc, subprocess.Popen):
        with contextlib.suppress(Exception):
            proc.wait(timeout=timeout)


def sigkill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every descendant at once, with no chance to clean up: what a crash or
    a power cut looks like to the others (fault tests and benchmarks). See :func:`kill_tree` for
    a clean stop."""
    try:
        root = psutil.Process(proc.pid)
        everyone = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        everyone = []
    for p in everyone:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    wait_exited(everyone, 10, proc)
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)


class ProcessGroup:
    """Context manager owning child processes; all are stopped on exit, Ctrl-C or SIGTERM."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self._old: dict[int, object] = {}

    def add(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(proc)
        return proc

    def __enter__(self) -> "ProcessGroup":
        def on_term(signum, frame):
            raise KeyboardInterrupt

        with contextlib.suppress(ValueError):  # not in the main thread
            self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_term)
        return self

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            kill_tree(p)

    def __exit__(self, *exc) -> None:
        self.stop_all()
        for s, h in self._old.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(s, h)


#: glibc's allocator settings for xrayfed's processes (``GLIBC_TUNABLES``): blocks under 256 MiB
#: come from the heap, and up to 512 MiB of freed heap is kept for the next step rather than given
#: back. Without them every large tensor (a batch's per-sample gradients, its scattering features)
#: is fresh memory that the kernel maps and zeroes page by page (the scattering features of 2 922
#: scans at 28 px on one thread: 12.2 s, 3.6 s of it in the kernel, against 9.1 s and 0.1 s with
#: these; docs/benchmarks.md has the federation's figures). The peak is about the same (a 224 px DP
#: round: 929 MB against 912 MB) and is kept rather than returned between rounds.
ALLOCATOR_TUNABLES = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=536870912"


def allocator_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{"GLIBC_TUNABLES": ALLOCATOR_TUNABLES}`` for the processes xrayfed starts (read by glibc
    when a process starts; other C libraries ignore it), unless the environment (``base``,
    default ``os.environ``) sets its own, or this is not Linux."""
    env = os.environ if base is None else base
    if env.get("GLIBC_TUNABLES") is not None or not sys.platform.startswith("linux"):
        return {}
    return {"GLIBC_TUNABLES": ALLOCATOR_TUNABLES}


def shared_cpu_env(processes: int, base: Mapping[str, str] | None = None,
                   share_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Thread limits for ``processes`` torch processes that share this machine's cores.

    By default every torch process starts one compute thread per core; several hospitals (or a
    demo's three) on one machine then oversubscribe the cores and each slows down 3× or more
    (measured: three DP rounds side by side on 2 cores, 70 s each vs 21 s with one thread each).
    Returns ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = max(1, cores // processes), unless the
    caller's environment (``base``, default ``os.environ``) already sets ``OMP_NUM_THREADS``.
    ``share_dir``: a folder the processes share, so that whichever of them is busy while the
    others wait takes their cores (:class:`xrayfed.common.cores.CoreShare`; not where the
    caller set its own thread count).
    """
    env = os.environ if base is None else base
    if env.get("OMP_NUM_THREADS"):
        return {}
    out = {cores.ENV: str(Path(share_dir).resolve())} if share_dir is not None else {}
    n = str(max(1, cores.usable_cores() // max(1, int(processes))))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, **out}
