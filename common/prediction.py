"""Prediction tasks (binary, multi-class, multi-label): loss, probabilities and metrics.

Metrics follow the task: AUROC per class and macro, accuracy, sensitivity and specificity.
Binary models have one output logit, the probability of the *positive* class
(``class_names[1]``); multi-class models have one logit per class (softmax); multi-label
models have one logit per label (independent sigmoids).
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator

TaskKind = Literal["binary", "multiclass", "multilabel"]

# NIH ChestX-ray14 findings, in the order of the official label list.
NIH_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)


class TaskSpec(BaseModel):
    """What the model predicts.

    ``kind``: binary (2 class names, 1 logit), multiclass (K ≥ 2 names, K logits) or
    multilabel (K ≥ 1 label names, K logits; a scan may carry none, several or all).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: TaskKind
    class_names: tuple[str, ...]

    @field_validator("class_names")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) == 0 or len(set(v)) != len(v):
            raise ValueError("class_names must be non-empty and unique")
        return tuple(v)

    def model_post_init(self, __context) -> None:  # noqa: D401
        if self.kind == "binary" and len(self.class_names) != 2:
            raise ValueError(f"a binary task needs exactly 2 class names, got {list(self.class_names)}")
        if self.kind == "multiclass" and len(self.class_names) < 2:
            raise ValueError("a multiclass task needs at least 2 class names")

    @property
    def num_outputs(self) -> int:
        return 1 if self.kind == "binary" else len(self.class_names)

    def to_dict(self) -> dict:
        """``{"kind", "class_names": [...]}``: how a task travels (messages, checkpoints, JSON)."""
        return {"kind": self.kind, "class_names": list(self.class_names)}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSpec":
        """Inverse of :meth:`to_dict` (raises ``KeyError``/``TypeError``/``ValueError`` on a bad one)."""
        return cls(kind=d["kind"], class_names=tuple(d["class_names"]))


def loss_fn(task: TaskSpec):
    """The training loss for ``task`` (mean over the batch), as a torch module."""
    import torch.nn as nn

    if task.kind == "multiclass":
        return nn.CrossEntropyLoss()
    return nn.BCEWithLogitsLoss()


def prepare_targets(task: TaskSpec, y):
    """Targets in the dtype/shape the loss wants: float (N,1) binary, long (N,) multiclass, float (N,K) multilabel."""

    if task.kind == "multiclass":
        return y.long().view(-1)
    if task.kind == "binary":
        return y.float().view(-1, 1)
    return y.float().view(y.shape[0], -1)


