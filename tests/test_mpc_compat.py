"""CrypTen 0.4.1 on torch 2.14: the shims of ``xrayfed.common.mpc`` (import, model building,
TTP provider, TTP seeds), each with a test that fails when the workaround breaks."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from xrayfed.common.checkpoint import Checkpoint
from xrayfed.common.errors import UserError
from xrayfed.common.model import ModelSpec, build_model
from xrayfed.common.prediction import TaskSpec

mpc = pytest.importorskip("xrayfed.common.mpc")


def test_import_shim_aliases_moved_onnx_module():
    crypten = mpc.import_crypten()
    assert crypten.__version__ == mpc.CRYPTEN_VERSION
    alias = sys.modules.get(mpc._OLD_REGISTRATION)
    assert alias is not None and alias is sys.modules.get(mpc._NEW_REGISTRATION)


def test_ttp_provider_is_selected_and_tfp_is_refused():
    crypten = mpc.import_crypten()
    assert crypten.cfg.mpc.provider == "TTP"
    mpc.assert_ttp_provider()
    crypten.cfg.mpc.provider = "TFP"  # CrypTen's default: party 0 deals the triples
    try:
        with pytest.raises(RuntimeError, match="TTP"):
            mpc.assert_ttp_provider()
    finally:
        mpc.use_ttp_provider()
    mpc.assert_ttp_provider()


@pytest.mark.parametrize("spec", [
    ModelSpec(num_outputs=1),
    ModelSpec(num_outputs=14, input_pool=4),
    ModelSpec(num_outputs=3, width=8, depth=2, in_channels=3),
    ModelSpec(num_outputs=1, width=8, input_pool=8, weight_standardization=True),
])
def test_crypten_model_has_torch_keys_and_loads_every_weight(spec):
    """Every weight lands in the CrypTen model (weight-standardised ones folded: the CrypTen
    model is plain convolutions)."""
    from xrayfed.common.model import fold_standardization

    torch_model = build_model(spec)
    cmodel = mpc.build_crypten_model(spec)
    t_sd, c_sd = torch_model.state_dict(), dict(cmodel.state_dict())
    assert list(c_sd) == list(t_sd)
    assert all(tuple(c_sd[k].shape) == tuple(v.shape) for k, v in t_sd.items())
    assert all(float(v.abs().sum()) == 0.0 for v in c_sd.values())  # architecture only until loaded
    mpc.load_crypten_weights(cmodel, spec, t_sd)
    loaded = dict(cmodel.state_dict())
    for k, v in fold_standardization(spec, t_sd).items():
        assert torch.equal(loaded[k], v), k
    if spec.weight_standardization:
        assert not torch.equal(loaded["1.weight"], t_sd["1.weight"])


def test_checkpoint_of_another_architecture_is_refused():
    spec = ModelSpec(num_outputs=1, width=16)
    other = build_model(ModelSpec(num_outputs=1, width=8)).state_dict()
    with pytest.raises(UserError, match="does not match the model architecture"):
        mpc.load_crypten_weights(mpc.build_crypten_model(spec), spec, other)
    with pytest.raises(UserError, match="cannot run under MPC"):
        mpc.build_crypten_model(ModelSpec(arch="resnet18", num_outputs=1))


def test_secure_ttp_server_overrides_predictable_seeds():
    from crypten.mpc.provider.ttp_provider import TTPServer

    cls = mpc.secure_ttp_class()
    assert issubclass(cls, TTPServer) and cls._setup_generators is not TTPServer._setup_generators
    # Why: processes forked from one parent (our warm zygote) inherit torch's default generator,
    # so the stock TTP's torch.randint seeds would repeat in every session.
    code = (
        "import os, torch\n"
        "for _ in range(2):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        print(int(torch.randint(-(2**63), 2**63 - 1, size=())), flush=True); os._exit(0)\n"
        "    os.waitpid(pid, 0)\n"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert len(out) == 2 and out[0] == out[1]


def test_forked_workers_reseed_torch():
    import subprocess

    code = (
        "import os, torch\n"
        "from xrayfed.common import mpc\n"
        "for _ in range(2):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        mpc.fresh_process_randomness()\n"
        "        print(int(torch.randint(-(2**63), 2**63 - 1, size=())), flush=True); os._exit(0)\n"
        "    os.waitpid(pid, 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert len(out) == 2 and out[0] != out[1]


def test_local_interface_for_loopback():
    name, ip = mpc.local_interface_for("127.0.0.1")
    assert ip == "127.0.0.1" and name


def test_three_party_ttp_session_matches_plaintext(pool, tmp_path):
    """Real processes on 127.0.0.1: the route CrypTen → our model → logits matches torch."""
    torch.manual_seed(0)
    spec = ModelSpec(num_outputs=3, width=8, depth=2, weight_standardization=True)
    ckpt = Checkpoint(model=spec, task=TaskSpec(kind="multiclass", class_names=("a", "b", "c")), image_size=16,
                      state_dict=build_model(spec).state_dict())
    x = torch.rand(1, 1, 16, 16)
    res = mpc.run_local_session(pool, ckpt, x, timeout_s=60)
    ref = ckpt.build()(x).detach().numpy()
    assert res["logits"].shape == ref.shape
    assert np.abs(res["logits"] - ref).max() < 1e-2
    assert res["ttp"]["seeds_from_os"] is True
    # no party process left behind: the fork server has no live children
    import time

    import psutil

    servers = [c for c in psutil.Process(os.getpid()).children()
               if "forkserver" in " ".join(c.cmdline())]
    assert servers
    deadline = time.time() + 10
    while time.time() < deadline:
        live = [c for s in servers for c in s.children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]
        if not live:
            break
        time.sleep(0.2)
    assert not live, [c.pid for c in live]
