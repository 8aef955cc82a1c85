"""MedMNIST-style ``.npz`` (``{split}_images``, ``{split}_labels``; labels validated)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from xrayfed.common.data.dataset import (
    BINARY_NAMES,
    XrayDataset,
    pick_classes,
    subset,
    targets_array,
    task_from_names,
)
from xrayfed.common.errors import UserError
from xrayfed.common.prediction import NIH_LABELS, TaskSpec
from xrayfed.common.preprocess import to_uint8

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- npz
def _npz_task(z, path: Path) -> TaskSpec:
    label_keys = [k for k in z.files if k.endswith("_labels")]
    all_labels = [np.asarray(z[k]) for k in label_keys]
    multi_col = any(a.ndim == 2 and a.shape[1] > 1 for a in all_labels)
    names = [str(x) for x in np.asarray(z["class_names"]).reshape(-1)] if "class_names" in z.files else None
    kind = str(np.asarray(z["task_kind"])) if "task_kind" in z.files else None
    if kind is not None and kind not in ("binary", "multiclass", "multilabel"):
        raise UserError(f"{path.name}: task_kind {kind!r} (allowed: binary, multiclass, multilabel)")
    for k, a in zip(label_keys, all_labels):
        _check_npz_labels(a, k, path, multilabel=multi_col or kind == "multilabel")
    values = np.unique(np.concatenate([a.reshape(-1) for a in all_labels])) if all_labels else np.array([0, 1])
    if kind is None:
        if multi_col:
            kind = "multilabel"
        else:
            kind = "binary" if len(values) <= 2 and values.min(initial=0) >= 0 and values.max(initial=0) <= 1 \
                else "multiclass"
    if names is None:
        if kind == "binary":
            names = list(BINARY_NAMES) if "pneumonia" in path.name.lower() else ["class0", "class1"]
        elif kind == "multiclass":
            names = [f"class{i}" for i in range(int(values.max()) + 1)]
        else:
            k = max(a.reshape(len(a), -1).shape[1] for a in all_labels)
            names = list(NIH_LABELS) if k == len(NIH_LABELS) else [f"label{i}" for i in range(k)]
    try:
        task = TaskSpec(kind=kind, class_names=tuple(names))
    except ValueError as e:
        raise UserError(f"{path.name}: inconsistent class_names/task_kind ({' '.join(str(e).split())[:120]})") from None
    if kind != "multilabel" and values.size and int(values.max()) >= len(names):
        key = next(k for k, a in zip(label_keys, all_labels) if a.size and int(a.max()) == int(values.max()))
        raise UserError(f"{path.name}: {key} has label {int(values.max())} but there are {len(names)} classes "
                        f"{list(names)} (allowed: 0..{len(names) - 1})")
    return task


def _check_npz_labels(a: np.ndarray, key: str, path: Path, *, multilabel: bool) -> None:
    """Labels are integers: class indices 0..K−1, or 0/1 per label column (multilabel). One line
    naming the key and the offending values otherwise."""
    if a.size == 0:
        return
    if a.dtype.kind not in "biuf":
        raise UserError(f"{path.name}: {key} holds {a.dtype} values; labels must be integers")
    flat = a.reshape(-1).astype(np.float64)
    bad = flat[~np.isfinite(flat) | (flat != np.round(flat)) | (flat < 0) | ((flat > 1) if multilabel else False)]
    if bad.size:
        shown = ", ".join(str(v) for v in np.unique(bad)[:5])
        allowed = "0 or 1 in every label column" if multilabel else "class indices 0, 1, ..., K−1"
        raise UserError(f"{path.name}: {key} has {bad.size} invalid label(s) ({shown}); allowed: {allowed}")


def _npz_images_to_gray(imgs: np.ndarray, path: Path) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) of any dtype → uint8 (N, H, W) grayscale."""
    from PIL import Image

    if imgs.ndim == 4 and imgs.shape[-1] == 1:
        imgs = imgs[..., 0]
    if imgs.ndim == 4 and imgs.shape[-1] in (3, 4):
        if imgs.dtype != np.uint8:
            imgs = _npz_images_to_gray_float(imgs)
        # The same luma conversion as a colour PNG/JPEG file (PIL convert("L")).
        return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(im[..., :3]), mode="RGB").convert("L"))
                         for im in imgs]) if len(imgs) else np.zeros(imgs.shape[:3], np.uint8)
    if imgs.ndim != 3:
        raise UserError(f"{path.name}: images of shape {imgs.shape}; allowed: (N, H, W) grayscale or (N, H, W, 3)")
    if imgs.dtype != np.uint8:
        imgs = _npz_images_to_gray_float(imgs)
    return imgs


