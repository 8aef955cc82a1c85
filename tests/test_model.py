"""The compact classifier and checkpoints."""

from __future__ import annotations

import pytest
import torch

from xrayfed.common.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from xrayfed.common.errors import UserError
from xrayfed.common.model import ModelSpec, build_model, count_parameters, layer_plan
from xrayfed.common.prediction import TaskSpec


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
