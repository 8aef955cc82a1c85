"""Datasets from the formats hospitals hold, decoded once into memory (uint8 at the target size).

:func:`load_dataset` detects the format of ``path``:

* **class folders** ``ROOT/{train,val,test}/CLASS/*.{png,jpg,jpeg,dcm}`` — exactly
  {NORMAL, PNEUMONIA} (any case) is the binary pneumonia task (NORMAL negative); other class
  sets (e.g. healthy / COVID-19 / bacterial / viral) are multi-class, classes in sorted order.
  Patient ids come from Kermany-style file names (or the DICOM PatientID).
* **NIH ChestX-ray14** ``ROOT/Data_Entry_2017.csv`` + ``ROOT/images/`` (or ``images_*/images``):
  pipe-separated ``Finding Labels`` → 14 labels in NIH order (``No Finding`` = all zeros);
  the official ``train_val_list.txt``/``test_list.txt`` when present, else a deterministic
  patient-wise split.
* **MedMNIST** ``.npz`` (``{split}_images``, ``{split}_labels``; optional ``class_names``,
  ``task_kind``).
* **DICOM** files in class folders, or a flat folder of scans with ``labels.csv``
  (columns ``file,label``; optional ``split`` and ``patient_id``).

Every file goes through :func:`xrayfed.common.preprocess.load_scan_uint8` — the decode step
that inference uses too — and every item through :func:`~xrayfed.common.preprocess.normalize`.
Unreadable files are skipped with a warning naming the file (name only) and listed in
``skipped``; no usable scan at all is a one-line :class:`~xrayfed.common.errors.UserError`.
Nothing is cached on disk.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from xrayfed.common.errors import UserError
from xrayfed.common.preprocess import SCAN_SUFFIXES, is_dicom, load_scan_uint8, normalize, read_dicom_patient_id, to_uint8
from xrayfed.common.prediction import NIH_LABELS, TaskSpec

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
def _decode_files(files: Sequence[Path], size: int) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
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


def _no_usable(where: Path | str, skipped: int) -> UserError:
    return UserError(f"data {where}: no usable scans ({skipped} file(s) skipped as unreadable or missing); "
                     "expected PNG/JPEG/DICOM radiographs in a supported layout (class folders, NIH CSV, "
                     ".npz, labels.csv)")


def _is_candidate(f: Path) -> bool:
    return f.is_file() and not f.name.startswith(".")


def _walk_files(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every file below ``folder``, following symbolic links (hospital storage often links scans
    or whole folders in) with loop protection: a folder reached twice is read once. Returns
    the files (sorted) and the links that lead nowhere (skipped, with the reason)."""
    import os

    files: list[Path] = []
    broken: list[tuple[str, str]] = []
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
        for name in filenames:
            if name.startswith("."):
                continue
            f = Path(dirpath) / name
            if f.is_file():
                files.append(f)
            elif f.is_symlink():
                broken.append((str(f), "symbolic link to a missing file"))
    return sorted(files), broken


# ----------------------------------------------------------------------------- patient ids
_KERMANY_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_TRAILING_NUMBER = re.compile(r"^(.+)-\d+$")


def kermany_patient_id(name: str) -> str:
    """Patient id from a Kermany-style file name.

    ``person12_bacteria_3.jpeg`` → ``person12``; ``IM-0115-0001.jpeg`` → ``IM-0115``;
    ``NORMAL2-IM-1427-0001.jpeg`` → ``NORMAL2-IM-1427``; anything else → the file stem.
    """
    stem = Path(name).stem
    m = _KERMANY_PERSON.match(stem)
    if m:
        return m.group(1).lower()
    m = _TRAILING_NUMBER.match(stem)
    return m.group(1) if m else stem


def _patient_id_for(f: Path) -> str:
    if is_dicom(f):
        try:
            pid = read_dicom_patient_id(f)
        except UserError:
            pid = None
        if pid:
            return pid
    return kermany_patient_id(f.name)


# ----------------------------------------------------------------------------- tasks / label sets
def _names_task(names: Sequence[str]) -> tuple[TaskSpec, list[str]]:
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


def _pick_classes(available: Sequence[str], label_set: Sequence[str] | None, where: str) -> list[str]:
    if label_set is None:
        return list(available)
    by_upper = {a.upper(): a for a in available}
    missing = [c for c in label_set if c.upper() not in by_upper]
    if missing:
        raise UserError(f"data {where}: label_set {list(missing)} not found; available: {list(available)}")
    return [by_upper[c.upper()] for c in label_set]


