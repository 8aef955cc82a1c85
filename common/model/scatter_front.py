"""The ScatterNet front end as a ``torch.nn`` module, and its per-scan feature cache.

:class:`ScatterFront` computes the fixed order-2 scattering transform of :mod:`xrayfed.common.scatter`
(the numpy definition the patient runs) with torch: by FFTs while training and evaluating, by real
matrix products when exported (ONNX has no complex numbers). It has no parameters; XrayNet's layer
plan puts it first when ``[model] scattering`` is on.

On the CPU the features of scans seen before come from a bounded in-memory cache
(:data:`_SCATTER_CACHE`); :func:`feature_cache` turns it off for a block (augmented views).
"""

from __future__ import annotations

import contextlib

import torch.nn as nn


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
