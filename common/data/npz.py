"""MedMNIST-style ``.npz`` (``{split}_images``, ``{split}_labels``; labels validated)."""

from __future__ import annotations

import logging
import os
import stat
import zipfile
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
from xrayfed.common.preprocess import MAX_SCAN_PIXELS, to_uint8

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- npz layout (headers only)
_NPZ_KEYS = ("class_names", "task_kind")  # the optional arrays besides {split}_images and {split}_labels
#: optional: one patient id per scan (text or integers), the patient-level privacy unit's key
PATIENT_IDS = "{split}_patient_ids"
_NPZ_ALLOWED = ("allowed: a MedMNIST-style .npz with {split}_images (N, H, W) or (N, H, W, 1|3|4) of integers or "
                "floats and {split}_labels (N,) or (N, K) of integers")


def memory_bytes() -> int:
    """Bytes of physical memory of this machine (0 when the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def max_npz_bytes() -> int:
    """Bytes of array data an .npz file may declare in all: half this machine's physical memory
    (its scans are held in memory, and decoded once more at the model's size); 16 GiB when the
    system does not say how much it has."""
    return memory_bytes() // 2 or 16 << 30


def require_regular_file(path: Path, what: str = "data") -> None:
    """One-line UserError unless ``path`` is a regular file (checked without opening it, so a
    FIFO or device is never read)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"{what} {path}: cannot be read ({type(e).__name__}: {e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{what} {path}: not a regular file ({_file_kind(st.st_mode)}); allowed: a .npz file "
                        "or a folder")


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a plain file"


def npz_arrays(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The arrays of the .npz file at ``path`` as key → (shape, dtype), read from each member's
    .npy header (no array data is decompressed), checked: a regular file, a zip archive, every
    member the layout uses a .npy array of numbers or text (never Python objects), images of at
    most :data:`~xrayfed.common.preprocess.MAX_SCAN_PIXELS` pixels each, labels one row per
    image, at least one split, and no more array data than :func:`max_npz_bytes`. One-line
    UserError otherwise."""
    require_regular_file(path)
    try:
        with zipfile.ZipFile(path) as zf:
            members = [i for i in zf.infolist() if not i.is_dir()]
            out = {}
            for info in members:
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if not _npz_key_used(key):
                    continue
                if not info.filename.endswith(".npy"):
                    raise UserError(f"{path}: member {info.filename} is not a .npy array; {_NPZ_ALLOWED}")
                out[key] = _npy_header(zf, info, path)
    except UserError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise UserError(f"{path}: not a readable .npz file ({type(e).__name__}); {_NPZ_ALLOWED}") from None
    _check_npz_layout(out, path)
    return out


def _npz_key_used(key: str) -> bool:
    return key.endswith(("_images", "_labels", "_patient_ids")) or key in _NPZ_KEYS


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the .npy header of one member (a few hundred bytes read)."""
    from numpy.lib import format as npy

    with zf.open(info) as f:
        try:
            version = npy.read_magic(f)
            read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, _, dtype = read(f)
        except Exception as e:  # noqa: BLE001 - not a .npy header
            raise UserError(f"{path}: member {info.filename} is not a .npy array ({type(e).__name__}); "
                            f"{_NPZ_ALLOWED}") from None
    if dtype.hasobject or dtype.kind not in "biufUS":
        raise UserError(f"{path}: {info.filename[:-4]} holds {dtype} values; {_NPZ_ALLOWED}")
    return tuple(int(n) for n in shape), dtype


def _check_npz_layout(arrays: dict[str, tuple[tuple[int, ...], np.dtype]], path: Path) -> None:
    splits = sorted(k[: -len("_images")] for k in arrays if k.endswith("_images"))
    if not splits:
        raise UserError(f"{path}: no {{split}}_images array (it holds {sorted(arrays) or 'no arrays of the layout'}); "
                        f"{_NPZ_ALLOWED}")
    total = 0
    for key, (shape, dtype) in arrays.items():
        total += int(np.prod(shape, dtype=object)) * dtype.itemsize
    for split in splits:
        (shape, dtype) = arrays[f"{split}_images"]
        if dtype.kind not in "biuf" or not (len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3, 4))):
            raise UserError(f"{path}: {split}_images is {dtype} of shape {shape}; {_NPZ_ALLOWED}")
        if shape[1] * shape[2] > MAX_SCAN_PIXELS:
            raise UserError(f"{path}: {split}_images holds images of {shape[2]}×{shape[1]} px; at most "
                            f"{MAX_SCAN_PIXELS:,} pixels each are allowed")
        if f"{split}_labels" in arrays:
            lshape, ldtype = arrays[f"{split}_labels"]
            if ldtype.kind not in "biuf" or len(lshape) not in (1, 2) or lshape[0] != shape[0]:
                raise UserError(f"{path}: {split}_labels is {ldtype} of shape {lshape} for {shape[0]} images; "
                                f"{_NPZ_ALLOWED}")
    limit = max_npz_bytes()
    if total > limit:
        raise UserError(f"{path}: its arrays declare {total / 2**30:.1f} GiB; at most {limit / 2**30:.1f} GiB "
                        "(half this machine's memory) are allowed")


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
    npz_arrays(path)  # shapes, dtypes and sizes from the headers, before any array is read
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
            pkey = PATIENT_IDS.format(split=split)
            pids = [str(p) for p in np.asarray(z[pkey]).reshape(-1)] if pkey in z.files else None
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt member (MemoryError included)
            raise UserError(f"{path}: cannot read {key} ({type(e).__name__})") from None
    if len(labels) != len(imgs):
        raise UserError(f"{path.name}: {len(imgs)} {split} images but {len(labels)} labels")
    if len(imgs) == 0:
        raise UserError(f"{path.name}: {split}_images holds no images")
    if pids is not None and len(pids) != len(imgs):
        raise UserError(f"{path.name}: {len(imgs)} {split} images but {len(pids)} {split}_patient_ids")
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
    ds = XrayDataset(imgs, targets, task, patient_ids=pids, source=f"{path} ({split})")
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
    return XrayDataset(out.images, new_t, task, patient_ids=out.patient_ids,
                       patient_ids_known=out.patient_ids_known, skipped=out.skipped,
                       source=out.source, files=out.files)


