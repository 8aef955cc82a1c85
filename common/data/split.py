"""Validation splits and partitions among hospitals (IID, Dirichlet label skew, patient-wise)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from xrayfed.common.data.dataset import XrayDataset, subset, targets_array
from xrayfed.common.errors import UserError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- splits and partitions
def _group_labels(ds: XrayDataset) -> np.ndarray:
    """One label per scan for stratification: the class (binary/multiclass); for multilabel
    the first positive label + 1, or 0 for none."""
    t = targets_array(ds)
    if ds.task.kind == "multilabel":
        t2 = t.reshape(len(t), -1)
        return np.where(t2.any(axis=1), t2.argmax(axis=1) + 1, 0).astype(np.int64)
    return t.astype(np.int64).reshape(-1)


def _groups(ds: XrayDataset) -> dict[str, list[int]]:
    pids = ds.patient_ids if ds.patient_ids is not None else [f"#{i}" for i in range(len(ds))]
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pids):
        groups.setdefault(p, []).append(i)
    return groups


def split_train_val(ds: XrayDataset, val_fraction: float, seed: int = 0) -> tuple[XrayDataset, XrayDataset | None]:
    """Carve about ``val_fraction`` of the scans out of ``ds`` for validation.

    Patient-wise when patient ids are known (a patient's scans are all on one side; patients
    are shuffled with ``seed`` and taken until the fraction is reached), else scan-wise.
    Returns ``(train, val)``; ``val`` is None when ``val_fraction`` is 0, ``ds`` has fewer
    than 10 scans, or there is only one patient.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction {val_fraction}: must be in [0, 1)")
    if val_fraction == 0 or len(ds) < 10:
        return ds, None
    rng = np.random.default_rng(seed)
    groups = _groups(ds)
    if len(groups) < 2:
        log.warning("data %s: one patient only, no patient-wise validation split", Path(ds.source).name)
        return ds, None
    keys = list(groups)
    order = rng.permutation(len(keys))
    target = val_fraction * len(ds)
    val_idx: list[int] = []
    for j in order[:-1]:  # at least one patient stays in train
        if len(val_idx) >= target:
            break
        g = groups[keys[j]]
        if len(val_idx) + len(g) > target and len(val_idx) > 0 and \
                abs(len(val_idx) + len(g) - target) > abs(len(val_idx) - target):
            continue  # a large patient would overshoot: try the next one
        val_idx.extend(g)
    if not val_idx:
        return ds, None
    is_val = np.zeros(len(ds), dtype=bool)
    is_val[val_idx] = True
    return subset(ds, np.flatnonzero(~is_val)), subset(ds, np.flatnonzero(is_val))


def partition(ds: XrayDataset, num_parts: int, scheme: str = "iid", seed: int = 0, alpha: float = 0.5,
              min_size: int = 10, size_skew: float = 0.0) -> list[np.ndarray]:
    """Split the indices of ``ds`` into ``num_parts`` disjoint, sorted int64 arrays that cover
    every index exactly once (e.g. to simulate hospitals).

    * ``iid``: a random permutation cut into equal parts, or with ``size_skew`` > 0 into parts
      of unequal size, part k's share ∝ (k + 1)^−size_skew (hospitals of different sizes);
    * ``dirichlet``: label-skewed (non-IID): for each class, the shares of the parts are drawn
      from Dirichlet(``alpha``) (smaller α → more skew; multilabel scans count under their first
      positive label or "none");
    * ``patient``: every patient's scans go to one part (patients dealt largest first to the
      currently smallest part; without patient ids each scan is its own patient).

    Every part gets at least ``min(min_size, N // num_parts)`` scans (Dirichlet draws are
    redrawn, then topped up from the largest parts). One-line UserError when impossible.
    """
    n = len(ds)
    num_parts = int(num_parts)
    if num_parts < 1 or num_parts > n:
        raise UserError(f"partition: cannot split {n} scans into {num_parts} parts")
    rng = np.random.default_rng(seed)
    floor = min(int(min_size), n // num_parts)
    if scheme == "iid":
        perm = rng.permutation(n)
        if size_skew > 0:
            share = (np.arange(num_parts) + 1.0) ** -float(size_skew)
            sizes = floor + np.floor(share / share.sum() * (n - floor * num_parts)).astype(int)
            sizes[0] += n - sizes.sum()  # rounding remainder to the largest part
            return [np.sort(p).astype(np.int64) for p in np.split(perm, np.cumsum(sizes)[:-1])]
        return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_parts)]
    if scheme == "patient":
        groups = _groups(ds)
        if len(groups) < num_parts:
            raise UserError(f"partition: {len(groups)} patient(s) cannot fill {num_parts} patient-wise parts")
        keys = list(groups)
        keys = [keys[j] for j in rng.permutation(len(keys))]
        keys.sort(key=lambda k: -len(groups[k]))  # stable: ties stay shuffled
        parts: list[list[int]] = [[] for _ in range(num_parts)]
        sizes = np.zeros(num_parts, dtype=np.int64)
        for k in keys:
            j = int(np.argmin(sizes))
            parts[j].extend(groups[k])
            sizes[j] += len(groups[k])
        return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    if scheme != "dirichlet":
        raise UserError(f"partition scheme {scheme!r}: allowed are iid, dirichlet, patient")
    if not alpha > 0:
        raise UserError(f"dirichlet_alpha {alpha}: must be > 0")
    labels = _group_labels(ds)
    classes = np.unique(labels)
    best: list[list[int]] | None = None
    for _ in range(100):
        parts = [[] for _ in range(num_parts)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_parts, float(alpha)))
            cuts = np.floor(np.cumsum(props)[:-1] * len(idx)).astype(int)
            for p, chunk in zip(parts, np.split(idx, cuts)):
                p.extend(chunk.tolist())
        if best is None or min(map(len, parts)) > min(map(len, best)):
            best = parts
        if min(map(len, parts)) >= floor:
            break
    parts = best
    # Top up small parts with random scans from the currently largest part.
    for j in range(num_parts):
        while len(parts[j]) < floor:
            donor = int(np.argmax([len(p) for p in parts]))
            k = int(rng.integers(len(parts[donor])))
            parts[j].append(parts[donor].pop(k))
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
