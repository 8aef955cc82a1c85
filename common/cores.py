"""Cores shared by co-located torch processes that are busy at different times.

Several hospitals on one machine (a demo's three, a benchmark's, a test's) start with one
compute thread per core each divided among them (:func:`xrayfed.common.procs.shared_cpu_env`):
three on 2 cores get one thread each, because OpenMP threads that wait for each other spin on
cores another process needs (two threads each made the same three rounds about 5× slower). But
their rounds end at different times: a hospital with a third of the scans is done early, and
the largest one then trains alone on one core while the other idles.

:class:`CoreShare` fixes that without oversubscribing. The processes name one folder
(``$XRAYFED_CPU_SHARE_DIR``, set by :func:`~xrayfed.common.procs.shared_cpu_env` when the caller
gives it one). While a process computes it holds an exclusive ``flock`` on its own file there
(the kernel releases it when the process ends, so a killed process never counts as busy); on
entry and after each step (a DP-SGD step, a batch of an evaluation) it sets torch's threads to
``cores // processes busy now`` (at least 1). A process alone on the machine gets every core;
three busy ones get one thread each, as before.

Without the variable (a hospital on its own machine, the usual case) nothing changes: torch's
threads stay what the environment set.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path

#: The folder co-located processes share (set by the process that starts them).
ENV = "XRAYFED_CPU_SHARE_DIR"
#: A busy process looks at the others at most this often (seconds).
RECHECK_S = 0.2


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset), else
    ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def busy_processes(folder: Path) -> int:
    """How many processes hold the lock on their file in ``folder`` now (this one included)."""
    n = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        if not name.endswith(".busy"):
            continue
        try:
            fd = os.open(folder / name, os.O_RDONLY)
        except OSError:  # removed since the listing: that process is done
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                n += 1
        finally:
            os.close(fd)  # also drops the shared lock taken on an idle file
    return n


class CoreShare:
    """``with CoreShare() as share: … share.adjust() after each step …``.

    ``folder``: the shared folder (default ``$XRAYFED_CPU_SHARE_DIR``; no folder: every method
    does nothing). ``cores``: the cores the processes share (default :func:`usable_cores`). On
    exit torch's thread count is put back to what it was on entry."""

    def __init__(self, folder: str | os.PathLike | None = None, cores: int | None = None) -> None:
        folder = folder if folder is not None else os.environ.get(ENV)
        self.folder = Path(folder) if folder else None
        self.cores = max(1, int(cores or usable_cores()))
        self._fd: int | None = None
        self._path: Path | None = None
        self._entry_threads: int | None = None
        self._next_check = 0.0
        self.threads: int | None = None  # what adjust() set last

    def __enter__(self) -> "CoreShare":
        if self.folder is None:
            return self
        import torch

        self._entry_threads = torch.get_num_threads()
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{os.getpid()}-{time.monotonic_ns()}.busy"
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)  # readable: other users' processes count it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # no locks here (e.g. some network file systems): share nothing
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
            self._fd, self._path = fd, path
        self.adjust(force=True)
        return self

    def adjust(self, force: bool = False) -> None:
        """Set torch's threads to this process's share of the cores (checked at most every
        :data:`RECHECK_S` seconds unless ``force``)."""
        if self._fd is None:
            return
        now = time.monotonic()
        if not force and now < self._next_check:
            return
        self._next_check = now + RECHECK_S
        threads = max(1, self.cores // max(1, busy_processes(self.folder)))
        if threads != self.threads:
            import torch

            torch.set_num_threads(threads)
            self.threads = threads

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self._path.unlink()  # before the lock goes: nobody counts a file that is about to be idle
        os.close(self._fd)
        self._fd = None
        if self._entry_threads is not None and self.threads != self._entry_threads:
            import torch

            torch.set_num_threads(self._entry_threads)
        self.threads = None
