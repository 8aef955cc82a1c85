"""The compact chest X-ray classifier: one definition, two back ends (PyTorch and CrypTen).

``XrayNet`` is designed for DP training on small GPUs and for cheap evaluation under secure
multi-party computation:

* no BatchNorm (Opacus needs per-sample gradients) and no activation normalisation (square
  roots/divisions of activations are expensive and inaccurate under MPC; CrypTen has no
  GroupNorm);
* only convolutions, ReLU, average pooling (linear, so free under MPC) and one linear head;
* resolution-agnostic: a global average pool before the head; ``input_pool`` average-pools
  the scan first (e.g. 4 at 224 px, so convolutions run at 56 px);
* well under 1 M parameters (width 32, depth 3: ~93 k).

The network is described once as a *layer plan* (:func:`layer_plan`); :func:`build_model`
turns it into ``torch.nn`` modules and ``xrayfed.common.mpc`` turns the same plan into
``crypten.nn`` modules, so state-dict keys are identical in both back ends.

Optional torchvision backbones (``resnet18``, ``densenet121``, ``mobilenet_v3_small``) are
made DP-compatible (BatchNorm → GroupNorm, no in-place ops); they train in plaintext only
(GroupNorm has no CrypTen implementation) and load weights only from local files.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch.nn as nn

# The architecture description is torch-free (config, round protocol and SecAgg+ stages read it
# without loading torch); it is re-exported here, where the models are built.
from xrayfed.common.modelspec import BACKBONES, SCATTER_J, SCATTER_L, Arch, ModelSpec, default_model  # noqa: F401

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
    return _build_backbone(spec)


class _FeatureCache:
    """A bounded LRU map (bytes of the stored tensors) for :meth:`ScatterFront._forward_cached`."""

    def __init__(self, max_bytes: int) -> None:
        from collections import OrderedDict

        self.max_bytes, self.bytes, self._d = max_bytes, 0, OrderedDict()

    def __contains__(self, key) -> bool:
        return key in self._d

    def get(self, key):
        self._d.move_to_end(key)
        return self._d[key]

    def put(self, key, value) -> None:
        if key in self._d:
            return
        self._d[key] = value
        self.bytes += value.numel() * value.element_size()
        while self.bytes > self.max_bytes and self._d:
            _, old = self._d.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


_SCATTER_CACHE = _FeatureCache(256 << 20)  # 256 MiB: ~16 000 scans' features at 28 px
_CACHE_ON = [True]


@contextlib.contextmanager
def feature_cache(enabled: bool = True):
    """Within the block, :class:`ScatterFront` uses the per-scan feature cache only if
    ``enabled`` (off while training on augmented views, which would only fill it with views that
    never come back)."""
    before = _CACHE_ON[0]
    _CACHE_ON[0] = bool(enabled)
    try:
        yield
    finally:
        _CACHE_ON[0] = before


class ScatterFront(nn.Module):
    """The fixed scattering front end (:mod:`xrayfed.common.scatter`) as a parameter-free module:
    input pool by ``pool``, then the order-2 scattering and its per-image standardisation, with
    the arithmetic of :func:`xrayfed.common.scatter.scatter_numpy` (what the patient runs), in
    float64 like it (so training, the patient and an exported model agree to float32 rounding
    of the features, not to an FFT's float32 error amplified by the weights). No gradient flows
    through it (nothing in it trains), so Opacus sees only the layers after it.
    The filters are rebuilt per input size and device and are not part of the state dict."""

    def __init__(self, in_channels: int = 1, j: int = 2, orientations: int = 8, pool: int = 1) -> None:
        super().__init__()
        self.in_channels, self.j, self.orientations, self.pool = in_channels, j, orientations, pool
        self._cache: tuple | None = None

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, J={self.j}, L={self.orientations}, pool={self.pool}"

    def _filters(self, n: int, device):
        import numpy as np
        import torch

        from xrayfed.common.scatter import filter_bank

        if self._cache is None or self._cache[0] != n or self._cache[1] != device:
            psi, phi = filter_bank(n, self.j, self.orientations)
            self._cache = (n, device, torch.from_numpy(np.array(psi)).to(device),
                           torch.from_numpy(np.array(phi)).to(device))
        return self._cache[2], self._cache[3]

    def forward(self, x):
        import torch

        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return self._forward_real(x)  # export: the same transform in real matmuls (ONNX has no complex)
        if x.is_cuda or torch.is_grad_enabled() and x.requires_grad or not _CACHE_ON[0]:
            return self._forward_fft(x)
        return self._forward_cached(x)

    def _forward_cached(self, x):
        """:meth:`_forward_fft`, computed only for the scans not seen before (CPU). The transform
        is a fixed per-scan function and DP-SGD draws the same scans epoch after epoch, so on 2
        CPU cores this saves most of its cost. Keyed by a digest of the scan's bytes, in this
        process's memory only (:data:`_SCATTER_CACHE`, bounded), never written anywhere."""
        import hashlib

        import torch

        flat = x.detach().contiguous()
        raw = flat.numpy().reshape(len(flat), -1)
        tag = (self.in_channels, self.j, self.orientations, self.pool, tuple(x.shape[1:]), str(x.dtype))
        keys = [(tag, hashlib.blake2b(r.tobytes(), digest_size=16).digest()) for r in raw]
        got = {i: _SCATTER_CACHE.get(k) for i, k in enumerate(keys) if k in _SCATTER_CACHE}
        miss = [i for i in range(len(keys)) if i not in got]
        if miss:
            for i, f in zip(miss, self._forward_fft(flat[miss])):
                got[i] = f.clone()
                _SCATTER_CACHE.put(keys[i], got[i])  # may evict others; this batch is assembled from `got`
        return torch.stack([got[i] for i in range(len(keys))])

    def _forward_fft(self, x):
        """:func:`xrayfed.common.scatter.scatter` with torch (FFTs, float64), after the input pool."""
        import torch
        import torch.nn.functional as F

        from xrayfed.common.scatter import scatter

        with torch.no_grad():
            dtype = x.dtype
            if self.pool > 1:
                x = F.avg_pool2d(x, self.pool)
            out = scatter(x.double(), self.j, self.orientations, filters=lambda n: self._filters(n, x.device),
                          fft=torch.fft, pad=lambda a, widths: F.pad(a, (widths[2], widths[3], widths[0], widths[1]),
                                                                      mode="reflect"),
                          modulus=lambda z: torch.view_as_real(z).square().sum(-1).sqrt(),
                          cat=lambda parts, axis: torch.cat(parts, dim=axis))
            return out.to(dtype)

    def _forward_real(self, x):
        """:meth:`_forward_fft` with every complex step written as real tensors and each 2-D DFT
        as two matrix products (``F X F``, ``F`` the symmetric DFT matrix): only MatMul, Mul,
        Add, Sqrt, Pad and reductions, which every ONNX runtime and TorchScript run. Shapes are
        fixed by the example input (the export's), except the batch. Computed in float64 (the
        DFT as matrix products accumulates more rounding than an FFT; in float32 a trained
        model's logits drifted by 1.2e-4, over the export's 1e-4 check), returned in the
        input's dtype."""
        import numpy as np
        import torch
        import torch.nn.functional as F

        from xrayfed.common.scatter import _geometry, filter_bank, fold, standardise_orders

        j, L = self.j, self.orientations
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        h, w = int(x.shape[-2]), int(x.shape[-1])
        c = self.in_channels
        pad, n = _geometry(h, w, j)
        psi_np, phi_np = filter_bank(n, j, L)

        dtype = x.dtype

        def const(a):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(x.device)

        mats = {}

        def dft(m):
            m = int(m)
            if m not in mats:
                kl = np.outer(np.arange(m), np.arange(m)) * (2 * np.pi / m)
                mats[m] = (const(np.cos(kl)), const(np.sin(kl)))
            return mats[m]

        def fft2(a, b):  # F (a + ib) F, F = C − iS
            cm, sm = dft(a.shape[-1])
            mr, mi = cm @ a + sm @ b, cm @ b - sm @ a
            return mr @ cm + mi @ sm, mi @ cm - mr @ sm

        def ifft2(a, b):  # conj(F) (a + ib) conj(F) / m²
            m = int(a.shape[-1])
            cm, sm = dft(m)
            mr, mi = cm @ a - sm @ b, cm @ b + sm @ a
            return (mr @ cm - mi @ sm) / (m * m), (mr @ sm + mi @ cm) / (m * m)

        def mul(a, b, cr, ci):
            return a * cr - b * ci, a * ci + b * cr

        psi_r, psi_i, phi_r = const(psi_np.real), const(psi_np.imag), const(phi_np.real)
        xp = F.pad(x.double(), (pad, n - w - pad, pad, n - h - pad), mode="reflect")
        xr, xi = fft2(xp, torch.zeros_like(xp))
        xr, xi = xr.unsqueeze(2), xi.unsqueeze(2)
        ar, ai = ifft2(*mul(xr, xi, psi_r, psi_i))
        u1r, u1i = fft2(torch.sqrt(ar * ar + ai * ai), torch.zeros_like(ar))
        step = 2**j
        lows = [(xr, xi, 1, 0), (u1r, u1i, 1, 1)]
        for s1 in range(j - 1):
            for s2 in range(s1 + 1, j):
                k = 2**s2
                sl1, sl2 = slice(s1 * L, (s1 + 1) * L), slice(s2 * L, (s2 + 1) * L)
                zr, zi = mul(u1r[:, :, sl1, None], u1i[:, :, sl1, None], psi_r[None, sl2], psi_i[None, sl2])
                zr, zi = fold(zr, k), fold(zi, k)
                ar, ai = ifft2(zr, zi)
                u2r, u2i = fft2(torch.sqrt(ar * ar + ai * ai), torch.zeros_like(ar))
                lows.append((u2r.flatten(2, 3), u2i.flatten(2, 3), k, 2))
        groups: list[list] = [[], [], []]
        o, hh, ww = pad // step, -(-h // step), -(-w // step)
        for ur, ui, k, order in lows:
            pr = fold(phi_r, k)
            lr, _ = ifft2(fold(ur * pr, step // k), fold(ui * pr, step // k))
            groups[order].append(lr[..., o:o + hh, o:o + ww])
        assert c == x.shape[1]
        return standardise_orders(groups, lambda parts, axis: torch.cat(parts, dim=axis)).to(dtype)


WS_EPS = 1e-5


def standardize_weight(w, eps: float = WS_EPS):
    """``(w − mean) / sqrt(var + eps)`` per output channel (over in-channels × kernel)."""
    flat = w.reshape(w.shape[0], -1)
    mu = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, unbiased=False, keepdim=True)
    return ((flat - mu) / (var + eps).sqrt()).reshape(w.shape)


class WSConv2d(nn.Conv2d):
    """A convolution with weight standardisation (Qiao et al. 2019; used for DP-SGD by De et al.
    2022). It acts on the weights only, so :func:`fold_standardization` turns it into a plain
    convolution with identical outputs (what CrypTen and ONNX run). Per-sample gradients for
    Opacus: :func:`_ws_conv_grad_sample`."""

    def forward(self, x):
        import torch.nn.functional as F

        return F.conv2d(x, standardize_weight(self.weight), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


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


def _register_ws_grad_sampler() -> None:
    """Opacus' per-sample gradients for :class:`WSConv2d`: the conv per-sample gradient with
    respect to the standardised weight ŵ, then the chain rule through the standardisation,
    ∂L/∂w = (g − mean(g) − ŵ·mean(g·ŵ)) / s (per output channel; s = sqrt(var + eps))."""
    try:
        from opacus.grad_sample.utils import register_grad_sampler
    except ImportError:  # pragma: no cover - opacus is a dependency
        return
    import torch
    import torch.nn.functional as F

    @register_grad_sampler(WSConv2d)
    def _ws_conv_grad_sample(layer, activations, backprops):
        a = activations[0].to(backprops.dtype)
        n = a.shape[0]
        cols = F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        bp = backprops.reshape(n, layer.out_channels, -1)
        ret = {}
        if layer.weight.requires_grad:
            g = torch.einsum("nol,nil->noi", bp, cols)  # ∂L_i/∂ŵ
            w = layer.weight.detach().reshape(layer.out_channels, -1)
            s = (w.var(dim=1, unbiased=False, keepdim=True) + WS_EPS).sqrt()
            w_hat = (w - w.mean(dim=1, keepdim=True)) / s
            gw = (g - g.mean(dim=-1, keepdim=True) - w_hat * (g * w_hat).mean(dim=-1, keepdim=True)) / s
            ret[layer.weight] = gw.reshape(n, *layer.weight.shape)
        if layer.bias is not None and layer.bias.requires_grad:
            ret[layer.bias] = bp.sum(dim=-1)
        return ret


_register_ws_grad_sampler()


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


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


def _build_backbone(spec: ModelSpec):
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
