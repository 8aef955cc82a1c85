"""Suite-wide set-up.

The end-to-end tests run a server and several hospital processes side by side on a small
machine (CI: 2 cores). Each torch process would start one compute thread per core and they
would oversubscribe the cores (see ``xrayfed.common.procs.shared_cpu_env``), so child
processes get one thread each, while this pytest process keeps all cores for the in-process
tests.
"""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(os.cpu_count() or 1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def pool():
    """A warm CrypTen worker pool (fork server with torch + CrypTen imported), one per module."""
    from xrayfed.common import mpc

    p = mpc.WorkerPool()
    p.warm()
    yield p
    p.close()
