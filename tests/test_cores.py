"""Co-located processes share the cores by who is busy (xrayfed.common.cores)."""

import os
import subprocess
import sys

import numpy as np
import torch

from xrayfed.common.cores import ENV, CoreShare, busy_processes, usable_cores
from xrayfed.common.procs import shared_cpu_env

HOLDER = """
import sys
from xrayfed.common.cores import CoreShare
with CoreShare(sys.argv[1], cores=4) as share:
    print(share.threads, flush=True)
    sys.stdin.read()  # busy until the test closes our stdin (or kills us)
"""


def _holder(folder):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    return p, int(p.stdout.readline())


def test_a_busy_process_takes_the_cores_the_others_leave(tmp_path):
    before = torch.get_num_threads()
    other = None
    try:
        with CoreShare(tmp_path, cores=4) as share:
            assert share.threads == 4 and busy_processes(tmp_path) == 1  # alone: every core
            other, its_threads = _holder(tmp_path)
            assert its_threads == 2  # it came second: half
            share.adjust(force=True)
            assert share.threads == torch.get_num_threads() == 2 and busy_processes(tmp_path) == 2
            other.stdin.close()  # the other one is done: it leaves and we take its cores back
            other.wait(timeout=30)
            share.adjust(force=True)
            assert share.threads == torch.get_num_threads() == 4
            other, _ = _holder(tmp_path)
            other.kill()  # a killed process never counts as busy (the kernel drops its lock)
            other.wait(timeout=30)
            assert busy_processes(tmp_path) == 1
            share.adjust(force=True)
            assert share.threads == 4
        assert torch.get_num_threads() == before  # put back on exit
        assert busy_processes(tmp_path) == 0
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f"{os.getpid()}-")]
    finally:
        torch.set_num_threads(before)
        if other is not None and other.poll() is None:
            other.kill()
            other.wait()


def test_without_a_shared_folder_nothing_changes(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    before = torch.get_num_threads()
    with CoreShare(cores=64) as share:
        share.adjust(force=True)
        assert share.threads is None and torch.get_num_threads() == before


def test_the_environment_names_the_folder_unless_the_operator_set_threads(tmp_path):
    env = shared_cpu_env(3, base={}, share_dir=tmp_path)
    assert env[ENV] == str(tmp_path) and env["OMP_NUM_THREADS"]
    assert ENV not in shared_cpu_env(3, base={})
    assert shared_cpu_env(3, base={"OMP_NUM_THREADS": "4"}, share_dir=tmp_path) == {}


def test_a_dp_round_counts_itself_busy_while_it_trains_and_leaves_nothing(tmp_path, monkeypatch):
    """The hospital's DP round (client/dp/engine.py) holds its share while it trains: a step
    sees itself busy and takes the cores of a folder where it is alone."""
    import dataclasses

    from xrayfed.client.dp import plan_for, train_private_round
    from xrayfed.common import cores
    from xrayfed.common.config import HospitalConfig, load_config
    from xrayfed.common.data.dataset import XrayDataset
    from xrayfed.common.model import ModelSpec, build_model
    from xrayfed.common.prediction import TaskSpec

    task = TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA"))
    rng = np.random.default_rng(0)
    ds = XrayDataset(rng.integers(0, 255, size=(40, 16, 16), dtype=np.uint8),
                     rng.integers(0, 2, 40).astype(np.int64), task)
    c = load_config(HospitalConfig, None, {"hospital.name": "h", "hospital.state_dir": str(tmp_path / "state"),
                                           "hospital.device": "cpu", "privacy.epsilon": 8.0,
                                           "privacy.max_rounds": 5, "privacy.delta": 1e-3,
                                           "privacy.unit": "scan"})
    plan, units = plan_for(c, ds)
    plan = dataclasses.replace(plan, steps=3)
    folder = tmp_path / "cores"
    monkeypatch.setenv(ENV, str(folder))
    seen = []
    real_adjust = cores.CoreShare.adjust

    def spy(self, force=False):
        real_adjust(self, force=True)
        seen.append((busy_processes(folder), torch.get_num_threads()))

    monkeypatch.setattr(cores.CoreShare, "adjust", spy)
    before = torch.get_num_threads()
    try:
        train_private_round(build_model(ModelSpec(num_outputs=1, width=4, depth=2)), units, c, plan, task,
                            torch.device("cpu"), lr=0.1)
    finally:
        torch.set_num_threads(before)
    assert len(seen) >= plan.steps  # once on entry, then after every step
    assert all(busy == 1 and threads == usable_cores() for busy, threads in seen)
    assert busy_processes(folder) == 0 and not list(folder.glob("*.busy"))
