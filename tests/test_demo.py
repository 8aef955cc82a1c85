"""`xrayfed demo`: the one command a newcomer runs — real processes, its report, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "xrayfed.common.cli"]


def _procs_mentioning(text: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(text in part for part in (p.info["cmdline"] or [])):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_demo_runs_reports_and_leaves_nothing_behind(tmp_path):
    from test_report import check_demo_run_report

    out = tmp_path / "demo"
    r = subprocess.run(CLI + ["demo", "--out", str(out), "--hospitals", "2", "--rounds", "2", "--local-epochs", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith("[server] round")]
    assert len(lines) == 2
    for l in lines:
        assert "test AUC" in l and "acc" in l and "hospital-a ε=" in l and "hospital-b ε=" in l
    assert "generated synthetic scans" in r.stdout
    assert "HTTP Request" not in r.stdout + r.stderr  # no per-request log spam on the terminal
    assert _procs_mentioning(str(out)) == []
    rep = check_demo_run_report(out / "run")
    assert {h.hospital for h in rep.hospitals} == {"hospital-a", "hospital-b"}


def test_demo_ctrl_c_stops_every_process(tmp_path):
    out = tmp_path / "demo"
    # SIGINT back to its default in the child: a runner started in the background (nohup, `&`)
    # hands its children SIGINT ignored, and Python then keeps ignoring it — not a user's terminal.
    proc = subprocess.Popen(CLI + ["demo", "--out", str(out), "--hospitals", "2", "--rounds", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    tree: list[psutil.Process] = []
    try:
        deadline = time.time() + 240
        seen = ""
        while time.time() < deadline:  # wait until server and hospitals are up
            line = proc.stdout.readline()
            seen += line
            if "federation 'demo'" in line:
                break
        assert "federation 'demo'" in seen, seen[-2000:]
        time.sleep(3)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert len(tree) >= 5  # server, SuperLink, 2 hospitals, SuperNodes, Flower's own children
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(timeout=60) == 130
        time.sleep(1)
        left = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        left += _procs_mentioning(str(out))
        assert left == [], [" ".join(p.cmdline()) for p in left]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in tree:  # on failure too: nothing of the demo may outlive the test
            try:
                p.kill()
            except psutil.Error:
                pass