# ----------------------------------------------------------------------------- class folders
def _split_folder_missing(root: Path, split: str, have: list[str]) -> UserError:
    if split == "val" and "train" in have:
        return UserError(f"data {root}: no 'val' folder (found {have}); leave data.split = train and set "
                         "data.val_fraction to carve validation scans out of train")
    return UserError(f"data {root}: no '{split}' folder (found {have}); allowed splits: {', '.join(SPLITS)}")


def _load_class_folders(root: Path, split: str, size: int, label_set: Sequence[str] | None) -> XrayDataset:
    have = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name in SPLITS)
    base = root / split
    if not base.is_dir():
        raise _split_folder_missing(root, split, have)
    # Classes: the union over all split folders, so train and test agree even if one lacks a class.
    all_classes = sorted({c.name for s in have for c in (root / s).iterdir()
                          if c.is_dir() and not c.name.startswith(".")})
    classes = _pick_classes(all_classes, label_set, str(root))
    try:
        task, order = _names_task(classes)
    except UserError as e:
        raise UserError(f"data {base}: {e}") from None
    files: list[Path] = []
    labels: list[int] = []
    unsupported: list[tuple[str, str]] = []
    for c, name in enumerate(order):
        folder = base / name
        if not folder.is_dir():
            continue
        found, broken = _walk_files(folder)
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
    images, ok, skipped = _decode_files(files, size)
    if not ok:
        raise _no_usable(base, len(skipped) + len(unsupported))
    per_class = np.bincount(np.asarray(labels)[ok], minlength=len(order))
    empty = [order[i] for i in range(len(order)) if per_class[i] == 0]
    if empty:
        counts = ", ".join(f"{order[i]} {int(per_class[i])}" for i in range(len(order)))
        if split == "train":
            raise UserError(f"data {base}: class(es) {empty} have no usable scans ({counts}); a {task.kind} model "
                            "needs scans of every class to train (add them, or choose classes with label_set)")
        log.warning("data %s: class(es) %s have no usable scans (%s)", base, empty, counts)
    return XrayDataset(images, np.asarray(labels)[ok], task,
                       patient_ids=[_patient_id_for(files[i]) for i in ok],
                       skipped=skipped + unsupported, source=str(base), files=[str(files[i]) for i in ok])


# ----------------------------------------------------------------------------- NIH
def _nih_csv(root: Path) -> Path | None:
    for name in NIH_CSVS:
        if (root / name).is_file():
            return root / name
    return None


