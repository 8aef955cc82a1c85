"""Class folders ``ROOT/{train,val,test}/CLASS/*`` (PNG, JPEG, DICOM; symbolic links followed
within limits: no real folder or scan is read twice, and no link leads out of its class folder into
another part of the data — see :class:`~xrayfed.common.data.dataset.TreeWalk`)."""

from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path
from typing import Sequence

import numpy as np

from xrayfed.common.data.dataset import (
    SPLITS,
    Select,
    TreeWalk,
    XrayDataset,
    decode_files,
    index_dataset,
    iter_files,
    no_local_test,
    no_usable_error,
    patient_id_and_source,
    patient_id_for,
    pick_classes,
    selected,
    stable_fraction,
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


def list_class_files(base: Path, order: Sequence[str], root: Path | None = None
                     ) -> tuple[list[Path], list[int], list[tuple[str, str]], list[tuple[str, str]]]:
    """Every scan below ``base/CLASS`` for the classes in ``order``, each real file once:
    ``(files, class index per file, (file, reason) of what is not a scan, (path, reason) of the
    links not followed)``. ``root``: the whole data folder (default ``base``); a link may lead
    out of it (linked storage) or within its own class folder, never into another class's or
    split's folder, nor up to a folder that holds class folders (a loop)."""
    files: list[Path] = []
    labels: list[int] = []
    unsupported: list[tuple[str, str]] = []
    root = base if root is None else root
    every_class = _class_folders(root)
    walk = TreeWalk.of(root, every_class)
    for c, name in enumerate(order):
        folder = base / name
        if not folder.is_dir():
            continue
        why = walk.refuse_class_folder(folder, every_class)
        if why is not None:
            walk.links_skipped.append((str(folder), why))
            continue
        found, broken = walk_files(folder, walk)
        unsupported += broken
        for f in found:
            if f.suffix.lower() in SCAN_SUFFIXES or is_dicom(f):
                files.append(f)
                labels.append(c)
            else:
                unsupported.append((str(f), "not a PNG, JPEG or DICOM file"))
    return files, labels, unsupported, walk.links_skipped


def _class_folders(root: Path) -> list[Path]:
    """Every class folder of the data folder ``root``: ``root/SPLIT/CLASS`` when it has split
    folders, else ``root/CLASS`` (hidden folders left out)."""
    parents = [root / s for s in SPLITS if (root / s).is_dir()] or [root]
    return [c for p in parents for c in sorted(p.iterdir()) if c.is_dir() and not c.name.startswith(".")]


def _decode_class_files(where: Path, split: str, size: int, task, order: Sequence[str], files: list[Path],
                        labels: list[int], unsupported: list[tuple[str, str]], links: list[tuple[str, str]],
                        patients: list[str] | None = None, select: Select | None = None) -> XrayDataset:
    if unsupported:
        log.warning("data %s: %d file(s) ignored: other types or broken links (e.g. %s: %s)", where.name,
                    len(unsupported), Path(unsupported[0][0]).name, unsupported[0][1])
    if links:
        log.warning("data %s: %d link(s) not followed (e.g. %s: %s)", where.name, len(links),
                    Path(links[0][0]).name, links[0][1])

    def ids_of(positions) -> list[tuple[str, bool]]:  # (patient id, known); a flat layout's ids are given
        return [(patients[i] if patients is not None else pid, known)
                for i, (pid, known) in ((i, patient_id_and_source(files[i])) for i in positions)]

    ids = None
    known = None  # with a selection: whether every listed file names its patient (the whole split's answer)
    if select is not None:  # every class must be there in the listed files; one part may lack a class
        _check_classes(where, split, task, order, labels, "listed")
        ids = ids_of(range(len(files)))
        known = all(k for _, k in ids)
        keep = selected(select, index_dataset(task, labels, [pid for pid, _ in ids], files, known))
        files, labels, ids = [files[i] for i in keep], [labels[i] for i in keep], [ids[i] for i in keep]
    images, ok, skipped = decode_files(files, size)
    if not ok:
        raise no_usable_error(where, len(skipped) + len(unsupported))
    if select is None:
        _check_classes(where, split, task, order, np.asarray(labels)[ok], "usable")
    ids = ids_of(ok) if ids is None else [ids[i] for i in ok]
    return XrayDataset(images, np.asarray(labels)[ok], task, patient_ids=[pid for pid, _ in ids],
                       skipped=skipped + unsupported,
                       source=f"{where} ({split})" if patients is not None else str(where),
                       files=[str(files[i]) for i in ok], links_skipped=links,
                       patient_ids_known=all(k for _, k in ids) if known is None else known)


def _check_classes(where: Path, split: str, task, order: Sequence[str], labels, what: str) -> None:
    """Every class of ``order`` has a scan among ``labels`` (``what``: listed or usable scans); a
    ``train`` split must (one-line UserError), another gets a warning."""
    per_class = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(order))
    empty = [order[i] for i in range(len(order)) if per_class[i] == 0]
    if not empty:
        return
    counts = ", ".join(f"{order[i]} {int(per_class[i])}" for i in range(len(order)))
    if split == "train":
        raise UserError(f"data {where}: class(es) {empty} have no {what} scans ({counts}); a {task.kind} model "
                        "needs scans of every class to train (add them, or choose classes with label_set)")
    log.warning("data %s: class(es) %s have no %s scans (%s)", where, empty, what, counts)


