"""Weight standardisation: :class:`WSConv2d` and its per-sample gradient for Opacus.

:func:`register_ws_grad_sampler` registers :class:`WSConv2d`'s per-sample-gradient function with
Opacus (the chain rule through the standardisation), so DP-SGD clips the true per-sample
gradients: on import when Opacus is already imported, else by whatever wraps a model for DP
(:func:`xrayfed.client.dp.engine.make_private`). A process that never trains (the ServerApp,
an encrypted prediction's parties, export) does not import Opacus for it (about 1.3 s).
:func:`xrayfed.common.model.xraynet.fold_standardization` turns a trained model into plain
convolutions with identical outputs (what CrypTen and ONNX run).
"""

from __future__ import annotations

import sys

import torch.nn as nn


WS_EPS = 1e-5


def standardize_weight(w, eps: float = WS_EPS):
    """``(w − mean) / sqrt(var + eps)`` per output channel (over in-channels × kernel)."""
    flat = w.reshape(w.shape[0], -1)
    mu = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, unbiased=False, keepdim=True)
    return ((flat - mu) / (var + eps).sqrt()).reshape(w.shape)


class WSConv2d(nn.Conv2d):
    """A convolution with weight standardisation (Qiao et al. 2019; used for DP-SGD by De et al.
    2022). It acts on the weights only, so :func:`~xrayfed.common.model.xraynet.fold_standardization` turns
    it into a plain convolution with identical outputs (what CrypTen and ONNX run). Per-sample gradients for
    Opacus: :func:`_ws_conv_grad_sample`."""

    def forward(self, x):
        import torch.nn.functional as F

        return F.conv2d(x, standardize_weight(self.weight), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


_registered = False


def register_ws_grad_sampler() -> None:
    """Opacus' per-sample gradients for :class:`WSConv2d` (once per process; call it before
    wrapping a model in ``GradSampleModule``): the conv per-sample gradient with respect to the
    standardised weight ŵ, then the chain rule through the standardisation,
    ∂L/∂w = (g − mean(g) − ŵ·mean(g·ŵ)) / s (per output channel; s = sqrt(var + eps))."""
    global _registered
    if _registered:
        return
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

    _registered = True


if "opacus" in sys.modules:  # already paid for: registered now, as before
    register_ws_grad_sampler()
