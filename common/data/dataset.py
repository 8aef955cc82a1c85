"""The in-memory dataset (uint8 scans at the target size), decoding with skip-and-count, patient ids
and class names → task."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from xrayfed.common.errors import UserError
from xrayfed.common.prediction import TaskSpec
from xrayfed.common.preprocess import (
    is_dicom,
    load_scan_uint8,
    normalize,
    read_dicom_patient_id,
)

log = logging.getLogger(__name__)


NIH_CSVS = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
NIH_CSV = NIH_CSVS[0]
SPLITS = ("train", "val", "test")
BINARY_NAMES = ("NORMAL", "PNEUMONIA")


class XrayDataset(torch.utils.data.Dataset):
    """Scans in memory as uint8 (N, S, S); item ``i`` is ``(normalize(images[i]), target)``.

    ``normalize`` gives float32 (1, S, S) in [−1, 1]. Targets (``targets``, a tensor): float32
    0/1 (binary), int64 class index (multiclass), float32 (K,) 0/1 (multilabel).

    Attributes: ``task`` (:class:`TaskSpec`), ``patient_ids`` (one per scan, or None when the
    format has none), ``skipped`` (``(path, reason)`` of unusable files), ``source`` (where the
    scans came from), ``files`` (the file of each scan, or None for arrays such as ``.npz``).
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray | torch.Tensor, task: TaskSpec, *,
                 patient_ids: Sequence[str] | None = None, skipped: Sequence[tuple[str, str]] | None = None,
                 source: str = "", files: Sequence[str] | None = None) -> None:
        images = np.asarray(images)
        if images.ndim != 3 or images.dtype != np.uint8 or images.shape[1] != images.shape[2]:
            raise ValueError(f"images must be uint8 (N, S, S), got {images.dtype} {images.shape}")
        self.images = np.ascontiguousarray(images)
        self.task = task
        t = np.asarray(targets.numpy() if isinstance(targets, torch.Tensor) else targets)
        n = len(self.images)
        if task.kind == "multiclass":
            self.targets = torch.as_tensor(t.reshape(-1).astype(np.int64))
        elif task.kind == "binary":
            self.targets = torch.as_tensor(t.reshape(-1).astype(np.float32))
        else:
            self.targets = torch.as_tensor(t.reshape(n, -1).astype(np.float32))
            if self.targets.shape[1] != len(task.class_names):
                raise ValueError(f"{self.targets.shape[1]} label columns for {len(task.class_names)} label names")
        if len(self.targets) != n:
            raise ValueError(f"{len(self.targets)} targets for {n} images")
        self.patient_ids = [str(p) for p in patient_ids] if patient_ids is not None else None
        if self.patient_ids is not None and len(self.patient_ids) != n:
            raise ValueError(f"{len(self.patient_ids)} patient ids for {n} images")
        self.files = [str(f) for f in files] if files is not None else None
        if self.files is not None and len(self.files) != n:
            raise ValueError(f"{len(self.files)} file names for {n} images")
        self.skipped: list[tuple[str, str]] = list(skipped or [])
        self.source = source

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return normalize(self.images[i]), self.targets[i]

    @property
    def image_size(self) -> int:
        """Side of the stored square scans (px)."""
        return int(self.images.shape[-1])

    def __repr__(self) -> str:
        return (f"XrayDataset({len(self)} scans, {self.image_size} px, {self.task.kind} "
                f"{list(self.task.class_names)}, source={self.source!r}, skipped={len(self.skipped)})")


def targets_array(ds: XrayDataset) -> np.ndarray:
    """The targets as a numpy array: (N,) for binary/multiclass, (N, K) for multilabel."""
    return ds.targets.numpy()


def subset(ds: XrayDataset, indices: Sequence[int] | np.ndarray) -> XrayDataset:
    """A new :class:`XrayDataset` with the scans at ``indices`` (task, patient ids, files,
    source and the skipped list are carried over)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    return XrayDataset(
        ds.images[idx], ds.targets.numpy()[idx], ds.task,
        patient_ids=[ds.patient_ids[i] for i in idx] if ds.patient_ids is not None else None,
        skipped=ds.skipped, source=ds.source,
        files=[ds.files[i] for i in idx] if ds.files is not None else None,
    )


# ----------------------------------------------------------------------------- decoding
def decode_files(files: Sequence[Path], size: int) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Decode ``files`` to uint8 (n_ok, size, size); returns images, indices decoded, skipped."""
    out = np.empty((len(files), size, size), dtype=np.uint8)
    ok: list[int] = []
    skipped: list[tuple[str, str]] = []
    for i, f in enumerate(files):
        try:
            out[len(ok)] = load_scan_uint8(f, size)
            ok.append(i)
        except UserError as e:
            reason = str(e)
            if reason.startswith(f"{f.name}: "):
                reason = reason[len(f.name) + 2:]
            skipped.append((str(f), reason))
            log.warning("skipping unreadable scan %s: %s", f.name, reason)
    return out[: len(ok)], ok, skipped


