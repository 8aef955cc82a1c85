"""The ScatterNet front end: one transform, two appliers (torch for training, numpy for the
patient), and the properties the model relies on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xrayfed.common.model import ModelSpec, ScatterFront, build_model, layer_plan
from xrayfed.common.mpc import dealer
from xrayfed.common.scatter import filter_bank, fold, n_features, scatter_numpy


def _scan(seed: int, size: int = 28) -> np.ndarray:
    from xrayfed.common.synthetic import make_synthetic

    imgs, _ = make_synthetic(2, size, "binary", seed=seed)
    return (imgs[:, None].astype(np.float64) / 255.0 - 0.5) / 0.5


def test_wavelets_are_band_pass_and_the_low_pass_keeps_the_mean():
    psi, phi = filter_bank(44, 2, 8)
    assert psi.shape == (16, 44, 44)
    assert np.abs(psi[:, 0, 0]).max() < 1e-9          # zero mean: a flat scan has no wavelet response
    assert abs(phi[0, 0] - 1.0) < 1e-9                 # unit DC gain
    # each wavelet is tuned to its own orientation: peak frequencies differ across the 8 angles
    peaks = {np.unravel_index(np.abs(p).argmax(), p.shape) for p in psi[:8]}
    assert len(peaks) == 8


def test_fold_is_spatial_subsampling():
    x = np.random.default_rng(0).normal(size=(3, 40, 40))
    xh = np.fft.fft2(x)
    for k in (1, 2, 4):
        assert np.allclose(np.fft.ifft2(fold(xh, k)).real, x[:, ::k, ::k])
    assert torch.allclose(fold(torch.from_numpy(xh), 4), torch.from_numpy(fold(xh, 4)))


@pytest.mark.parametrize("size,pool", [(28, 1), (32, 1), (224, 8)])
def test_torch_and_numpy_appliers_agree(size, pool):
    """What the patient computes (numpy, float64) equals what the model was trained on (torch)."""
    x = np.random.default_rng(size).uniform(-1, 1, size=(2, 1, size, size))
    ref = ScatterFront(pool=pool)(torch.from_numpy(x).float()).double().numpy()
    got = dealer.public_front(x, {"input_pool": pool, "scattering": [2, 8]})
    side = -(-(size // pool) // 4)
    assert got.shape == ref.shape == (2, n_features(2, 8), side, side)
    assert np.abs(got - ref).max() < 1e-5  # both float64 inside: float32 rounding of the output only
    # per image and order: zero mean, variance var / (var + NORM_EPS) ≤ 1
    for img in got:
        for order in (img[:1], img[1:17], img[17:]):
            assert abs(order.mean()) < 1e-6 and 0.0 < order.std() <= 1.0


def test_features_are_stable_to_small_shifts_and_see_the_finding():
    """Scattering features change little under a 2-pixel shift, far less than the raw pixels do,
    and differ between a scan with the finding and one without."""
    x = _scan(0, 32)[:1]
    shifted = np.roll(x, 2, axis=-1)
    f, g = scatter_numpy(x), scatter_numpy(shifted)
    rel_feat = np.linalg.norm(f - g) / np.linalg.norm(f)
    rel_pix = np.linalg.norm(x - shifted) / np.linalg.norm(x)
    assert rel_feat < 0.5 * rel_pix
    other = scatter_numpy(_scan(1, 32)[1:])
    assert np.linalg.norm(f - other) > 2 * np.linalg.norm(f - g)


def test_model_plan_and_parameters():
    spec = ModelSpec(scattering=True, depth=2, weight_standardization=True)
    plan = layer_plan(spec)
    assert plan[0][0] == "scatter" and plan[1][1]["in_channels"] == 81
    model = build_model(spec)
    assert not list(model[0].parameters()) and not model[0].state_dict()  # nothing to train or ship
    y = model(torch.rand(3, 1, 28, 28))
    assert y.shape == (3, 1)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_too_small_input_and_hostile_plans_are_refused():
    with pytest.raises(ValueError, match="too small"):
        scatter_numpy(np.zeros((1, 1, 8, 8)))
    for bad in ({"input_pool": 1, "scattering": [9, 8]}, {"input_pool": 1, "scattering": [2, 1000]},
                {"input_pool": 1, "scattering": "2,8"}, {"input_pool": 0, "scattering": None}):
        with pytest.raises(ValueError):
            dealer.front_plan(bad)
    assert dealer.front_plan({"input_pool": 8, "scattering": None}) == (8, None)


def test_feature_cache_is_exact_and_bounded():
    """Scans seen before are served from memory with the same features; the cache stays within
    its byte bound (least recently used first out)."""
    from xrayfed.common.model.scatter_front import _FeatureCache

    front = ScatterFront()
    x = torch.from_numpy(_scan(3, 28)).float().repeat(4, 1, 1, 1) + torch.rand(8, 1, 28, 28) * 0.1
    direct = front._forward_fft(x)
    first = front(x[:5])                       # 5 computed
    mixed = front(x[3:])                       # 2 from memory, 3 computed
    assert torch.equal(first, direct[:5]) and torch.equal(mixed, direct[3:])
    cache = _FeatureCache(max_bytes=3 * direct[0].numel() * 4)
    for i in range(8):
        cache.put(i, direct[i].clone())
    assert cache.bytes <= cache.max_bytes and 7 in cache and 4 not in cache


def test_a_batch_larger_than_the_cache_is_still_served(monkeypatch):
    from xrayfed.common.model import scatter_front as M

    small = M._FeatureCache(max_bytes=2 * 81 * 7 * 7 * 4)  # room for two scans' features
    monkeypatch.setattr(M, "_SCATTER_CACHE", small)
    x = torch.rand(6, 1, 28, 28)
    front = ScatterFront()
    assert torch.equal(front(x), front._forward_fft(x)) and small.bytes <= small.max_bytes
    assert torch.equal(front(x), front._forward_fft(x))  # again, with evictions inside the batch
