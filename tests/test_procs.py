"""Thread limits for several torch processes sharing one machine (demo, benchmarks)."""

from __future__ import annotations

import os

from xrayfed.common.procs import shared_cpu_env


def test_shared_cpu_env_splits_the_cores_and_respects_the_user():
    cores = os.cpu_count() or 1
    env = shared_cpu_env(3, base={})
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(max(1, cores // 3))
    assert shared_cpu_env(1, base={})["OMP_NUM_THREADS"] == str(cores)
    assert shared_cpu_env(10 * cores, base={})["OMP_NUM_THREADS"] == "1"
    assert shared_cpu_env(3, base={"OMP_NUM_THREADS": "4"}) == {}  # the operator's own setting wins
