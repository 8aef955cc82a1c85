"""XrayNet: its layer plan (one plan, two back ends) and the builder of every model.

The network is described once as a *layer plan* (:func:`layer_plan`); :func:`build_model`
turns it into ``torch.nn`` modules and ``xrayfed.common.mpc`` turns the same plan into
``crypten.nn`` modules, so state-dict keys are identical in both back ends.
:func:`fold_standardization` gives the plain-convolution weights of a weight-standardised
plan (what CrypTen and ONNX run).
"""

from __future__ import annotations

import torch.nn as nn

from xrayfed.common.model.backbones import build_backbone
from xrayfed.common.model.scatter_front import ScatterFront
from xrayfed.common.model.standardization import WSConv2d, standardize_weight
from xrayfed.common.modelspec import SCATTER_J, SCATTER_L, ModelSpec

# A layer plan entry: (kind, kwargs). Kinds: avgpool, conv, relu, gap, flatten, linear, and
# scatter (only as the first entry: public, parameter-free, applied by the patient under MPC).
Layer = tuple[str, dict]


def layer_plan(spec: ModelSpec) -> list[Layer]:
    """The XrayNet layers in order; both back ends build exactly this list (nn.Sequential)."""
    if spec.arch != "xraynet":
        raise ValueError(f"layer_plan is only defined for arch 'xraynet', not {spec.arch!r}")
    plan: list[Layer] = []
    c_in = spec.in_channels
    if spec.scattering:
        plan.append(("scatter", {"in_channels": c_in, "j": SCATTER_J, "orientations": SCATTER_L,
                                 "pool": spec.input_pool}))
        from xrayfed.common.scatter import n_features

        c_in *= n_features(SCATTER_J, SCATTER_L)
    elif spec.input_pool > 1:
        plan.append(("avgpool", {"kernel_size": spec.input_pool}))
    for i in range(spec.depth):
        c_out = spec.width * (2**i)
        conv = {"in_channels": c_in, "out_channels": c_out, "kernel_size": 3, "padding": 1}
        if spec.weight_standardization:
            conv["standardize"] = True
        plan.append(("conv", conv))
        plan.append(("relu", {}))
        if i < spec.depth - 1:
            plan.append(("avgpool", {"kernel_size": 2}))
        c_in = c_out
    plan.append(("gap", {}))
    plan.append(("flatten", {}))
    plan.append(("linear", {"in_features": c_in, "out_features": spec.num_outputs}))
    return plan


def _torch_layer(kind: str, kw: dict):
    if kind == "avgpool":
        return nn.AvgPool2d(**kw)
    if kind == "conv":
        kw = dict(kw)
        return WSConv2d(**kw) if kw.pop("standardize", False) else nn.Conv2d(**kw)
    if kind == "relu":
        return nn.ReLU()
    if kind == "scatter":
        return ScatterFront(**kw)
    if kind == "gap":
        return nn.AdaptiveAvgPool2d(1)
    if kind == "flatten":
        return nn.Flatten()
    if kind == "linear":
        return nn.Linear(**kw)
    raise ValueError(f"unknown layer kind {kind!r}")


def build_model(spec: ModelSpec):
    """A fresh ``torch.nn.Module`` for ``spec`` (DP-compatible: Opacus validates it)."""

    if spec.arch == "xraynet":
        return nn.Sequential(*[_torch_layer(k, kw) for k, kw in layer_plan(spec)])
    return build_backbone(spec)


def fold_standardization(spec: ModelSpec, state_dict: dict) -> dict:
    """The state dict of the plain-convolution model that computes exactly what ``spec``'s model
    with ``state_dict`` computes (weight standardisation applied to the stored weights)."""
    if not spec.weight_standardization or spec.arch != "xraynet":
        return dict(state_dict)
    import torch

    out = dict(state_dict)
    for i, (kind, _) in enumerate(layer_plan(spec)):
        k = f"{i}.weight"
        if kind == "conv" and k in out:
            with torch.no_grad():
                out[k] = standardize_weight(out[k].double()).to(out[k].dtype)
    return out


def plain_spec(spec: ModelSpec) -> ModelSpec:
    """``spec`` without weight standardisation (the architecture :func:`fold_standardization` targets)."""
    return spec.model_copy(update={"weight_standardization": False})


def count_parameters(model) -> int:
    """The number of scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())
