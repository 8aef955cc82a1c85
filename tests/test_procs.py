"""Thread limits for several torch processes sharing one machine (demo, benchmarks)."""

from __future__ import annotations

import os
import time

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


def test_flower_runs_without_telemetry_unless_the_user_asks_for_it(monkeypatch, tmp_path):
    """Flower's telemetry (an event with the machine's platform details POSTed to Flower's servers
    at every process's start and stop) is off in every Flower process xrayfed starts and in its
    own process; an explicit setting wins."""
    import subprocess
    import sys

    from xrayfed.common import cli
    from xrayfed.common.flower_launch import TELEMETRY_ENV, flower_env

    code = "import flwr.supercore.telemetry as t; print(t.FLWR_TELEMETRY_ENABLED)"

    def flower_sees(env):
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    for name in (TELEMETRY_ENV, "GLIBC_TUNABLES"):  # set first, so both are restored after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    assert flower_sees(flower_env(tmp_path / "home")) == "0"
    assert flower_sees(flower_env(tmp_path / "home", base={**os.environ, TELEMETRY_ENV: "1"})) == "1"
    cli.main(["report", str(tmp_path / "no-such-run")])  # refused; the environment is set before any command
    assert os.environ[TELEMETRY_ENV] == "0"
    monkeypatch.setenv(TELEMETRY_ENV, "1")
    cli.main(["report", str(tmp_path / "no-such-run")])
    assert os.environ[TELEMETRY_ENV] == "1"


def test_superexec_polls_as_each_role_needs_unless_the_user_sets_it(tmp_path):
    """Flower's SuperExec (its own reader of the variable) polls every 0.2 s at a hospital, where
    each message's ClientApp should start soon, and every 1 s beside the SuperLink, which starts
    one ServerApp per run; an explicit setting wins."""
    import subprocess
    import sys

    from xrayfed.common.flower_launch import SERVER_SUPEREXEC_POLL_S, SUPEREXEC_POLL_ENV, flower_env

    code = "from flwr.supercore.superexec.run_superexec import _get_task_poll_interval as f; print(f())"

    def superexec_sees(env):
        return float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout.strip())

    base = {k: v for k, v in os.environ.items() if k != SUPEREXEC_POLL_ENV}
    assert superexec_sees(flower_env(tmp_path / "h", base=base)) == 0.2
    assert superexec_sees(flower_env(tmp_path / "s", base=base, superexec_poll_s=SERVER_SUPEREXEC_POLL_S)) == 1.0
    assert superexec_sees(flower_env(tmp_path / "s", base={**base, SUPEREXEC_POLL_ENV: "3"},
                                     superexec_poll_s=SERVER_SUPEREXEC_POLL_S)) == 3.0


def test_kill_tree_returns_when_every_process_has_exited_orphans_included(tmp_path):
    """A stopped process whose own children outlive it leaves orphans; once they exit they stay
    zombies until the machine's init reaps them (here up to 2 s). kill_tree counts them as
    exited, reaps its own child and keeps that child's exit code."""
    import subprocess
    import sys

    import psutil

    from xrayfed.common.procs import kill_tree, spawn

    ready = tmp_path / "ready"
    code = (
        "import os, signal, subprocess, sys, time\n"
        "kid = subprocess.Popen([sys.executable, '-c', 'import os, time; os.fork(); time.sleep(60)'])\n"
        "signal.signal(signal.SIGTERM, lambda *a: os._exit(7))\n"  # ends at once, its child is orphaned
        f"open({str(ready)!r}, 'w').close()\n"
        "time.sleep(60)\n"
    )
    proc = spawn([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    tree = []
    while time.monotonic() < deadline:
        tree = psutil.Process(proc.pid).children(recursive=True)
        if ready.exists() and len(tree) == 2:
            break
        time.sleep(0.05)
    assert len(tree) == 2, "the test's process tree did not start"
    kill_tree(proc)
    assert proc.returncode == 7
    for p in tree:
        try:
            assert p.status() == psutil.STATUS_ZOMBIE, f"{p.pid} still runs"
        except psutil.NoSuchProcess:
            pass
