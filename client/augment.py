"""Training techniques a hospital may turn on that are not privacy mechanisms: random views of
the sampled scans (augmentation, :func:`random_view`) and a moving average of the DP-SGD iterates
(:class:`EMA`, post-processing). Neither changes the privacy accounting."""

from __future__ import annotations

import math

import torch


def random_shift(x: torch.Tensor, max_frac: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image translated by its own random offset of up to ``max_frac`` of its side (edge
    pixels repeated). The augmentation behind augmentation multiplicity; no flips (a chest
    X-ray's left and right are not interchangeable)."""
    n, _, h, w = x.shape
    m = int(round(max_frac * min(h, w)))
    if m == 0 or n == 0:
        return x
    dy = torch.randint(-m, m + 1, (n, 1), generator=generator).to(x.device)
    dx = torch.randint(-m, m + 1, (n, 1), generator=generator).to(x.device)
    rows = (torch.arange(h, device=x.device)[None, :] + dy).clamp(0, h - 1)  # (n, h)
    cols = (torch.arange(w, device=x.device)[None, :] + dx).clamp(0, w - 1)  # (n, w)
    idx = torch.arange(n, device=x.device)[:, None, None]
    return x[idx, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def random_view(x: torch.Tensor, t, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of a batch (N, C, H, W) in model units ([−1, 1]) under its own random transform,
    with the ranges of a :class:`~xrayfed.common.config.TrainingSection` ``t``: translation up to
    ``augment_shift`` of the side, zoom in [1 − z, 1 + z], an aspect change (width × s, height
    ÷ s, log s uniform in ±log(1 + ``augment_aspect``): scans squashed to a square from films of
    another shape), rotation up to ``augment_rotate`` degrees (bilinear, edge pixels repeated),
    then contrast in [1 − c, 1 + c] about the image's mean and a brightness offset up to ±c, clipped to [−1, 1]. No flips (a chest X-ray's left and
    right are not interchangeable). With zoom, aspect, rotation and contrast all 0 it is
    :func:`random_shift` (whole-pixel translation)."""
    import torch.nn.functional as F

    if not (t.augment_zoom or t.augment_aspect or t.augment_rotate or t.augment_contrast):
        return random_shift(x, t.augment_shift, generator)
    n = x.shape[0]
    if n == 0:
        return x

    def uniform() -> torch.Tensor:  # U(−1, 1), one per image
        return (torch.rand(n, generator=generator, dtype=torch.float32) * 2 - 1).to(x.device)

    angle = uniform() * math.radians(t.augment_rotate)
    zoom = 1 + uniform() * t.augment_zoom
    shift = 2 * t.augment_shift  # affine_grid's coordinates span [−1, 1]: a side is 2 units
    stretch = torch.exp(uniform() * math.log1p(t.augment_aspect))  # content width × s, height ÷ s
    c, s = torch.cos(angle), torch.sin(angle)
    # affine_grid maps output to input coordinates: the inverse of (rotate · scale(zoom·s, zoom/s))
    sx, sy = zoom * stretch, zoom / stretch
    theta = torch.stack([torch.stack([c / sx, -s / sx, uniform() * shift], 1),
                         torch.stack([s / sy, c / sy, uniform() * shift], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if t.augment_contrast:
        c = t.augment_contrast
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * (1 + uniform() * c).view(n, 1, 1, 1) + mean + (uniform() * c).view(n, 1, 1, 1)
        out = out.clamp(-1.0, 1.0)
    return out


class EMA:
    """Exponential moving average of a model's parameters over DP-SGD steps (with the usual
    warm-up ``min(decay, (1 + t) / (10 + t))``)."""

    def __init__(self, model, decay: float) -> None:
        self.decay, self.t = decay, 0
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model) -> None:
        d = min(self.decay, (1 + self.t) / (10 + self.t))
        self.t += 1
        for n, p in model.named_parameters():
            n = n.removeprefix("_module.")
            self.shadow[n].mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, model) -> None:
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n])
