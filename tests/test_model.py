"""The compact classifier and checkpoints."""

from __future__ import annotations

import pytest
import torch

from xrayfed.common.checkpoint import Checkpoint, save_checkpoint
from xrayfed.common.errors import UserError
from xrayfed.common.model import ModelSpec, build_model, count_parameters, layer_plan
from xrayfed.common.prediction import TaskSpec
from xrayfed.common.security.atrest import load_checkpoint


def test_xraynet_is_compact_resolution_agnostic_and_dp_ready():
    from opacus.validators import ModuleValidator

    spec = ModelSpec(num_outputs=14)
    model = build_model(spec)
    assert count_parameters(model) <= 1_000_000
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []
    for size in (28, 64, 224):
        assert model(torch.zeros(2, 1, size, size)).shape == (2, 14)
    pooled = build_model(ModelSpec(num_outputs=1, input_pool=4))
    assert pooled(torch.zeros(1, 1, 224, 224)).shape == (1, 1)
    kinds = {k for k, _ in layer_plan(spec)}
    assert kinds <= {"avgpool", "conv", "relu", "gap", "flatten", "linear"}  # cheap under MPC


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "densenet121"])
def test_backbones_train_with_opacus(arch, tmp_path):
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    spec = ModelSpec(arch=arch, num_outputs=2)
    model = build_model(spec)
    assert ModuleValidator.validate(model, strict=False) == []
    gsm = GradSampleModule(model)
    x = torch.randn(3, 1, 32, 32)
    loss = gsm(x).sum()
    loss.backward()
    assert all(p.grad_sample is not None and p.grad_sample.shape[0] == 3 for p in gsm.parameters() if p.requires_grad)
    # weights load only from local files
    with pytest.raises(UserError):
        build_model(ModelSpec(arch=arch, num_outputs=2, pretrained_path=str(tmp_path / "missing.pt")))


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    spec = ModelSpec(num_outputs=1, width=8)
    task = TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA"))
    model = build_model(spec)
    ck = Checkpoint(model=spec, task=task, image_size=28, state_dict=model.state_dict(), round=3, run_id="r")
    save_checkpoint(tmp_path / "c.pt", ck)
    back = load_checkpoint(tmp_path / "c.pt")
    assert back.round == 3 and back.model == spec and back.task == task and back.model_version == ck.model_version
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(back.build()(x), model.eval()(x))
    # weights of another architecture are refused with a clear error
    other = Checkpoint(model=spec, task=task, image_size=28, state_dict=build_model(ModelSpec(num_outputs=1, width=16)).state_dict())
    with pytest.raises(UserError, match="does not match the model architecture"):
        other.build()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable xrayfed checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_weight_standardised_conv_per_sample_gradients_are_exact_and_fold_into_plain_weights():
    """Opacus' per-sample gradients of the weight-standardised XrayNet equal autograd on one
    example at a time, and folding the standardisation gives a plain-conv model (what CrypTen
    and ONNX run) with the same outputs."""
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    from opacus.grad_sample import GradSampleModule as GSM

    from xrayfed.common.model import WSConv2d, fold_standardization, plain_spec
    from xrayfed.common.model.standardization import register_ws_grad_sampler

    register_ws_grad_sampler()  # what make_private does: this test checks that function, not a fallback
    assert WSConv2d in GSM.GRAD_SAMPLERS
    torch.manual_seed(0)
    spec = ModelSpec(num_outputs=1, width=4, depth=3, weight_standardization=True)
    model = build_model(spec)
    assert any(isinstance(m, WSConv2d) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []
    x, y = torch.randn(4, 1, 16, 16), torch.rand(4, 1)
    gsm = GradSampleModule(model, loss_reduction="sum")
    torch.nn.functional.binary_cross_entropy_with_logits(gsm(x), y, reduction="sum").backward()
    sd = {k.removeprefix("_module."): v.detach().clone() for k, v in gsm.state_dict().items()}
    for i in range(4):
        one = build_model(spec)
        one.load_state_dict(sd)
        torch.nn.functional.binary_cross_entropy_with_logits(one(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        for (name, p), (_, q) in zip(gsm.named_parameters(), one.named_parameters()):
            assert torch.allclose(p.grad_sample[i], q.grad, atol=1e-5, rtol=1e-4), name
    ws = build_model(spec)
    ws.load_state_dict(sd)
    plain = build_model(plain_spec(spec))
    plain.load_state_dict(fold_standardization(spec, sd))
    assert not any(isinstance(m, WSConv2d) for m in plain.modules())
    with torch.no_grad():
        assert torch.allclose(ws(x), plain(x), atol=1e-5)
    ckpt = Checkpoint(model=spec, task=TaskSpec(kind="binary", class_names=("a", "b")), image_size=16, state_dict=sd)
    with torch.no_grad():
        assert torch.allclose(ckpt.build(plain=True)(x), ws(x), atol=1e-5)


def test_a_process_that_never_trains_does_not_import_opacus_for_the_model():
    """The ServerApp, an encrypted prediction's parties and export build models but never train:
    the weight-standardised conv's per-sample gradient is registered with Opacus only where a
    model is wrapped for DP (make_private), or at import where Opacus is already loaded."""
    import subprocess
    import sys

    code = ("import sys; import xrayfed.server.server_app; from xrayfed.common.model import build_model, "
            "default_model; build_model(default_model(28)); print('opacus' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    code = ("import opacus; from opacus.grad_sample import GradSampleModule as G; "
            "from xrayfed.common.model import WSConv2d; print(WSConv2d in G.GRAD_SAMPLERS)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "True"
