"""A fixed scattering front end (ScatterNet; Mallat 2012, Oyallon & Mallat 2015), as used for
DP-SGD by Tramèr & Boneh 2021 ("Differentially private learning needs better features").

A 2-D scattering transform of order 2 with ``J`` scales and ``L`` orientations: Morlet wavelets,
the complex modulus, and a Gaussian low-pass followed by subsampling by ``2**J``. For one
grey-scale channel it gives ``1 + J·L + L²·J(J−1)/2`` feature maps (81 for J = 2, L = 8) at
``1/2**J`` of the input resolution. Every map is then standardised per image (zero mean, unit
variance over the maps of the same order and all positions), a parameter-free normalisation.

The transform has **no trainable parameters and nothing secret**: it is a public function of
the scan. Under DP-SGD it is part of the input pipeline (it does not touch the privacy
accounting: per-example, no state). For an encrypted prediction the *patient* computes it on
its own plaintext scan before sharing the features, so its non-linear parts (modulus,
normalisation) cost nothing under MPC and are exact.

One filter bank (:func:`filter_bank`, numpy), one transform (:func:`scatter`, written against
the array library it is given) and its two appliers: :func:`scatter_numpy` (the patient; numpy
only, no torch import) and :class:`xrayfed.common.model.scatter_front.ScatterFront`
(``torch.nn.Module`` for training and plaintext evaluation, CPU or CUDA; it also has a
real-arithmetic form for export).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

NORM_EPS = 1e-5


def n_features(j: int, orientations: int) -> int:
    """Feature maps per input channel: ``1 + J·L + L²·J(J−1)/2``."""
    return 1 + j * orientations + orientations * orientations * j * (j - 1) // 2


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Periodic coordinates of an ``n × n`` grid, centred at index 0 (so filters need no shift)."""
    c = np.fft.fftfreq(n) * n
    return np.meshgrid(c, c, indexing="ij")