def _npz_images_to_gray_float(imgs: np.ndarray) -> np.ndarray:
    a = imgs.astype(np.float64)
    scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
    return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)


def load_npz(path: Path, split: str, size: int, label_set: Sequence[str] | None) -> XrayDataset:
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: not a readable .npz file ({type(e).__name__})") from None
    with z:
        key = f"{split}_images"
        if key not in z.files or f"{split}_labels" not in z.files:
            splits = sorted(k[: -len("_images")] for k in z.files if k.endswith("_images"))
            hint = "; set data.val_fraction to carve validation scans out of train" if split == "val" else ""
            raise UserError(f"{path}: no split {split!r} (has {splits}; keys {{split}}_images and "
                            f"{{split}}_labels){hint}")
        try:
            imgs = z[key]
            labels = np.asarray(z[f"{split}_labels"])
            task = _npz_task(z, path)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt member
            raise UserError(f"{path}: cannot read {key} ({type(e).__name__})") from None
    if len(labels) != len(imgs):
        raise UserError(f"{path.name}: {len(imgs)} {split} images but {len(labels)} labels")
    if len(imgs) == 0:
        raise UserError(f"{path.name}: {split}_images holds no images")
    imgs = _npz_images_to_gray(np.asarray(imgs), path)
    if min(imgs.shape[1:], default=0) < 8:
        raise UserError(f"{path.name}: images of {imgs.shape[1]}×{imgs.shape[2]} px are too small (at least 8×8)")
    if imgs.shape[1:] != (size, size):
        out = np.empty((len(imgs), size, size), dtype=np.uint8)
        for i, im in enumerate(imgs):
            out[i] = to_uint8(im, size)
        imgs = out
    targets = labels.reshape(len(labels), -1)
    if task.kind != "multilabel":
        targets = targets[:, 0]
    ds = XrayDataset(imgs, targets, task, patient_ids=None, source=f"{path} ({split})")
    return restrict_labels(ds, label_set, str(path)) if label_set is not None else ds


def restrict_labels(ds: XrayDataset, label_set: Sequence[str], where: str) -> XrayDataset:
    """Keep only ``label_set`` (names) of an in-memory dataset: label columns (multilabel) or
    the scans of those classes (binary/multiclass, targets re-indexed)."""
    names = pick_classes(ds.task.class_names, label_set, where)
    pos = [list(ds.task.class_names).index(n) for n in names]
    t = targets_array(ds)
    if ds.task.kind == "multilabel":
        out = subset(ds, np.arange(len(ds)))
        out.task = TaskSpec(kind="multilabel", class_names=tuple(names))
        out.targets = torch.as_tensor(t[:, pos])
        return out
    task, order = task_from_names(names)
    remap = {pos[names.index(n)]: j for j, n in enumerate(order)}
    keep = np.flatnonzero(np.isin(t.astype(np.int64), list(remap)))
    out = subset(ds, keep)
    new_t = np.asarray([remap[int(v)] for v in t[keep]], dtype=np.int64)
    return XrayDataset(out.images, new_t, task, patient_ids=out.patient_ids, skipped=out.skipped,
                       source=out.source, files=out.files)


