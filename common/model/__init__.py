"""The chest X-ray classifiers: one definition, two back ends (PyTorch and CrypTen).

``XrayNet`` is designed for DP training on small GPUs and for cheap evaluation under secure
multi-party computation:

* no BatchNorm (Opacus needs per-sample gradients) and no activation normalisation (square
  roots/divisions of activations are expensive and inaccurate under MPC; CrypTen has no
  GroupNorm);
* only convolutions, ReLU, average pooling (linear, so free under MPC) and one linear head;
* resolution-agnostic: a global average pool before the head; ``input_pool`` average-pools
  the scan first (e.g. 4 at 224 px, so convolutions run at 56 px);
* well under 1 M parameters (width 32, depth 3: ~93 k).

The package, one module per concept:

* :mod:`~.xraynet`: the layer plan (:func:`layer_plan`, read by both back ends: this package
  builds ``torch.nn`` modules from it, :mod:`xrayfed.common.mpc` builds ``crypten.nn`` modules,
  so state-dict keys are identical), :func:`build_model` for every architecture, and
  :func:`fold_standardization`;
* :mod:`~.scatter_front`: :class:`ScatterFront`, the ScatterNet front end as a module (the
  numpy transform itself is :mod:`xrayfed.common.scatter`), and its per-scan feature cache
  (:func:`feature_cache`);
* :mod:`~.standardization`: :class:`WSConv2d` (weight standardisation) and its per-sample
  gradient for Opacus;
* :mod:`~.backbones`: the optional torchvision backbones (``resnet18``, ``densenet121``,
  ``mobilenet_v3_small``), made DP-compatible (BatchNorm → GroupNorm, no in-place ops); they
  train in plaintext only and load weights only from local files.

The architecture description (:class:`ModelSpec`) is torch-free and lives in
:mod:`xrayfed.common.modelspec` (config, round protocol and SecAgg+ stages read it without
loading torch); it is re-exported here, where the models are built.
"""

from xrayfed.common.model.backbones import build_backbone
from xrayfed.common.model.scatter_front import ScatterFront, feature_cache
from xrayfed.common.model.standardization import WS_EPS, WSConv2d, standardize_weight
from xrayfed.common.model.xraynet import (
    Layer,
    build_model,
    count_parameters,
    fold_standardization,
    layer_plan,
    plain_spec,
)
from xrayfed.common.modelspec import BACKBONES, SCATTER_J, SCATTER_L, Arch, ModelSpec, default_model

__all__ = [
    "BACKBONES", "SCATTER_J", "SCATTER_L", "WS_EPS", "Arch", "Layer", "ModelSpec", "ScatterFront", "WSConv2d",
    "build_backbone", "build_model", "count_parameters", "default_model", "feature_cache", "fold_standardization",
    "layer_plan", "plain_spec", "standardize_weight",
]
