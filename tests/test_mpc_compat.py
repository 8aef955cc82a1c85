"""CrypTen 0.4.1 on torch 2.14: the shims of ``xrayfed.common.mpc`` (import, model building, the
dealt provider, the TLS link communicator) and the patient's numpy dealer, each with a test that
fails when the workaround breaks."""

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
        with pytest.raises(RuntimeError, match="dealt by a third party"):
            mpc.assert_ttp_provider()
    finally:
        mpc.use_ttp_provider()
    mpc.assert_ttp_provider()


@pytest.mark.parametrize("spec", [
    ModelSpec(num_outputs=1),
    ModelSpec(num_outputs=14, input_pool=4),
    ModelSpec(num_outputs=3, width=8, depth=2, in_channels=3),
    ModelSpec(num_outputs=1, width=8, input_pool=8, weight_standardization=True),
    ModelSpec(num_outputs=1, width=8, depth=2, input_pool=8, weight_standardization=True, scattering=True),
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


def test_dealer_products_match_torch():
    """The patient's numpy ring products are torch's (int64, wrap-around)."""
    from xrayfed.common.mpc import dealer

    g = dealer.Stream(dealer.new_seed())
    a, b = g.ring((2, 3, 9, 9)), g.ring((4, 3, 3, 3))
    for kw in ({"padding": 1}, {"stride": 2}, {"padding": 1, "stride": 2, "dilation": 1}):
        ref = torch.nn.functional.conv2d(torch.from_numpy(a), torch.from_numpy(b), **kw).numpy()
        assert np.array_equal(dealer.conv2d(a, b, **kw), ref), kw
    m1, m2 = g.ring((5, 7)), g.ring((7, 3))
    assert np.array_equal(dealer.ring_op("matmul", m1, m2, [], {}), torch.from_numpy(m1) @ torch.from_numpy(m2))
    # the same seed gives the same stream in two processes' worth of generators
    seed = dealer.new_seed()
    assert np.array_equal(dealer.Stream(seed).ring((100,)), dealer.Stream(seed).ring((100,)))
    assert not np.array_equal(dealer.Stream(seed).ring((100,)), dealer.Stream(dealer.new_seed()).ring((100,)))


def test_dealt_triples_open_to_products():
    """What the two parties draw plus the patient's corrections open to real Beaver triples."""
    from xrayfed.common.mpc import dealer

    tape = [{"f": "additive", "s0": [1, 2, 6, 6], "s1": [3, 2, 3, 3], "op": "conv2d", "args": [], "kw": {"padding": 1},
             "out": [1, 3, 6, 6]},
            {"f": "binary", "s0": [4, 5], "s1": [4, 5], "out": [4, 5]},
            {"f": "B2A", "s": [7], "out": [7]}]
    s0, s1 = dealer.new_seed(), dealer.new_seed()
    corr = dealer.deal(tape, s0, s1)
    assert corr.size == dealer.correction_sizes(tape)
    g0, g1, pos = dealer.Stream(s0), dealer.Stream(s1), 0
    a = torch.from_numpy(g0.ring([1, 2, 6, 6]) + g1.ring([1, 2, 6, 6]))
    b = torch.from_numpy(g0.ring([3, 2, 3, 3]) + g1.ring([3, 2, 3, 3]))
    c = g0.ring([1, 3, 6, 6]) + corr[pos:pos + 108].reshape(1, 3, 6, 6)
    pos += 108
    assert np.array_equal(c, torch.nn.functional.conv2d(a, b, padding=1).numpy())
    a, b = g0.ring([4, 5]) ^ g1.ring([4, 5]), g0.ring([4, 5]) ^ g1.ring([4, 5])
    assert np.array_equal(g0.ring([4, 5]) ^ corr[pos:pos + 20].reshape(4, 5), a & b)
    pos += 20
    bit = g0.bits([7]) ^ g1.bits([7])
    assert set(np.unique(bit)) <= {0, 1}
    assert np.array_equal(g0.ring([7]) + corr[pos:pos + 7], bit)


def test_tape_is_checked_and_recorded_per_architecture():
    from xrayfed.common.mpc import dealer

    spec = ModelSpec(num_outputs=2, width=8, depth=2, input_pool=2)
    tape = mpc.record_tape(spec, 32)
    assert tape == mpc.record_tape(spec, 32)  # deterministic: nothing secret in it
    ops = {(e["f"], e.get("op")) for e in tape}
    assert {("additive", "conv2d"), ("additive", "matmul"), ("binary", None), ("B2A", None)} <= ops
    assert tape[0]["s0"] == [1, 1, 16, 16]  # the input pool is the patient's (plaintext) step
    assert dealer.tape_digest(tape) != dealer.tape_digest(mpc.record_tape(spec.model_copy(update={"width": 4}), 32))
    with pytest.raises(ValueError):
        dealer.check_tape([{"f": "wraps", "s": [3]}])


def test_link_refuses_wrong_key_and_untrusted_certificate(tmp_path):
    """The crypto provider's party accepts only the TLS connection that proves the session's
    hospital key; the hospital's party refuses a certificate without the crypto provider name."""
    import threading
    import time

    from xrayfed.common.mpc import channel
    from xrayfed.server.pki import init_pki

    init_pki(tmp_path / "pki")
    pki = tmp_path / "pki"
    srv = channel.server_context(str(pki / "crypto-provider" / "tls.pem"), str(pki / "crypto-provider" / "tls.key"))
    cli = channel.client_context(str(pki / "ca.pem"))
    lsock = channel.listen("127.0.0.1")
    port = lsock.getsockname()[1]
    key = b"0123456789abcdef0123456789abcdef"
    got = {}

    def serve():
        try:
            got["link"] = channel.accept_hospital(lsock, key, time.monotonic() + 20, tls=srv, timeout_s=10)
        except channel.LinkError as e:
            got["error"] = e

    t = threading.Thread(target=serve)
    t.start()
    with pytest.raises(channel.LinkError, match="refused"):  # a fourth process without the key
        channel.connect_provider("127.0.0.1", port, b"f" * 32, tls=cli, server_name=channel.ROLE_NAME, timeout_s=5)
    import socket
    import ssl

    raw = socket.create_connection(("127.0.0.1", port))  # plaintext instead of TLS: dropped
    raw.sendall(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"key\":1}")
    raw.close()
    link = channel.connect_provider("127.0.0.1", port, key, tls=cli, server_name=channel.ROLE_NAME, timeout_s=5)
    t.join(10)
    assert "link" in got and isinstance(got["link"].sock, ssl.SSLSocket)
    link.send_tensor(torch.arange(5))
    assert torch.equal(got["link"].recv_tensor_into(torch.zeros(5, dtype=torch.long)), torch.arange(5))
    link.close()
    got["link"].close()
    lsock.close()
    # the inference service's certificate (same CA) is not a crypto provider's
    lsock = channel.listen("127.0.0.1")
    inf = channel.server_context(str(pki / "inference" / "tls.pem"), str(pki / "inference" / "tls.key"))
    t = threading.Thread(target=lambda: _accept_quietly(lsock, inf))
    t.start()
    with pytest.raises(channel.LinkError, match="TLS"):
        channel.connect_provider("127.0.0.1", lsock.getsockname()[1], key, tls=cli, server_name=channel.ROLE_NAME,
                                 timeout_s=5)
    t.join(10)
    lsock.close()


def _accept_quietly(lsock, ctx):
    try:
        raw, _ = lsock.accept()
        raw.settimeout(5)
        ctx.wrap_socket(raw, server_side=True).close()
    except Exception:  # noqa: BLE001 - the client hangs up during the handshake
        pass


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


@pytest.mark.parametrize("scattering,size", [(False, 16), (True, 32)])
def test_two_party_session_over_tls_matches_plaintext(pool, tmp_path, scattering, size):
    """Real party processes on 127.0.0.1 over the TLS link, this process dealing as the patient:
    the route CrypTen → our model → logits matches torch (for a ScatterNet model the patient
    computes the scattering features in numpy and shares those)."""
    from xrayfed.server.pki import init_pki

    init_pki(tmp_path / "pki")
    pki = tmp_path / "pki"
    torch.manual_seed(0)
    spec = ModelSpec(num_outputs=3, width=8, depth=2, weight_standardization=True, scattering=scattering)
    ckpt = Checkpoint(model=spec, task=TaskSpec(kind="multiclass", class_names=("a", "b", "c")), image_size=size,
                      state_dict=build_model(spec).state_dict())
    x = torch.rand(1, 1, size, size)
    tls = (str(pki / "crypto-provider" / "tls.pem"), str(pki / "crypto-provider" / "tls.key"), str(pki / "ca.pem"))
    res = mpc.run_local_session(pool, ckpt, x, timeout_s=60, tls=tls)
    ref = ckpt.build()(x).detach().numpy()
    assert res["logits"].shape == ref.shape
    assert np.abs(res["logits"] - ref).max() < 1e-2
    assert res["hospital"]["link_bytes_sent"] > 0 and res["provider"]["rounds"] > 0
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
