"""The Gaussian noise of DP-SGD from a cryptographically secure generator (Opacus' own
``secure_mode`` needs torchcsprng, which has no build for this torch)."""

from __future__ import annotations

import os

import numpy as np
import torch

NOISE_SOURCE_SECURE = "csprng:aes256-ctr(os.urandom)+box-muller,sum-of-4"
NOISE_SOURCE_TORCH = "torch.normal (not cryptographically secure)"


def csprng_standard_normal(numel: int) -> torch.Tensor:
    """``numel`` standard-normal float64 samples from a cryptographically secure generator.

    AES-256-CTR keystream (key and nonce fresh from ``os.urandom``) → 53-bit uniforms →
    Box–Muller.
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    pairs = (numel + 1) // 2
    enc = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    raw = np.frombuffer(enc.update(bytes(16 * pairs)) + enc.finalize(), dtype=np.uint64).reshape(2, pairs)
    u = ((raw >> np.uint64(11)).astype(np.float64) + 1.0) / float(2**53)  # (0, 1]
    r = np.sqrt(-2.0 * np.log(u[0]))
    theta = 2.0 * np.pi * u[1]
    z = np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:numel]
    return torch.from_numpy(z)


def secure_gaussian_like(reference: torch.Tensor, std: float) -> torch.Tensor:
    """Gaussian noise N(0, std²) shaped like ``reference``: sum of 4 CSPRNG normals × std/2."""
    n = reference.numel()
    z = csprng_standard_normal(4 * n).view(4, n).sum(dim=0) / 2.0
    return (z * std).to(dtype=reference.dtype).view(reference.shape).to(reference.device)
