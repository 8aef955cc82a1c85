"""Datasets from the formats hospitals hold, decoded once into memory (uint8 at the target size).

:func:`load_dataset` detects the format of ``path``:

* **class folders** ``ROOT/{train,val,test}/CLASS/*.{png,jpg,jpeg,dcm}`` — exactly
  {NORMAL, PNEUMONIA} (any case) is the binary pneumonia task (NORMAL negative); other class
  sets (e.g. healthy / COVID-19 / bacterial / viral) are multi-class, classes in sorted order.
  Patient ids come from Kermany-style file names (or the DICOM PatientID).
* **flat class folders** ``ROOT/CLASS/*`` (torchvision's ImageFolder, what most hospitals
  export): the same classes; every scan is ``train`` unless ``test_fraction`` > 0 carves a
  local ``test`` reproducibly by patient (by file when the patient is not known); validation
  is carved from ``train`` as for every layout.
* **NIH ChestX-ray14** ``ROOT/Data_Entry_2017.csv`` + ``ROOT/images/`` (or ``images_*/images``):
  pipe-separated ``Finding Labels`` → 14 labels in NIH order (``No Finding`` = all zeros);
  the official ``train_val_list.txt``/``test_list.txt`` when present, else every scan is
  ``train`` unless ``test_fraction`` > 0 carves a deterministic patient-wise ``test``.
* **MedMNIST** ``.npz`` (``{split}_images``, ``{split}_labels``; optional ``class_names``,
  ``task_kind``).
* **DICOM** files in class folders, or a flat folder of scans with ``labels.csv``
  (columns ``file,label``; optional ``split`` and ``patient_id``).

Every file goes through :func:`xrayfed.common.preprocess.load_scan_uint8` — the decode step
that inference uses too — and every item through :func:`~xrayfed.common.preprocess.normalize`.
Unreadable files are skipped with a warning naming the file (name only) and listed in
``skipped``; no usable scan at all is a one-line :class:`~xrayfed.common.errors.UserError`.
Nothing is cached on disk.

The package: :mod:`~xrayfed.common.data.dataset` (the dataset, decoding, patient ids), one
module per format (:mod:`~.folders`, :mod:`~.nih`, :mod:`~.npz`, :mod:`~.labels_csv`) and
:mod:`~.split` (validation splits, partitions among hospitals); detection and the one entry
point :func:`load_dataset` are here.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Sequence

from xrayfed.common.data.dataset import (  # noqa: F401  (the public API: `from xrayfed.common import data`)
    BINARY_NAMES,
    NIH_CSV,
    NIH_CSVS,
    SPLITS,
    Select,
    XrayDataset,
    kermany_patient_id,
    no_usable_error,
    selected,
    subset,
    targets_array,
)
from xrayfed.common.data.folders import flat_class_dirs, load_class_folders, load_flat_class_folders
from xrayfed.common.data.labels_csv import load_labels_csv
from xrayfed.common.data.nih import load_nih, nih_csv
from xrayfed.common.data.npz import load_npz, npz_arrays, require_regular_file
from xrayfed.common.data.split import partition, split_train_val  # noqa: F401
from xrayfed.common.errors import UserError
from xrayfed.common.prediction import NIH_LABELS, TaskSpec
from xrayfed.common.preprocess import MAX_IMAGE_SIZE, MIN_SIZE

log = logging.getLogger(__name__)

#: px at which a data check decodes scans: enough to prove a file is readable and count it (the
#: model's image size does not change which files are usable).
CHECK_SIZE = 16


# ----------------------------------------------------------------------------- entry point
def detect_format(path: Path | str) -> str:
    """``npz``, ``nih``, ``labels-csv``, ``class-folders`` (split folders) or ``flat-class-folders``
    (``ROOT/CLASS/*``); one-line UserError otherwise. Nothing but a folder or a regular file is
    opened (a FIFO or device is refused from its file type), and a ``.npz`` file's layout is
    checked from its headers (:func:`~xrayfed.common.data.npz.npz_arrays`)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"data: no such file or folder {path}") from None
    except NotADirectoryError:
        raise UserError(f"data {path}: a part of its path is a file, not a folder; allowed: a .npz file or a "
                        "folder of scans") from None
    except OSError as e:  # no permission, a link loop...
        raise UserError(f"data {path}: cannot be read ({e.strerror or type(e).__name__}); allowed: a .npz file "
                        "or a folder of scans") from None
    if not stat.S_ISDIR(mode):
        require_regular_file(path)
        if path.suffix.lower() == ".npz":
            npz_arrays(path)
            return "npz"
        raise UserError(f"data {path}: a data file must be a MedMNIST-style .npz; folders hold class folders, "
                        f"the NIH layout ({NIH_CSV} + images/) or scans with labels.csv")
    try:
        return _folder_format(path)
    except OSError as e:  # an unreadable folder
        raise UserError(f"data {path}: cannot be read ({e.strerror or type(e).__name__}); allowed: a folder of "
                        "scans you may read") from None


def _folder_format(path: Path) -> str:
    """:func:`detect_format` of a folder."""
    if nih_csv(path) is not None:
        return "nih"
    if (path / "labels.csv").is_file():
        return "labels-csv"
    if any((path / s).is_dir() for s in SPLITS):
        return "class-folders"
    if len(flat_class_dirs(path)) >= 2:
        return "flat-class-folders"
    subdirs = [p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    hint = (f"; it holds folders {sorted(subdirs)[:4]} — put class folders under {path}/train/ (and test/)"
            if subdirs else "")
    raise UserError(f"data {path}: unknown layout (expected train/ and test/ class folders, {NIH_CSV} + images/, "
                    f"labels.csv, or a .npz file){hint}")


def carves_test(path: Path | str) -> bool:
    """Whether the data at ``path`` has no test split of its own, so that its ``test`` split is
    the ``test_fraction`` carved by patient (flat ``ROOT/CLASS/*`` folders, NIH without
    ``train_val_list.txt`` / ``test_list.txt``)."""
    fmt = detect_format(path)
    if fmt == "nih":
        return not any((Path(path) / f).is_file() for f in ("train_val_list.txt", "test_list.txt"))
    return fmt == "flat-class-folders"


class _Listed(Exception):
    """Carries a split's index out of :func:`load_dataset` before anything is decoded."""


def listed_index(path: Path | str, split: str = "train", *, label_set: Sequence[str] | None = None, seed: int = 0,
                 test_fraction: float = 0.0) -> XrayDataset | None:
    """The index a ``select`` of :func:`load_dataset` picks from (every listed file of ``split``
    with its target, patient id and file name; 1×1 placeholder images), without decoding any
    scan; None for an ``.npz`` (its arrays are the scans)."""
    if detect_format(path) == "npz":
        return None

    def grab(index: XrayDataset):
        raise _Listed(index)

    try:
        load_dataset(path, split, MIN_SIZE, label_set=label_set, seed=seed, test_fraction=test_fraction, select=grab)
    except _Listed as e:
        return e.args[0]
    raise AssertionError("load_dataset returned without consulting select")


def load_dataset(path: Path | str, split: str = "train", image_size: int = 224, task: TaskSpec | None = None,
                 *, label_set: Sequence[str] | None = None, seed: int = 0,
                 test_fraction: float = 0.0, select: Select | None = None) -> XrayDataset:
    """Load ``split`` of the scans at ``path``, resized to ``image_size`` × ``image_size`` px.

    The format is detected (see the module docstring). ``task``, when given, must match the
    data's task (one-line UserError otherwise); for NIH data a multilabel ``task`` whose names
    are NIH findings selects those labels. ``label_set`` keeps only those classes (class folders,
    labels.csv, binary/multiclass .npz: other scans are left out) or label columns (NIH,
    multilabel .npz). ``seed`` and ``test_fraction`` drive the patient-wise split of the layouts
    that have no split of their own (NIH without its official lists, flat ``ROOT/CLASS/*``
    folders): ``test_fraction`` of the patients → ``test``; 0 (the default, a hospital's
    ``data.local_test_fraction``) keeps every scan in ``train`` and such data has no ``test``.
    ``select`` (:data:`~xrayfed.common.data.dataset.Select`) keeps only the scans it picks from the
    split's index of listed files, before any of them is decoded (``.npz``: after loading, as
    its arrays are read whole); the files it leaves out are not read, so ``skipped`` counts
    only the unreadable files among those picked (besides what the listing sets aside: files
    that are not scans, missing files of a list), every class must have files listed, not
    usable ones (a part of the data may lack a class), and ``patient_ids_known`` is the whole
    split's answer: whether every listed file, readable or not, names its patient.
    """
    path = Path(path)
    if not MIN_SIZE <= int(image_size) <= MAX_IMAGE_SIZE:
        raise UserError(f"image_size {image_size}: allowed are {MIN_SIZE} to {MAX_IMAGE_SIZE} px")
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"test_fraction {test_fraction}: must be in [0, 1)")
    if split not in SPLITS:
        raise UserError(f"data split {split!r}: allowed are {', '.join(SPLITS)}")
    fmt = detect_format(path)
    if fmt == "nih" and label_set is None and task is not None and task.kind == "multilabel" \
            and set(task.class_names) <= set(NIH_LABELS):
        label_set = task.class_names
    if fmt == "npz":
        ds = load_npz(path, split, int(image_size), label_set)
        if select is not None:
            ds = subset(ds, selected(select, ds))
    elif fmt == "nih":
        ds = load_nih(path, split, int(image_size), label_set, seed, test_fraction, select=select)
    elif fmt == "labels-csv":
        ds = load_labels_csv(path, split, int(image_size), label_set, select=select)
    elif fmt == "flat-class-folders":
        ds = load_flat_class_folders(path, split, int(image_size), label_set, seed, test_fraction, select=select)
    else:
        ds = load_class_folders(path, split, int(image_size), label_set, select=select)
    if len(ds) == 0:
        raise no_usable_error(path, len(ds.skipped))
    if ds.skipped:
        log.warning("data %s (%s): %d of %d file(s) skipped", path.name, split, len(ds.skipped),
                    len(ds.skipped) + len(ds))
    if task is not None and (task.kind != ds.task.kind or tuple(task.class_names) != tuple(ds.task.class_names)):
        raise UserError(f"data {path}: its classes {list(ds.task.class_names)} ({ds.task.kind}) differ from the "
                        f"expected {list(task.class_names)} ({task.kind})")
    return ds