def no_usable_error(where: Path | str, skipped: int) -> UserError:
    return UserError(f"data {where}: no usable scans ({skipped} file(s) skipped as unreadable or missing); "
                     "expected PNG/JPEG/DICOM radiographs in a supported layout (class folders, NIH CSV, "
                     ".npz, labels.csv)")


def is_candidate(f: Path) -> bool:
    return f.is_file() and not f.name.startswith(".")


def iter_files(folder: Path):
    """Every file below ``folder`` as ``(path, readable)``, in walk order, following symbolic
    links (hospital storage often links scans or whole folders in) with loop protection: a folder
    reached twice is read once. ``readable`` is False for a link that leads nowhere."""
    import os

    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:  # a link back to a folder already read: a loop
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            f = Path(dirpath) / name
            if f.is_file():
                yield f, True
            elif f.is_symlink():
                yield f, False


def walk_files(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """:func:`iter_files` collected: the files (sorted) and the links that lead nowhere
    (skipped, with the reason)."""
    files: list[Path] = []
    broken: list[tuple[str, str]] = []
    for f, readable in iter_files(folder):
        if readable:
            files.append(f)
        else:
            broken.append((str(f), "symbolic link to a missing file"))
    return sorted(files), broken


# ----------------------------------------------------------------------------- patient ids
_KERMANY_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_TRAILING_NUMBER = re.compile(r"^(.+)-\d+$")
_KERMANY_STUDY = re.compile(r"^((?:NORMAL2-)?IM-\d+)(?:-\d+)+$", re.IGNORECASE)  # IM-0429-0001-0002


def kermany_patient_id(name: str) -> str:
    """Patient id from a Kermany-style file name.

    ``person12_bacteria_3.jpeg`` → ``person12``; ``IM-0115-0001.jpeg`` → ``IM-0115``;
    ``NORMAL2-IM-1427-0001.jpeg`` → ``NORMAL2-IM-1427``; a study's further images
    (``IM-0429-0001-0002.jpeg``, beside ``IM-0429-0001.jpeg``) → the same ``IM-0429``; another
    name ending in ``-N`` → the name without it; anything else → the file stem.
    """
    stem = Path(name).stem
    m = _KERMANY_PERSON.match(stem)
    if m:
        return m.group(1).lower()
    m = _KERMANY_STUDY.match(stem)
    if m:
        return m.group(1)
    m = _TRAILING_NUMBER.match(stem)
    return m.group(1) if m else stem


def patient_id_for(f: Path) -> str:
    if is_dicom(f):
        try:
            pid = read_dicom_patient_id(f)
        except UserError:
            pid = None
        if pid:
            return pid
    return kermany_patient_id(f.name)


# ----------------------------------------------------------------------------- tasks / label sets
def task_from_names(names: Sequence[str]) -> tuple[TaskSpec, list[str]]:
    """Task from class names (folder names or labels.csv values) and the names in target order.

    Exactly {NORMAL, PNEUMONIA} (any case) → binary ("NORMAL", "PNEUMONIA"); otherwise
    multiclass over the names in sorted order.
    """
    names = list(names)
    upper = [n.upper() for n in names]
    if sorted(upper) == list(BINARY_NAMES) and len(set(upper)) == 2:
        return TaskSpec(kind="binary", class_names=BINARY_NAMES), [names[upper.index(u)] for u in BINARY_NAMES]
    if len(names) < 2:
        raise UserError(f"found {len(names)} class(es) {names}; need at least 2 (one folder or label per class)")
    order = sorted(names)
    return TaskSpec(kind="multiclass", class_names=tuple(order)), order


def pick_classes(available: Sequence[str], label_set: Sequence[str] | None, where: str) -> list[str]:
    if label_set is None:
        return list(available)
    by_upper = {a.upper(): a for a in available}
    missing = [c for c in label_set if c.upper() not in by_upper]
    if missing:
        raise UserError(f"data {where}: label_set {list(missing)} not found; available: {list(available)}")
    return [by_upper[c.upper()] for c in label_set]


def stable_fraction(key: str, seed: int) -> float:
    """A deterministic pseudo-random number in [0, 1) for ``key`` (SHA-256 of seed:key)."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64
