"""``xrayfed audit --attack lira``: the few-shadow likelihood-ratio membership attack
(:mod:`xrayfed.client.lira`) on the audit's DP model and on its no-DP reference.

The pool is the hospital's training units and its held-out validation units. K shadows are
trained with the hospital's plan and its exact DP-SGD code (:func:`xrayfed.client.dp.train_private_round`,
all ``max_rounds`` rounds, from the same initial weights as the targets: the starting model of
a federation is public) on random halves of the pool, each unit in exactly ⌊K/2⌋ of them; K more
no-DP shadows (the same halves, σ = 0) serve the no-DP reference. Each target unit is scored by
the likelihood ratio of its φ under its in- and out-Gaussians; members are the units the target
trained on, non-members the held-out units. Cost: 2K trainings of the plan, each on about half
the pool (the plan's σ, q and steps; q is a per-unit rate, so a half-size shadow sees batches of
about half the size).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
import torch

from xrayfed.client.audit_input import unit_groups, unit_means, with_targets
from xrayfed.client.lira import balanced_splits, logit_confidence, lira_scores, tpr_at_fpr
from xrayfed.common.errors import UserError
from xrayfed.common.privacy.audit import attack_auc

log = logging.getLogger(__name__)

#: Shadow models per target when ``--shadows`` is not given (each costs one training of the plan, twice).
DEFAULT_SHADOWS = 8
#: The fewest shadows whose common variance has degrees of freedom (2 in and 2 out per unit) …
MIN_SHADOWS = 4
#: … and the most (each is a training of the whole plan, twice).
MAX_SHADOWS = 64


def check_shadows(k: int) -> int:
    """``k`` if it is a usable shadow count, else one :class:`UserError` line."""
    if not MIN_SHADOWS <= k <= MAX_SHADOWS:
        raise UserError(f"--shadows {k}: LiRA needs {MIN_SHADOWS}..{MAX_SHADOWS} shadow models (each unit in half "
                        "of them; every shadow is a training of the whole plan, with and without DP)")
    return k


def pooled(train, val):
    """The scans of ``train`` then ``val`` as one dataset (labels and patient ids kept)."""
    from xrayfed.common.data import XrayDataset

    known = train.patient_ids is not None and val.patient_ids is not None
    return XrayDataset(np.concatenate([train.images, val.images]),
                       torch.cat([train.targets, val.targets]), train.task,
                       patient_ids=[*train.patient_ids, *val.patient_ids] if known else None,
                       patient_ids_known=known and train.patient_ids_known and val.patient_ids_known)


def unit_phi(model, dataset, groups: list[np.ndarray], task, device) -> np.ndarray:
    """φ = log(p / (1 − p)) of the true label per unit (the mean over its scans)."""
    from xrayfed.common.train import predict_logits

    logits, targets = predict_logits(model, dataset, device)
    return unit_means(logit_confidence(task.kind, logits, targets), groups)


def run_lira(cfg, plan, make_model, task, device, lr: float, train, val, unit: str,
             targets: dict[str, tuple[torch.nn.Module, np.ndarray]], shadows: int = DEFAULT_SHADOWS,
             seed: int | None = None) -> dict:
    """LiRA AUC (and TPR at 1 % FPR) for each target ``name: (model, members)`` — ``members`` a
    bool per training unit of ``train`` (:func:`unit_groups` order) saying which units the
    target trained on as they are; the held-out units of ``val`` are the non-members. ``name``
    ``dp`` is attacked with DP shadows (the plan), any other with no-DP shadows (σ = 0).
    ``make_model()``: a fresh model with the targets' initial weights."""
    from xrayfed.client.dp import privacy_units, train_private_round

    t0 = time.time()
    check_shadows(shadows)
    pool = pooled(train, val)
    n_train = len(unit_groups(train, unit))
    groups = unit_groups(train, unit) + [g + len(train) for g in unit_groups(val, unit)]
    inside = balanced_splits(len(groups), shadows, np.random.default_rng(seed))
    needed = {"dp" if name == "dp" else "no_dp" for name in targets}
    phi = {kind: np.zeros((len(groups), shadows)) for kind in needed}
    for k in range(shadows):
        scans = np.sort(np.concatenate([groups[i] for i in np.nonzero(inside[:, k])[0]]))
        units, _ = privacy_units(cfg, with_targets(pool, scans, pool.targets))
        for kind in sorted(needed):
            shadow = make_model()
            shadow_plan = plan if kind == "dp" else replace(plan, noise_multiplier=0.0)
            for r in range(1, plan.max_rounds + 1):
                train_private_round(shadow, units, cfg, shadow_plan, task, device, lr=lr,
                                    desc=f"LiRA shadow {k + 1}/{shadows} ({kind.replace('_', '-')}) round {r}")
            phi[kind][:, k] = unit_phi(shadow, pool, groups, task, device)
        log.info("LiRA shadow %d/%d trained (%.0f s so far)", k + 1, shadows, time.time() - t0)
    out: dict = {"shadows": shadows, "trainings": shadows * len(needed), "non_members": len(groups) - n_train}
    nonmember = np.arange(n_train, len(groups))
    for name, (model, members) in targets.items():
        s = lira_scores(unit_phi(model, pool, groups, task, device), phi["dp" if name == "dp" else "no_dp"], inside)
        a, b = s[np.nonzero(np.asarray(members, bool))[0]], s[nonmember]
        out[f"auc_{name}"] = attack_auc(a, b)
        out[f"tpr_at_1pct_fpr_{name}"] = tpr_at_fpr(a, b)
        out[f"members_{name}"] = int(len(a))
    out["wall_s"] = round(time.time() - t0, 1)
    return out
