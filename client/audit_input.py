"""Black-box input-space canaries (``xrayfed audit --auditor black-box``) and the per-unit scores
the audit's attacks share.

The black-box auditor sees only the final model (Steinke, Nasr & Jagielski 2023, their
black-box setting). Its m canaries are m of the hospital's own training units (scans, or
patients at the patient unit) with their labels changed — binary and multi-label: every label
flipped (1 − y); multiclass: another class, drawn by the seeded generator, for all of the unit's
scans — each included in training independently with probability 1/2. The other units train as
usual; the clean copies of the canary units are not in training. After training the auditor
scores each canary by −loss on its changed label (at the patient unit the mean over the
patient's scans): a model that memorised the changed label scores an included canary higher.

The per-scan scattering-feature cache (:func:`xrayfed.common.model.feature_cache`) is keyed by
the scan's pixels only: a canary and its clean scan share one entry, which is right, because the
features are a function of the pixels alone and the label never passes through the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xrayfed.common.errors import UserError

#: Input-space canaries when ``--canaries`` is not given: at most this many, and at most half the units.
DEFAULT_INPUT_CANARIES = 1000


def unit_groups(dataset, unit: str) -> list[np.ndarray]:
    """Scan indices of each privacy unit of ``dataset``: one scan each at the scan unit; at the
    patient unit each patient's scans, patients numbered in order of first appearance (as
    :class:`xrayfed.client.dp.PatientUnits` numbers them)."""
    pids = getattr(dataset, "patient_ids", None)
    if unit != "patient" or pids is None:
        return [np.array([i]) for i in range(len(dataset))]
    groups: dict[str, list[int]] = {}
    for i, pid in enumerate(pids):
        groups.setdefault(str(pid), []).append(i)
    return [np.array(g) for g in groups.values()]


def unit_means(per_scan: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """The mean of ``per_scan`` over each group's scans."""
    return np.array([float(np.mean(per_scan[g])) for g in groups])


def scan_losses(model, dataset, task, device) -> np.ndarray:
    """The model's loss on each scan of ``dataset`` with the dataset's labels (float64)."""
    from xrayfed.common.prediction import prepare_targets
    from xrayfed.common.train import predict_logits

    logits, targets = predict_logits(model, dataset, device)
    lg, y = torch.from_numpy(logits), prepare_targets(task, torch.from_numpy(targets))
    if task.kind == "multiclass":
        loss = torch.nn.functional.cross_entropy(lg, y, reduction="none")
    else:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(lg, y, reduction="none")
        loss = loss.reshape(len(loss), -1).mean(dim=1)
    return loss.double().numpy()


def default_canaries(units: int) -> int:
    """m when ``--canaries`` is not given: :data:`DEFAULT_INPUT_CANARIES`, at most half the units."""
    return min(DEFAULT_INPUT_CANARIES, units // 2)


def with_targets(ds, indices: np.ndarray, targets: torch.Tensor):
    """The scans of ``ds`` at ``indices`` (an :class:`~xrayfed.common.data.XrayDataset`, patient
    ids carried over) with ``targets[indices]`` as their labels."""
    from xrayfed.common.data import subset

    idx = np.asarray(indices, dtype=np.int64)
    out = subset(ds, idx)
    out.targets = targets[torch.as_tensor(idx)].clone()
    return out


def changed_targets(task, targets: torch.Tensor, groups: list[np.ndarray], rng: np.random.Generator) -> torch.Tensor:
    """A copy of ``targets`` with each group's labels changed: 1 − y (binary, multi-label), or
    (y + k) mod K with one k in 1..K−1 per group drawn from ``rng`` (multiclass)."""
    out = targets.clone()
    for g in groups:
        idx = torch.as_tensor(g)
        if task.kind == "multiclass":
            k = len(task.class_names)
            out[idx] = (targets[idx] + int(rng.integers(1, k))) % k
        else:
            out[idx] = 1.0 - targets[idx]
    return out


@dataclass
class InputCanaries:
    """m canary units of a hospital's training scans, their inclusion and the datasets built from them.

    ``chosen``: the canaries' unit numbers in :func:`unit_groups` order; ``included``: whether
    each trains; ``training``: what the audited model trains on (the other units as they are,
    the included canaries with changed labels); ``canary_scans``: every canary's scans with
    their changed labels, ``owner`` the canary of each; ``members``: the other units' scans (the
    units the audited model trained on as they are: the membership attack's members)."""

    chosen: np.ndarray
    included: np.ndarray
    training: object
    canary_scans: object
    owner: np.ndarray
    members: object

    @property
    def m(self) -> int:
        return len(self.chosen)

    def scores(self, model, task, device) -> np.ndarray:
        """One score per canary, higher = "more likely in": −loss on its changed label (the mean
        over its scans)."""
        per_scan = -scan_losses(model, self.canary_scans, task, device)
        return np.bincount(self.owner, weights=per_scan, minlength=self.m) / np.bincount(self.owner, minlength=self.m)


def make_input_canaries(train, unit: str, m: int | None, seed: int | None) -> InputCanaries:
    """Draw m canaries among the units of ``train`` (None: :func:`default_canaries`), each
    included with probability 1/2 (``seed``: which units, their inclusion and multiclass labels).
    An m below 2 or above the number of units is refused (one line)."""
    groups = unit_groups(train, unit)
    n = len(groups)
    if m is None:
        m = default_canaries(n)
    if m < 2 or m > n:
        raise UserError(f"--canaries {m}: the black-box audit changes the labels of m of this hospital's {n} "
                        f"training {unit}s; use 2..{n}" if n >= 2 else
                        f"--canaries {m}: the black-box audit needs at least 2 training {unit}s; this hospital has {n}")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, size=m, replace=False))
    included = rng.random(m) < 0.5
    canary_groups = [groups[i] for i in chosen]
    targets = changed_targets(train.task, train.targets, canary_groups, rng)
    others = np.setdiff1d(np.arange(n), chosen)
    other_scans = np.concatenate([groups[i] for i in others]) if len(others) else np.zeros(0, np.int64)
    inc_scans = [g for g, keep in zip(canary_groups, included) if keep]
    train_idx = np.sort(np.concatenate([other_scans, *inc_scans]).astype(np.int64))
    canary_idx = np.concatenate(canary_groups).astype(np.int64)
    owner = np.concatenate([np.full(len(g), j) for j, g in enumerate(canary_groups)])
    return InputCanaries(
        chosen=chosen, included=included, training=with_targets(train, train_idx, targets),
        canary_scans=with_targets(train, canary_idx, targets), owner=owner,
        members=with_targets(train, np.sort(other_scans).astype(np.int64), train.targets))