def _gabor(n: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """A Gabor filter: an elliptic Gaussian envelope (width ``sigma`` along ``theta``, ``sigma/slant``
    across) times a plane wave of frequency ``xi`` along ``theta``; unit L1 mass of the envelope."""
    y, x = _grid(n)
    u = x * math.cos(theta) + y * math.sin(theta)   # along the wave
    v = -x * math.sin(theta) + y * math.cos(theta)  # across it
    env = np.exp(-(u * u + (slant * v) ** 2) / (2 * sigma * sigma))
    env /= env.sum()
    return env * np.exp(1j * xi * u)


def _morlet(n: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """A Morlet wavelet: the Gabor filter minus the multiple of its envelope that makes it sum to
    zero (a band-pass: it ignores the local mean brightness)."""
    g = _gabor(n, sigma, theta, xi, slant)
    env = _gabor(n, sigma, theta, 0.0, slant)
    return g - env * (g.sum() / env.sum())


@lru_cache(maxsize=8)
def filter_bank(n: int, j: int, orientations: int) -> tuple[np.ndarray, np.ndarray]:
    """``(psi_hat, phi_hat)``: the Fourier transforms of the ``J·L`` Morlet wavelets
    (``psi_hat[j1 * L + l]``: scale ``2**j1``, angle ``l·π/L``) and of the Gaussian low-pass at
    scale ``2**J``, on an ``n × n`` periodic grid (complex128; read-only)."""
    psi = np.stack([
        np.fft.fft2(_morlet(n, 0.8 * 2 ** s, math.pi * ell / orientations, 3 * math.pi / 4 / 2 ** s,
                            4.0 / orientations))
        for s in range(j) for ell in range(orientations)
    ])
    phi = np.fft.fft2(_gabor(n, 0.8 * 2 ** j, 0.0, 0.0, 1.0)).real.astype(np.complex128)
    psi.setflags(write=False)
    phi.setflags(write=False)
    return psi, phi


def _geometry(h: int, w: int, j: int) -> tuple[int, int]:
    """``(pad, n)``: reflection padding on each side (``2**(J+1)``) and the periodic grid size (a
    multiple of ``2**J`` that holds the padded scan)."""
    pad = 2 ** (j + 1)
    if pad >= min(h, w):
        raise ValueError(f"a {h}×{w} input is too small for a scattering with J = {j} (needs > {pad} px)")
    side = max(h, w) + 2 * pad
    n = -(-side // 2 ** j) * 2 ** j
    return pad, n


def fold(xh, k: int):
    """Subsampling by ``k`` in space, done on a Fourier transform (last two axes, ``n × n`` with
    ``k | n``): the mean of the ``k²`` aliased copies. ``ifft2(fold(X, k)) == ifft2(X)[::k, ::k]``.
    Works on numpy arrays and torch tensors alike."""
    if k == 1:
        return xh
    n = xh.shape[-1]
    m = n // k
    return xh.reshape(*xh.shape[:-2], k, m, k, m).sum(-4).sum(-2) / (k * k)


def scatter(x, j: int, orientations: int, *, filters, fft, pad, modulus, cat):
    """The scattering features of ``x`` (N, C, H, W, float64): (N, C·K, ⌈H/2**J⌉, ⌈W/2**J⌉),
    standardised per image and order. Each step runs at the resolution its band allows: first
    order at full size, second order at ``1/2**j2``, everything low-passed at ``1/2**J``.

    Written once for both appliers (:func:`scatter_numpy`, and ``ScatterFront`` in
    :mod:`xrayfed.common.model.scatter_front`), which pass their array library's pieces:
    ``filters(n)`` gives :func:`filter_bank`'s ``(psi_hat, phi_hat)`` as that library's arrays;
    ``fft`` is ``numpy.fft`` or ``torch.fft``; ``pad(x, widths)`` reflect-pads the last two axes
    (``widths``: top, bottom, left, right); ``modulus(z)`` is ``|z|``; ``cat(parts, axis)``
    concatenates."""
    n_, c, h, w = x.shape
    p, n = _geometry(h, w, j)
    psi, phi = filters(n)
    L = orientations
    xh = fft.fft2(pad(x, (p, n - h - p, p, n - w - p)))[:, :, None]     # N, C, 1, n, n
    u1h = fft.fft2(modulus(fft.ifft2(xh * psi)))                          # first order, full size
    lows = [(xh, 1, 0), (u1h, 1, 1)]
    for s1 in range(j - 1):
        for s2 in range(s1 + 1, j):
            k = 2 ** s2
            z = fold(u1h[:, :, s1 * L:(s1 + 1) * L, None] * psi[None, s2 * L:(s2 + 1) * L], k)
            u2h = fft.fft2(modulus(fft.ifft2(z)))
            lows.append((u2h.reshape(n_, c, -1, n // k, n // k), k, 2))
    step = 2 ** j
    o, hh, ww = p // step, -(-h // step), -(-w // step)
    groups: list[list] = [[], [], []]
    for uh, k, order in lows:
        low = fft.ifft2(fold(uh * fold(phi, k), step // k)).real
        groups[order].append(low[..., o:o + hh, o:o + ww])
    return standardise_orders(groups, cat)


def standardise_orders(groups: list[list], cat):
    """The transform's last step, per image and per order (0, 1, 2): ``(s − mean) /
    sqrt(var + NORM_EPS)`` over the order's maps and positions; then all maps as channels
    (N, C·K, H', W'). ``groups[order]`` lists that order's low-passed maps (N, C, m, H', W')."""
    orders = []
    for g in groups:
        if g:
            s = cat(g, 2)
            mu = s.mean(axis=(2, 3, 4), keepdims=True)
            var = ((s - mu) ** 2).mean(axis=(2, 3, 4), keepdims=True)
            orders.append((s - mu) / (var + NORM_EPS) ** 0.5)
    out = cat(orders, 2)
    return out.reshape(out.shape[0], -1, *out.shape[-2:])


def scatter_numpy(x: np.ndarray, j: int = 2, orientations: int = 8) -> np.ndarray:
    """:func:`scatter` in numpy (the patient's applier; no torch import), float64."""
    def pad(a, widths):
        t, b, left, r = widths
        return np.pad(a, ((0, 0), (0, 0), (t, b), (left, r)), mode="reflect")

    return scatter(np.asarray(x, dtype=np.float64), j, orientations, filters=lambda n: filter_bank(n, j, orientations),
                   fft=np.fft, pad=pad, modulus=np.abs, cat=lambda parts, axis: np.concatenate(parts, axis=axis))