def probabilities(task: TaskSpec, logits: np.ndarray) -> np.ndarray:
    """Per-class probabilities, shape (N, len(class_names)).

    Binary: column 1 is sigmoid(logit), column 0 its complement. Multiclass: softmax.
    Multilabel: independent sigmoids (rows need not sum to 1).
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1:
        z = z[None, :]
    with np.errstate(over="ignore"):  # exp(745+) is inf and the sigmoid exactly 0: no warning line
        if task.kind == "binary":
            p = 1.0 / (1.0 + np.exp(-z[:, :1]))
            return np.concatenate([1.0 - p, p], axis=1)
        if task.kind == "multiclass":
            z = z - z.max(axis=1, keepdims=True)
            e = np.exp(z)
            return e / e.sum(axis=1, keepdims=True)
        return 1.0 / (1.0 + np.exp(-z))


def _binary_stats(y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> tuple[float, float, float]:
    pred = y_score >= threshold
    pos = y_true == 1
    neg = ~pos
    sens = float((pred & pos).sum() / pos.sum()) if pos.any() else float("nan")
    spec = float((~pred & neg).sum() / neg.sum()) if neg.any() else float("nan")
    acc = float((pred == pos).mean()) if len(y_true) else float("nan")
    return acc, sens, spec


def _auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y_true)) < 2:
        return float("nan")
    return float(roc_auc_score(y_true, y_score))


def choose_threshold(task: TaskSpec, logits: np.ndarray, targets: np.ndarray) -> list[float] | None:
    """The operating point chosen on a validation set: for a binary task the probability
    threshold of the positive class that maximises Youden's J (sensitivity + specificity − 1),
    ``[t]``; for a multi-label task one such threshold per label (0.5 where a label has only one
    outcome); ``None`` for a multi-class task (the most probable class is the prediction)."""
    if task.kind == "multiclass":
        return None
    probs = probabilities(task, logits)
    t = np.asarray(targets)
    if task.kind == "binary":
        return [_youden(t.reshape(-1).astype(int), probs[:, 1])]
    y = t.reshape(len(probs), -1).astype(int)
    return [_youden(y[:, k], probs[:, k]) for k in range(probs.shape[1])]


def _youden(y: np.ndarray, score: np.ndarray) -> float:
    if len(np.unique(y)) < 2:
        return 0.5
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, score)
    best = int(np.argmax(tpr - fpr))
    return float(min(1.0, max(0.0, thr[best])))


def _thresholds(threshold, k: int) -> list[float]:
    if threshold is None:
        return [0.5] * k
    if isinstance(threshold, (int, float)):
        return [float(threshold)] * k
    if len(threshold) != k:
        raise ValueError(f"{len(threshold)} threshold(s) for {k} output(s)")
    return [float(x) for x in threshold]


def decide(task: TaskSpec, probs, threshold: list[float] | None) -> list[str]:
    """The classes predicted for one scan's probabilities at the model's operating point:
    binary → the positive class when its probability reaches the threshold (0.5 when the model
    has none), else the negative one; multi-label → every label at or above its threshold;
    multi-class → the most probable class."""
    names = list(task.class_names)
    if task.kind == "multiclass":
        return [names[int(np.argmax(probs))]]
    if task.kind == "binary":
        return [names[1] if probs[1] >= _thresholds(threshold, 1)[0] else names[0]]
    return [n for n, p, t in zip(names, probs, _thresholds(threshold, len(names))) if p >= t]


def compute_metrics(task: TaskSpec, logits: np.ndarray, targets: np.ndarray,
                    threshold: float | list[float] | None = None) -> dict[str, float]:
    """Metrics for ``logits`` (N, num_outputs) against ``targets``.

    Returns ``auc`` (macro AUROC over classes that have both outcomes), ``auc/<class>``,
    ``accuracy``, ``sensitivity`` and ``specificity`` (binary: of the positive class at
    p ≥ ``threshold``, default 0.5; multilabel: macro over labels, each at its threshold;
    multiclass: macro over classes, one-vs-rest, of the most probable class). A class with
    only one outcome in ``targets`` has AUROC ``nan`` and is left out of the macro average.
    """
    probs = probabilities(task, logits)
    t = np.asarray(targets)
    out: dict[str, float] = {}
    if task.kind == "binary":
        y = t.reshape(-1).astype(int)
        out["auc"] = _auc(y, probs[:, 1])
        out[f"auc/{task.class_names[1]}"] = out["auc"]
        out["accuracy"], out["sensitivity"], out["specificity"] = _binary_stats(
            y, probs[:, 1], _thresholds(threshold, 1)[0])
        return out
    if task.kind == "multiclass":
        y = t.reshape(-1).astype(int)
        onehot = np.eye(len(task.class_names), dtype=int)[y]
        out["accuracy"] = float((probs.argmax(axis=1) == y).mean())
        pred_onehot = np.eye(len(task.class_names), dtype=int)[probs.argmax(axis=1)]
        sens, spec = [], []
        for k in range(len(task.class_names)):
            _, s, p = _binary_stats(onehot[:, k], pred_onehot[:, k].astype(float), 0.5)
            sens.append(s)
            spec.append(p)
        aucs = [_auc(onehot[:, k], probs[:, k]) for k in range(len(task.class_names))]
    else:
        y = t.reshape(len(probs), -1).astype(int)
        aucs, sens, spec, accs = [], [], [], []
        thr = _thresholds(threshold, len(task.class_names))
        for k in range(len(task.class_names)):
            a, s, p = _binary_stats(y[:, k], probs[:, k], thr[k])
            accs.append(a)
            sens.append(s)
            spec.append(p)
            aucs.append(_auc(y[:, k], probs[:, k]))
        out["accuracy"] = float(np.mean(accs))  # label-wise accuracy
    for name, a in zip(task.class_names, aucs):
        out[f"auc/{name}"] = a
    finite = [a for a in aucs if np.isfinite(a)]
    out["auc"] = float(np.mean(finite)) if finite else float("nan")
    out["sensitivity"] = float(np.nanmean(sens)) if np.isfinite(sens).any() else float("nan")
    out["specificity"] = float(np.nanmean(spec)) if np.isfinite(spec).any() else float("nan")
    return out


def measured_performance(task: TaskSpec, logits: np.ndarray, targets: np.ndarray,
                         threshold: list[float] | None, split: str) -> dict:
    """How often the model is right at its operating point, per class, on held-out scans: what a
    patient is told next to a prediction (it travels in the checkpoint and ``ModelInfo``).

    ``{"split": split, "scans": N, "classes": {name: {"sensitivity", "specificity", "with",
    "without"}}}``: ``with``/``without`` count the scans that carry/do not carry the class;
    ``sensitivity`` is the fraction of the ``with`` scans the model flags with the class,
    ``specificity`` the fraction of the ``without`` scans it does not flag (``None`` where a count
    is 0). The class is flagged as :func:`decide` flags it: binary → the positive class
    (``class_names[1]``, the only entry) at ``threshold``; multi-label → each label at its
    threshold; multi-class → each class, one-vs-rest, when it is the most probable."""
    probs = probabilities(task, logits)
    t = np.asarray(targets)
    names = list(task.class_names)
    if task.kind == "binary":
        cols = {names[1]: (t.reshape(-1).astype(int) == 1, probs[:, 1] >= _thresholds(threshold, 1)[0])}
    elif task.kind == "multiclass":
        y, top = t.reshape(-1).astype(int), probs.argmax(axis=1)
        cols = {n: (y == k, top == k) for k, n in enumerate(names)}
    else:
        y, thr = t.reshape(len(probs), -1).astype(int), _thresholds(threshold, len(names))
        cols = {n: (y[:, k] == 1, probs[:, k] >= thr[k]) for k, n in enumerate(names)}
    classes = {}
    for name, (pos, flagged) in cols.items():
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        classes[name] = {"sensitivity": float((flagged & pos).sum() / n_pos) if n_pos else None,
                         "specificity": float((~flagged & ~pos).sum() / n_neg) if n_neg else None,
                         "with": n_pos, "without": n_neg}
    return {"split": str(split), "scans": int(len(probs)), "classes": classes}


def check_performance(d, task: TaskSpec) -> dict | None:
    """``d`` (from a checkpoint or the inference service) as a well-formed
    :func:`measured_performance` dict for ``task``, or ``None`` when absent; ``ValueError`` when
    malformed (unknown class, a rate outside [0, 1], a negative count)."""
    if d is None:
        return None
    if not isinstance(d, dict) or not isinstance(d.get("classes"), dict) or not isinstance(d.get("split"), str):
        raise ValueError("performance must be {split, scans, classes}")
    scans = d.get("scans")
    if isinstance(scans, bool) or not isinstance(scans, int) or scans < 0 \
            or not re.fullmatch(r"[\w.-]{1,64}", d["split"]):
        raise ValueError("performance: scans must be a count and split a short name (letters, digits, _.-)")
    classes = {}
    for name, c in d["classes"].items():
        if name not in task.class_names or not isinstance(c, dict):
            raise ValueError(f"performance: {str(name)[:40]!r} is not one of the model's classes")
        out = {}
        for k in ("with", "without"):
            v = c.get(k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"performance: {k} of {name} must be a count")
            out[k] = v
        for k in ("sensitivity", "specificity"):
            v = c.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0):
                raise ValueError(f"performance: {k} of {name} must be a fraction in [0, 1] or null")
            out[k] = None if v is None else float(v)
        classes[name] = out
    return {"split": d["split"], "scans": scans, "classes": classes}
