"""Class folders ``ROOT/{train,val,test}/CLASS/*`` (PNG, JPEG, DICOM; symbolic links followed)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from xrayfed.common.data.dataset import (
    SPLITS,
    XrayDataset,
    decode_files,
    no_usable_error,
    patient_id_for,
    pick_classes,
    task_from_names,
    walk_files,
)
from xrayfed.common.errors import UserError
from xrayfed.common.preprocess import SCAN_SUFFIXES, is_dicom

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- class folders
def _split_folder_missing(root: Path, split: str, have: list[str]) -> UserError:
    if split == "val" and "train" in have:
        return UserError(f"data {root}: no 'val' folder (found {have}); leave data.split = train and set "
                         "data.val_fraction to carve validation scans out of train")
    return UserError(f"data {root}: no '{split}' folder (found {have}); allowed splits: {', '.join(SPLITS)}")


def load_class_folders(root: Path, split: str, size: int, label_set: Sequence[str] | None) -> XrayDataset:
    have = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name in SPLITS)
    base = root / split
    if not base.is_dir():
        raise _split_folder_missing(root, split, have)
    # Classes: the union over all split folders, so train and test agree even if one lacks a class.
    all_classes = sorted({c.name for s in have for c in (root / s).iterdir()
                          if c.is_dir() and not c.name.startswith(".")})
    classes = pick_classes(all_classes, label_set, str(root))
    try:
        task, order = task_from_names(classes)
    except UserError as e:
        raise UserError(f"data {base}: {e}") from None
    files: list[Path] = []
    labels: list[int] = []
    unsupported: list[tuple[str, str]] = []
    for c, name in enumerate(order):
        folder = base / name
        if not folder.is_dir():
            continue
        found, broken = walk_files(folder)
        unsupported += broken
        for f in found:
            if f.suffix.lower() in SCAN_SUFFIXES or is_dicom(f):
                files.append(f)
                labels.append(c)
            else:
                unsupported.append((str(f), "not a PNG, JPEG or DICOM file"))
    if unsupported:
        log.warning("data %s: %d file(s) ignored: other types or broken links (e.g. %s: %s)", base.name,
                    len(unsupported), Path(unsupported[0][0]).name, unsupported[0][1])
    images, ok, skipped = decode_files(files, size)
    if not ok:
        raise no_usable_error(base, len(skipped) + len(unsupported))
    per_class = np.bincount(np.asarray(labels)[ok], minlength=len(order))
    empty = [order[i] for i in range(len(order)) if per_class[i] == 0]
    if empty:
        counts = ", ".join(f"{order[i]} {int(per_class[i])}" for i in range(len(order)))
        if split == "train":
            raise UserError(f"data {base}: class(es) {empty} have no usable scans ({counts}); a {task.kind} model "
                            "needs scans of every class to train (add them, or choose classes with label_set)")
        log.warning("data %s: class(es) %s have no usable scans (%s)", base, empty, counts)
    return XrayDataset(images, np.asarray(labels)[ok], task,
                       patient_ids=[patient_id_for(files[i]) for i in ok],
                       skipped=skipped + unsupported, source=str(base), files=[str(files[i]) for i in ok])