def _nih_image_index(root: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for d in [root / "images", *sorted(root.glob("images_*/images")), *sorted(root.glob("images_*"))]:
        if d.is_dir():
            for f in d.iterdir():
                if f.is_file():
                    index.setdefault(f.name, f)
    return index


def _stable_fraction(key: str, seed: int) -> float:
    """A deterministic pseudo-random number in [0, 1) for ``key`` (SHA-256 of seed:key)."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64


def _read_list(p: Path) -> set[str]:
    return set(p.read_text(encoding="utf-8").split())


def _load_nih(root: Path, split: str, size: int, label_set: Sequence[str] | None, seed: int,
              test_fraction: float) -> XrayDataset:
    csv_path = _nih_csv(root)
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "Image Index" not in cols or "Finding Labels" not in cols:
            raise UserError(f"{csv_path}: expected columns 'Image Index', 'Finding Labels' and 'Patient ID' "
                            f"(found {cols[:6]})")
        rows, short = [], []
        for r in reader:
            if not (r.get("Image Index") or "").strip() or r.get("Finding Labels") is None:
                short.append(reader.line_num)
                continue
            rows.append(r)
    if short:
        log.warning("%s: %d row(s) without an image name or finding labels skipped (line %s%s)", csv_path.name,
                    len(short), short[0], ", ..." if len(short) > 1 else "")
    labels = _pick_classes(NIH_LABELS, label_set, str(root))
    col = {name: j for j, name in enumerate(labels)}
    if split not in ("train", "test"):
        hint = "; set data.val_fraction to carve validation scans out of train" if split == "val" else ""
        raise UserError(f"NIH data {root}: split {split!r} is not available (train or test){hint}")
    train_list, test_list = root / "train_val_list.txt", root / "test_list.txt"
    if train_list.is_file() or test_list.is_file():
        own, other = (train_list, test_list) if split == "train" else (test_list, train_list)
        if own.is_file():  # the official list of this split
            listed = _read_list(own)
            rows = [r for r in rows if r["Image Index"].strip() in listed]
        else:  # only the other split's list: this split is the rest
            listed = _read_list(other)
            rows = [r for r in rows if r["Image Index"].strip() not in listed]
    else:  # patient-wise: a patient's scans all fall on the same side
        want_test = split == "test"
        rows = [r for r in rows
                if (_stable_fraction(str(r.get("Patient ID") or r["Image Index"]).strip(), seed) < test_fraction)
                == want_test]
    index = _nih_image_index(root)
    files: list[Path] = []
    targets: list[np.ndarray] = []
    patients: list[str] = []
    skipped: list[tuple[str, str]] = [(f"{csv_path.name}:{n}", "short row") for n in short]
    for r in rows:
        name = r["Image Index"].strip()
        f = index.get(name)
        if f is None:
            skipped.append((name, "image file missing"))
            continue
        t = np.zeros(len(labels), dtype=np.int64)
        unknown = False
        for lab in r["Finding Labels"].split("|"):
            lab = lab.strip()
            if not lab or lab == "No Finding":
                continue
            if lab not in NIH_LABELS:
                unknown = True
            elif lab in col:
                t[col[lab]] = 1
        if unknown:
            skipped.append((name, "unknown finding label"))
            continue
        files.append(f)
        targets.append(t)
        patients.append(str(r.get("Patient ID") or name).strip())
    if skipped:
        log.warning("NIH data %s (%s): %d listed image(s) skipped (file missing or unknown finding label)",
                    root.name, split, len(skipped))
    images, ok, bad = _decode_files(files, size)
    if not ok:
        raise _no_usable(root, len(skipped) + len(bad))
    task = TaskSpec(kind="multilabel", class_names=tuple(labels))
    return XrayDataset(images, np.asarray(targets)[ok], task, patient_ids=[patients[i] for i in ok],
                       skipped=skipped + bad, source=f"{root} ({split})", files=[str(files[i]) for i in ok])


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


def _load_npz(path: Path, split: str, size: int, label_set: Sequence[str] | None) -> XrayDataset:
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
    return _restrict_labels(ds, label_set, str(path)) if label_set is not None else ds


def _restrict_labels(ds: XrayDataset, label_set: Sequence[str], where: str) -> XrayDataset:
    """Keep only ``label_set`` (names) of an in-memory dataset: label columns (multilabel) or
    the scans of those classes (binary/multiclass, targets re-indexed)."""
    names = _pick_classes(ds.task.class_names, label_set, where)
    pos = [list(ds.task.class_names).index(n) for n in names]
    t = targets_array(ds)
    if ds.task.kind == "multilabel":
        out = subset(ds, np.arange(len(ds)))
        out.task = TaskSpec(kind="multilabel", class_names=tuple(names))
        out.targets = torch.as_tensor(t[:, pos])
        return out
    task, order = _names_task(names)
    remap = {pos[names.index(n)]: j for j, n in enumerate(order)}
    keep = np.flatnonzero(np.isin(t.astype(np.int64), list(remap)))
    out = subset(ds, keep)
    new_t = np.asarray([remap[int(v)] for v in t[keep]], dtype=np.int64)
    return XrayDataset(out.images, new_t, task, patient_ids=out.patient_ids, skipped=out.skipped,
                       source=out.source, files=out.files)


# ----------------------------------------------------------------------------- flat folder + labels.csv
def _load_labels_csv(root: Path, split: str, size: int, label_set: Sequence[str] | None) -> XrayDataset:
    csv_path = root / "labels.csv"
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = cols
        if "file" not in cols or "label" not in cols:
            raise UserError(f"{csv_path}: expected a header 'file,label' (optional columns: split, patient_id); "
                            f"found {cols[:6]}")
        rows = [{k: (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    if "split" in cols:
        have = sorted({r["split"] for r in rows})
        rows = [r for r in rows if r["split"] == split]
        if not rows:
            hint = "; set data.val_fraction to carve validation scans out of train" if split == "val" else ""
            raise UserError(f"{csv_path}: no rows with split {split!r} (found {have}){hint}")
    elif split != "train":
        raise UserError(f"{csv_path}: has no 'split' column, so all its scans are split 'train' "
                        f"(asked for {split!r}); add a split column or use data.val_fraction")
    rows = [r for r in rows if r["file"] and r["label"]]
    classes = _pick_classes(sorted({r["label"] for r in rows}), label_set, str(csv_path))
    try:
        task, order = _names_task(classes)
    except UserError as e:
        raise UserError(f"{csv_path}: {e}") from None
    rows = [r for r in rows if r["label"].upper() in {c.upper() for c in order}]
    upper_order = [c.upper() for c in order]
    files, labels, pids, missing = [], [], [], []
    for r in rows:
        f = (root / r["file"]).resolve()
        if root.resolve() not in f.parents:
            missing.append((r["file"], "path outside the data folder"))
            continue
        if not f.is_file():
            missing.append((r["file"], "file missing"))
            continue
        files.append(f)
        labels.append(upper_order.index(r["label"].upper()))
        pids.append(r.get("patient_id") or "")
    if missing:
        log.warning("data %s: %d file(s) listed in labels.csv skipped (missing or outside the folder)",
                    root.name, len(missing))
    images, ok, bad = _decode_files(files, size)
    if not ok:
        raise _no_usable(root, len(missing) + len(bad))
    return XrayDataset(images, np.asarray(labels)[ok], task,
                       patient_ids=[pids[i] or _patient_id_for(files[i]) for i in ok],
                       skipped=missing + bad, source=f"{root} ({split})", files=[str(files[i]) for i in ok])


# ----------------------------------------------------------------------------- entry point
def detect_format(path: Path | str) -> str:
    """``npz``, ``nih``, ``labels-csv`` or ``class-folders`` (one-line UserError otherwise)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data: no such file or folder {path}")
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return "npz"
        raise UserError(f"data {path}: a data file must be a MedMNIST-style .npz; folders hold class folders, "
                        f"the NIH layout ({NIH_CSV} + images/) or scans with labels.csv")
    if _nih_csv(path) is not None:
        return "nih"
    if (path / "labels.csv").is_file():
        return "labels-csv"
    if any((path / s).is_dir() for s in SPLITS):
        return "class-folders"
    subdirs = [p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    hint = (f"; it holds folders {sorted(subdirs)[:4]} — put class folders under {path}/train/ (and test/)"
            if subdirs else "")
    raise UserError(f"data {path}: unknown layout (expected train/ and test/ class folders, {NIH_CSV} + images/, "
                    f"labels.csv, or a .npz file){hint}")


def load_dataset(path: Path | str, split: str = "train", image_size: int = 224, task: TaskSpec | None = None,
                 *, label_set: Sequence[str] | None = None, seed: int = 0,
                 test_fraction: float = 0.2) -> XrayDataset:
    """Load ``split`` of the scans at ``path``, resized to ``image_size`` × ``image_size`` px.

    The format is detected (see the module docstring). ``task``, when given, must match the
    data's task (one-line UserError otherwise); for NIH data a multilabel ``task`` whose names
    are NIH findings selects those labels. ``label_set`` keeps only those classes (class folders,
    labels.csv, binary/multiclass .npz: other scans are left out) or label columns (NIH,
    multilabel .npz). ``seed`` and ``test_fraction`` drive the patient-wise NIH split used when
    the official split lists are absent (``test_fraction`` of the patients → ``test``).
    """
    path = Path(path)
    if int(image_size) < 8:
        raise UserError(f"image_size {image_size}: must be at least 8 px")
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test_fraction {test_fraction}: must be between 0 and 1")
    if split not in SPLITS:
        raise UserError(f"data split {split!r}: allowed are {', '.join(SPLITS)}")
    fmt = detect_format(path)
    if fmt == "nih" and label_set is None and task is not None and task.kind == "multilabel" \
            and set(task.class_names) <= set(NIH_LABELS):
        label_set = task.class_names
    if fmt == "npz":
        ds = _load_npz(path, split, int(image_size), label_set)
    elif fmt == "nih":
        ds = _load_nih(path, split, int(image_size), label_set, seed, test_fraction)
    elif fmt == "labels-csv":
        ds = _load_labels_csv(path, split, int(image_size), label_set)
    else:
        ds = _load_class_folders(path, split, int(image_size), label_set)
    if len(ds) == 0:
        raise _no_usable(path, len(ds.skipped))
    if ds.skipped:
        log.warning("data %s (%s): %d of %d file(s) skipped", path.name, split, len(ds.skipped),
                    len(ds.skipped) + len(ds))
    if task is not None and (task.kind != ds.task.kind or tuple(task.class_names) != tuple(ds.task.class_names)):
        raise UserError(f"data {path}: its classes {list(ds.task.class_names)} ({ds.task.kind}) differ from the "
                        f"expected {list(task.class_names)} ({task.kind})")
    return ds


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
              min_size: int = 10) -> list[np.ndarray]:
    """Split the indices of ``ds`` into ``num_parts`` disjoint, sorted int64 arrays that cover
    every index exactly once (e.g. to simulate hospitals).

    * ``iid``: a random permutation cut into equal parts;
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
        return [np.sort(p).astype(np.int64) for p in np.array_split(rng.permutation(n), num_parts)]
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