def load_class_folders(root: Path, split: str, size: int, label_set: Sequence[str] | None,
                       select: Select | None = None) -> XrayDataset:
    """``ROOT/{train,val,test}/CLASS/*``."""
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
    files, labels, unsupported, links = list_class_files(base, order, root)
    return _decode_class_files(base, split, size, task, order, files, labels, unsupported, links, select=select)


def flat_class_dirs(root: Path) -> list[str]:
    """The class folders of a flat ``ROOT/CLASS/*`` layout (torchvision's ImageFolder): folders
    of ``root`` (not split names, not hidden) that hold at least one scan."""
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in SPLITS):
        first = islice((f for f, why in iter_files(d) if why is None), 200)  # stops at the first scan
        if any(f.suffix.lower() in SCAN_SUFFIXES or is_dicom(f) for f in first):
            out.append(d.name)
    return out


def load_flat_class_folders(root: Path, split: str, size: int, label_set: Sequence[str] | None, seed: int,
                            test_fraction: float, select: Select | None = None) -> XrayDataset:
    """``ROOT/CLASS/*`` with no split folders: every scan is ``train`` unless ``test_fraction``
    > 0 carves a local ``test`` split: that share of the patients (of the files when the patient
    is not known from the file name or DICOM header), chosen reproducibly from ``seed``
    (validation is carved from ``train`` later)."""
    if split not in ("train", "test"):
        raise UserError(f"data {root}: split {split!r} is not available in a ROOT/CLASS layout (train or test); "
                        "leave data.split = train and set data.val_fraction to carve validation scans out of train")
    if split == "test" and test_fraction == 0:
        raise UserError(no_local_test(root, "a ROOT/CLASS layout"))
    classes = pick_classes(flat_class_dirs(root), label_set, str(root))
    try:
        task, order = task_from_names(classes)
    except UserError as e:
        raise UserError(f"data {root}: {e}") from None
    files, labels, unsupported, links = list_class_files(root, order)
    patients = [patient_id_for(f) for f in files]
    want_test = split == "test"
    keep = [i for i, pid in enumerate(patients) if (stable_fraction(pid, seed) < test_fraction) == want_test]
    return _decode_class_files(root, split, size, task, order, [files[i] for i in keep], [labels[i] for i in keep],
                               unsupported, links, patients=[patients[i] for i in keep], select=select)
