"""Optional torchvision backbones (``resnet18``, ``densenet121``, ``mobilenet_v3_small``), made
DP-compatible: BatchNorm → GroupNorm, no in-place operations. They train in plaintext only
(GroupNorm has no CrypTen implementation) and load weights only from local files.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from xrayfed.common.modelspec import ModelSpec


def _no_inplace(model) -> None:
    for m in model.modules():
        if isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU)) and getattr(m, "inplace", False):
            m.inplace = False


def _patch_inplace_forwards(model) -> None:
    """torchvision blocks add residuals in place (``out += identity``) or call
    ``F.relu(..., inplace=True)``, which breaks Opacus' per-sample-gradient hooks; give those
    modules out-of-place forwards with the same arithmetic."""
    import types

    import torch
    import torch.nn.functional as F
    from torchvision.models.densenet import DenseNet
    from torchvision.models.mobilenetv3 import InvertedResidual
    from torchvision.models.resnet import BasicBlock, Bottleneck

    def resnet_forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        if isinstance(self, Bottleneck):
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
        else:
            out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)

    def inverted_residual_forward(self, x):
        result = self.block(x)
        return result + x if self.use_res_connect else result

    def densenet_forward(self, x):
        out = F.adaptive_avg_pool2d(F.relu(self.features(x)), (1, 1))
        return self.classifier(torch.flatten(out, 1))

    for m in model.modules():
        if isinstance(m, (BasicBlock, Bottleneck)):
            m.forward = types.MethodType(resnet_forward, m)
        elif isinstance(m, InvertedResidual):
            m.forward = types.MethodType(inverted_residual_forward, m)
        elif isinstance(m, DenseNet):
            m.forward = types.MethodType(densenet_forward, m)


def build_backbone(spec: ModelSpec):
    """A torchvision backbone with a 1-channel stem option, GroupNorm and no in-place ops."""
    import torch
    import torchvision.models as tvm
    from opacus.validators import ModuleValidator

    ctor = getattr(tvm, spec.arch)
    model = ctor(weights=None)  # never downloads: weights only from local files
    if spec.pretrained_path:
        path = Path(spec.pretrained_path)
        if not path.is_file():
            from xrayfed.common.errors import UserError

            raise UserError(f"model.pretrained_path: no file at {path} (weights load only from local files)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=False)
    # Replace the classification head.
    if spec.arch == "resnet18":
        model.fc = nn.Linear(model.fc.in_features, spec.num_outputs)
    elif spec.arch == "densenet121":
        model.classifier = nn.Linear(model.classifier.in_features, spec.num_outputs)
    else:  # mobilenet_v3_small
        last = model.classifier[-1]
        model.classifier[-1] = nn.Linear(last.in_features, spec.num_outputs)
    # Grayscale input: repeat channels inside the model so the stem keeps its shape.
    model = ModuleValidator.fix(model)  # BatchNorm -> GroupNorm
    _no_inplace(model)
    _patch_inplace_forwards(model)
    if spec.in_channels == 1:
        model = nn.Sequential(_RepeatChannels(3), model)
    if spec.input_pool > 1:
        model = nn.Sequential(nn.AvgPool2d(spec.input_pool), model)
    return model


class _RepeatChannels(nn.Module):
    """Repeats a grayscale channel so an RGB stem (and RGB pretrained weights) can be used."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times

    def forward(self, x):
        return x.repeat(1, self.times, 1, 1)
