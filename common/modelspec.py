"""What a model is, without building one: :class:`ModelSpec` (the architecture, stored in every
checkpoint and sent with every round request) and :func:`default_model` (the recommended XrayNet
for a scan size).

This module imports no torch, so that reading a config, a round request or a checkpoint's
header does not load it: a SecAgg+ key-exchange stage of a hospital's ClientApp starts in about
a second instead of several (``tests/test_layout.py``). :mod:`xrayfed.common.model` builds the
networks and re-exports these names.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: The ScatterNet front end's scales J and orientations L (order 2).
SCATTER_J, SCATTER_L = 2, 8

Arch = Literal["xraynet", "resnet18", "densenet121", "mobilenet_v3_small"]
BACKBONES = ("resnet18", "densenet121", "mobilenet_v3_small")


class ModelSpec(BaseModel):
    """Architecture of a model; stored in every checkpoint so a loader can refuse a mismatch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: Arch = "xraynet"
    in_channels: Literal[1, 3] = 1
    num_outputs: int = Field(1, ge=1)
    width: int = Field(32, ge=4, le=256, description="channels of the first conv (doubles per stage)")
    depth: int = Field(3, ge=1, le=6, description="conv stages (conv-ReLU-avgpool)")
    input_pool: int = Field(1, ge=1, le=16, description="average-pool factor applied to the scan first")
    weight_standardization: bool = Field(False, description="XrayNet convolutions standardise their weights "
                                                            "(zero mean, unit variance per output channel) in the "
                                                            "forward pass; folded into plain weights for MPC/export")
    scattering: bool = Field(False, description="XrayNet starts with a fixed ScatterNet front end (order 2, J = 2, "
                                                "L = 8, after the input pool): 81 feature maps per channel at 1/4 "
                                                "resolution; the patient computes it in plaintext for MPC")
    pretrained_path: str | None = Field(None, description="local .pt/.pth state dict for backbones")


def default_model(image_size: int, num_outputs: int = 1, in_channels: int = 1) -> ModelSpec:
    """The XrayNet the project recommends at ``image_size`` px (chosen on validation sweeps,
    docs/accuracy.md), weight-standardised:

    * scans of 16–55 px (PneumoniaMNIST's 28 px, the demo's 32 px): the fixed ScatterNet front
      end (Tramèr & Boneh 2021; 81 feature maps at 1/4 size) and two convolution stages. Under
      DP it trained faster and steadier (PneumoniaMNIST val AUC at ε = 1: 0.935 vs 0.911 over
      3 seeds, no round-1 collapse; ε = 8: 0.98 either way);
    * scans of 56 px and more: an input pool to about 28 px (8 at 224 px) and three convolution
      stages. On Kermany 224 px the ScatterNet front end lost on validation at ε = 8 (0.969 vs
      0.987) and without DP (0.931 vs 0.990); it won on validation at ε = 1 (0.952 vs 0.921)
      but not on test (0.868 vs 0.884);
    * below 16 px: three stages, no front end (too little image for the transform)."""
    if image_size >= 56:
        return ModelSpec(num_outputs=num_outputs, in_channels=in_channels, input_pool=max(1, image_size // 28),
                         weight_standardization=True)
    if image_size >= 16:
        return ModelSpec(num_outputs=num_outputs, in_channels=in_channels, weight_standardization=True,
                         scattering=True, depth=2)
    return ModelSpec(num_outputs=num_outputs, in_channels=in_channels, weight_standardization=True)
