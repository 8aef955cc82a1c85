"""The likelihood-ratio membership attack (LiRA; Carlini, Chien, Nasr, Song, Terzis & Tramèr,
"Membership inference attacks from first principles", IEEE S&P 2022), few-shadow variant.

K shadow models are trained on random halves of a pool of units, each unit in exactly ⌊K/2⌋ of
them (:func:`balanced_splits`). For every unit the attacker has its shadows' logit-scaled
confidence on the true label, φ = log(p / (1 − p)) (:func:`logit_confidence`), when the unit
was in and when it was out. It fits a Gaussian to each (the unit's own means μ_in, μ_out and
one variance shared by every unit and both hypotheses: the paper's "global variance", what it
recommends below 64 shadows) and scores the target model's φ by the log-likelihood ratio
log N(φ; μ_in, s²) − log N(φ; μ_out, s²) (:func:`lira_scores`; higher = "more likely a member").

Pure numpy: the shadows are trained by :mod:`xrayfed.client.audit_shadows`.
"""

from __future__ import annotations

import numpy as np

#: The false-positive rate at which the attack's true-positive rate is reported.
LOW_FPR = 0.01


def balanced_splits(units: int, shadows: int, rng: np.random.Generator) -> np.ndarray:
    """``inside[i, k]``: whether unit ``i`` trains shadow ``k`` — each unit in exactly
    ``shadows // 2`` shadows (a random choice of which), so each shadow trains on about half of
    the units and every unit has in and out observations."""
    if shadows < 2:
        raise ValueError(f"LiRA needs at least 2 shadows, got {shadows}")
    order = np.argsort(rng.random((units, shadows)), axis=1)
    return order < shadows // 2


def logit_confidence(kind: str, logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """φ = log(p / (1 − p)) per scan, p the model's probability of the true label, computed
    stably from the logits. ``kind``: ``binary`` (one logit: φ = ±z), ``multiclass`` (φ = z_y −
    logsumexp of the other classes' logits) or ``multilabel`` (the mean over labels of each
    label's ±z)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(targets)
    n = len(z)
    if kind == "binary":
        return z.reshape(n) * (2.0 * y.reshape(n) - 1.0)
    if kind == "multiclass":
        z = z.reshape(n, -1)
        idx = y.reshape(n).astype(np.int64)
        own = z[np.arange(n), idx]
        rest = z.copy()
        rest[np.arange(n), idx] = -np.inf
        top = rest.max(axis=1, keepdims=True)
        return own - (top[:, 0] + np.log(np.exp(rest - top).sum(axis=1)))
    return (z.reshape(n, -1) * (2.0 * y.reshape(n, -1) - 1.0)).mean(axis=1)


def lira_scores(target_phi: np.ndarray, shadow_phi: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """One LiRA score per unit: ``target_phi`` (units,) the target model's φ, ``shadow_phi``
    (units, K) the shadows' φ, ``inside`` (units, K) whether the unit trained each shadow. The
    common variance s² is the pooled variance of every unit's in- and out-observations about
    their own means (degrees of freedom: n_in − 1 + n_out − 1 per unit)."""
    phi = np.asarray(shadow_phi, dtype=np.float64)
    inside = np.asarray(inside, dtype=bool)
    t = np.asarray(target_phi, dtype=np.float64)
    if phi.shape != inside.shape or phi.ndim != 2 or t.shape != phi.shape[:1]:
        raise ValueError("target_phi (units,), shadow_phi and inside (units, K) must agree")
    n_in, n_out = inside.sum(axis=1), (~inside).sum(axis=1)
    if np.any(n_in < 1) or np.any(n_out < 1):
        raise ValueError("every unit needs at least one shadow with it and one without it")
    mu_in = np.where(inside, phi, 0.0).sum(axis=1) / n_in
    mu_out = np.where(~inside, phi, 0.0).sum(axis=1) / n_out
    resid = np.where(inside, phi - mu_in[:, None], phi - mu_out[:, None])
    dof = float((n_in - 1 + n_out - 1).sum())
    if dof <= 0:
        raise ValueError("the common variance needs at least 2 in- or 2 out-observations of a unit")
    var = max(float((resid ** 2).sum() / dof), 1e-12)
    return ((t - mu_out) ** 2 - (t - mu_in) ** 2) / (2.0 * var)


def tpr_at_fpr(member_scores, nonmember_scores, fpr: float = LOW_FPR) -> float:
    """The attack's true-positive rate at a false-positive rate of at most ``fpr``: the share of
    members scored above the threshold that lets ⌊fpr · non-members⌋ non-members through."""
    a = np.asarray(member_scores, dtype=np.float64)
    b = np.sort(np.asarray(nonmember_scores, dtype=np.float64))[::-1]
    if len(a) == 0 or len(b) == 0:
        raise ValueError("a true-positive rate needs members and non-members")
    allowed = int(np.floor(fpr * len(b)))
    threshold = b[allowed] if allowed < len(b) else -np.inf
    return float(np.mean(a > threshold))
