"""Thread limits for several torch processes sharing one machine (demo, benchmarks)."""

from __future__ import annotations

import os

from xrayfed.common.procs import shared_cpu_env


def test_shared_cpu_env_splits_the_cores_and_respects_the_user():
    from xrayfed.common.cores import usable_cores

    cores = usable_cores()
    env = shared_cpu_env(3, base={})
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(max(1, cores // 3))
    assert shared_cpu_env(1, base={})["OMP_NUM_THREADS"] == str(cores)
    assert shared_cpu_env(10 * cores, base={})["OMP_NUM_THREADS"] == "1"
    assert shared_cpu_env(3, base={"OMP_NUM_THREADS": "4"}) == {}  # the operator's own setting wins


def test_processes_xrayfed_starts_get_the_allocator_settings_unless_the_user_set_their_own():
    import subprocess
    import sys

    from xrayfed.common.procs import ALLOCATOR_TUNABLES, allocator_env

    if not sys.platform.startswith("linux"):
        assert allocator_env(base={}) == {}
        return
    assert allocator_env(base={}) == {"GLIBC_TUNABLES": ALLOCATOR_TUNABLES}
    assert allocator_env(base={"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {}
    # glibc reads them at a process's start: a child started with them runs and sees them
    code = "import os; print(os.environ.get('GLIBC_TUNABLES', ''))"
    out = subprocess.run([sys.executable, "-c", code], env={**allocator_env(base={}), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == ALLOCATOR_TUNABLES
