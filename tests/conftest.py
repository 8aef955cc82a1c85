"""Suite-wide set-up.

The end-to-end tests run a server and several hospital processes side by side on a small
machine (CI: 2 cores). Each torch process would start one compute thread per core and they
would oversubscribe the cores (see ``xrayfed.common.procs.shared_cpu_env``), so child
processes get one thread each, while this pytest process keeps its share of the cores for the
in-process tests: all of them, or cores / workers when ``./dev test`` runs the files in
parallel workers (pytest-xdist, ``-n``).
"""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# Ray starts its workers at nice 15 (``RAY_worker_niceness``): beside another test worker of
# this suite they would get almost no CPU, and the simulation tests would take minutes.
os.environ.setdefault("RAY_worker_niceness", "0")


@pytest.fixture(scope="module")
def pool():
    """A warm CrypTen worker pool (fork server with torch + CrypTen imported), one per module."""
    from xrayfed.common import mpc

    p = mpc.WorkerPool()
    p.warm()
    yield p
    p.close()


#: The longest files (end-to-end tests, in-process DP training), longest first. ``./dev test`` runs
#: the files in three workers (pytest-xdist, ``--dist loadfile``), which take files in collection
#: order: starting with these lets the short files fill the gaps at the end instead of one long
#: file running alone. A file missing here runs in alphabetical order after them.
LONGEST_FIRST = ("test_faults.py", "test_server_step.py", "test_simulation.py", "test_demo.py",
                 "test_secure_federation.py", "test_hospital.py", "test_accuracy.py", "test_export.py",
                 "test_report.py", "test_encrypted_inference.py", "test_patient_privacy.py", "test_adversaries.py",
                 "test_flower_security.py", "test_audit.py", "test_privacy.py", "test_federation.py")


def pytest_configure(config):
    # pytest-xdist (3.6 and later) reorders the files by their number of tests unless told not
    # to (`--no-loadscope-reorder`): the long end-to-end files, which hold few tests, then start
    # last and run alone at the end. Keep the order above, whichever command line started the run.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: test order within a file kept
