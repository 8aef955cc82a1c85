"""The in-memory dataset (uint8 scans at the target size), decoding with skip-and-count, patient ids
and class names → task."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

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
    scans came from), ``files`` (the file of each scan, or None for arrays such as ``.npz``),
    ``links_skipped`` (``(path, reason)`` of links not followed and second paths to a scan
    already read: see :class:`TreeWalk`), ``patient_ids_known`` (whether every id names a real
    patient — DICOM PatientID, Kermany-style file name, a labels.csv/NIH/.npz patient column —
    rather than standing in for one per file: only then can the privacy unit be the patient).
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray | torch.Tensor, task: TaskSpec, *,
                 patient_ids: Sequence[str] | None = None, skipped: Sequence[tuple[str, str]] | None = None,
                 source: str = "", files: Sequence[str] | None = None,
                 links_skipped: Sequence[tuple[str, str]] | None = None,
                 patient_ids_known: bool | None = None) -> None:
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
        self.patient_ids_known = bool(self.patient_ids is not None if patient_ids_known is None
                                      else patient_ids_known and self.patient_ids is not None)
        self.files = [str(f) for f in files] if files is not None else None
        if self.files is not None and len(self.files) != n:
            raise ValueError(f"{len(self.files)} file names for {n} images")
        self.skipped: list[tuple[str, str]] = list(skipped or [])
        self.links_skipped: list[tuple[str, str]] = list(links_skipped or [])
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
    source and the skipped lists are carried over)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    return XrayDataset(
        ds.images[idx], ds.targets.numpy()[idx], ds.task,
        patient_ids=[ds.patient_ids[i] for i in idx] if ds.patient_ids is not None else None,
        skipped=ds.skipped, source=ds.source,
        files=[ds.files[i] for i in idx] if ds.files is not None else None, links_skipped=ds.links_skipped,
        patient_ids_known=ds.patient_ids_known,
    )


#: ``select(index) → indices``: which scans of a data folder to decode, chosen on its index (an
#: :class:`XrayDataset` of every listed file with its target, patient id and file name, and a 1×1
#: placeholder image) before any pixel is read. A hospital that holds one part of a shared folder
#: (``data.partition``) decodes only that part (:func:`xrayfed.client.hospital.hospital_split`).
Select = Callable[["XrayDataset"], Sequence[int]]


def index_dataset(task: TaskSpec, targets, patient_ids: Sequence[str], files: Sequence[Path | str],
                  patient_ids_known: bool) -> XrayDataset:
    """The listed scans before decoding, for a :data:`Select`: targets, patient ids and files,
    with a 1×1 black placeholder image each (no scan is read); ``patient_ids_known``: whether
    every listed file names its patient."""
    return XrayDataset(np.zeros((len(files), 1, 1), dtype=np.uint8), np.asarray(targets), task,
                       patient_ids=patient_ids, files=files, patient_ids_known=patient_ids_known)


def selected(select: Select, index: XrayDataset) -> list[int]:
    """``select(index)`` checked: distinct positions of ``index``, in increasing order."""
    keep = np.asarray(select(index), dtype=np.int64).reshape(-1)
    if len(np.unique(keep)) != len(keep) or (len(keep) and (keep.min() < 0 or keep.max() >= len(index))):
        raise ValueError(f"select: {len(keep)} positions, not distinct positions of {len(index)} listed scans")
    return sorted(int(i) for i in keep)


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


def no_local_test(where: Path | str, layout: str) -> str:
    """Why a layout with no test split of its own has no ``test`` split: none was asked for."""
    return (f"data {where}: no 'test' split: {layout} has none of its own and every scan trains unless "
            "data.local_test_fraction > 0 carves a local test split (a federation's test set is the server's)")


def is_candidate(f: Path) -> bool:
    return f.is_file() and not f.name.startswith(".")


@dataclass
class TreeWalk:
    """What a walk over one data folder has seen, shared by all its class folders.

    ``root``: the data folder's real path; ``class_dirs``: the real path of each class folder of
    the data (→ its name, e.g. ``train/NORMAL``). Every real folder and file read is remembered
    by (device, inode), so nothing is read twice whatever links lead to it; ``links_skipped``
    holds ``(path, reason)`` of each link (or second path to a scan) not followed.
    """

    root: Path
    class_dirs: dict[Path, str] = field(default_factory=dict)
    dirs: set[tuple[int, int]] = field(default_factory=set)
    files: set[tuple[int, int]] = field(default_factory=set)
    links_skipped: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def of(cls, root: Path, class_folders: Sequence[Path] = ()) -> TreeWalk:
        """The walk of the data folder ``root`` whose class folders are ``class_folders``."""
        return cls(_real(root), {_real(c): _name(c, root) for c in class_folders})

    def refuse_class_folder(self, folder: Path, class_folders: Sequence[Path]) -> str | None:
        """Why the class folder ``folder`` may not be read, or None: it is a link to a folder that
        holds the data folder (a loop), or that is, holds or lies in the real folder of another
        class (``class_folders``: every class folder of the data; the same class of another split
        may share it). A class folder that is no link is always read."""
        if not folder.is_symlink():
            return None
        real = _real(folder)
        if _within(self.root, real):
            return "a class folder that links up to a folder holding the data (a loop)"
        for other in class_folders:
            r = _real(other)
            if other.name != folder.name and (_within(real, r) or _within(r, real)):
                return f"a class folder that is, holds or lies in the class folder {self.class_dirs.get(r, other.name)}"
        return None

    def refuse_dir(self, real: Path, top: Path) -> str | None:
        """Why the folder at ``real`` may not be read as part of the class folder ``top``
        (both real paths), or None."""
        if _within(top, real) or _within(self.root, real):
            return "a link up to a folder that holds class folders (a loop)"
        other = self._other_class(real, top)
        if other is not None:
            return f"a link into the class folder {other}"
        if _within(real, self.root) and not _within(real, top):
            return "a link out of its class folder to another part of the data"
        return None

    def refuse_file(self, real: Path, top: Path) -> str | None:
        """Why the scan at ``real`` may not count for the class folder ``top``, or None."""
        other = self._other_class(real, top)
        if other is not None:
            return f"a link to a scan of the class folder {other}"
        if _within(real, self.root) and not _within(real, top):
            return "a link out of its class folder to another part of the data"
        return None

    def _other_class(self, real: Path, top: Path) -> str | None:
        """The name of the class folder ``real`` lies in when that is not ``top`` (the innermost
        one, so that class folders nested in one another stay apart), else None."""
        owner = max((c for c in self.class_dirs if _within(real, c)), key=lambda c: len(c.parts), default=None)
        return self.class_dirs[owner] if owner is not None and owner != top else None


def _name(folder: Path, root: Path) -> str:
    """``folder`` as the data names it: relative to ``root`` (``train/NORMAL``) when below it."""
    try:
        return folder.relative_to(root).as_posix()
    except ValueError:
        return folder.name


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def _within(inner: Path, outer: Path) -> bool:
    """``inner`` is ``outer`` or below it (real paths; compared part by part, as
    ``outer in inner.parents`` would, without building every parent)."""
    a, b = inner.parts, outer.parts
    return len(a) >= len(b) and a[:len(b)] == b


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def iter_files(folder: Path, walk: TreeWalk | None = None) -> Iterator[tuple[Path, str | None]]:
    """Every file below ``folder`` as ``(path, why_not)``, in walk order (sorted names, a
    folder's files before its subfolders), following symbolic links (hospital storage often
    links scans or whole folders in); ``why_not`` is None for a regular file, else why it
    cannot be read (a link that leads nowhere, a FIFO or device, an unreadable folder).

    ``walk`` (shared by the class folders of one data folder; a fresh one for ``folder``
    alone when None) guards the walk: no real folder or file is read twice, and no link leads
    up to a folder that holds class folders or into another class's or split's folder — each
    such link is recorded in ``walk.links_skipped`` and not followed.
    """
    walk = walk if walk is not None else TreeWalk.of(folder)
    top = _real(folder)
    try:
        st = os.stat(folder)
    except OSError as e:
        yield folder, f"folder not readable ({type(e).__name__})"
        return
    if _key(st) in walk.dirs:
        walk.links_skipped.append((str(folder), "a folder already read (a second link to it)"))
        return
    walk.dirs.add(_key(st))
    stack = [folder]
    while stack:
        d = stack.pop()
        try:
            entries = sorted((e for e in os.scandir(d) if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as e:
            yield d, f"folder not readable ({type(e).__name__})"
            continue
        subdirs: list[Path] = []
        for e in entries:
            f = Path(d) / e.name
            try:
                st = os.stat(f)
            except OSError:
                yield f, "symbolic link to a missing file" if e.is_symlink() else "not readable"
                continue
            if stat.S_ISDIR(st.st_mode):
                why = "a folder already read (a loop, or a second link to it)" if _key(st) in walk.dirs \
                    else walk.refuse_dir(_real(f), top)
                if why is not None:
                    walk.links_skipped.append((str(f), why))
                    continue
                walk.dirs.add(_key(st))
                subdirs.append(f)
            elif stat.S_ISREG(st.st_mode):
                # a file that is no link lies in its folder, which was checked when reached
                why = "the same scan as a file already read (a link or hard link to it)" if _key(st) in walk.files \
                    else walk.refuse_file(_real(f), top) if e.is_symlink() else None
                if why is not None:
                    walk.links_skipped.append((str(f), why))
                    continue
                walk.files.add(_key(st))
                yield f, None
            else:
                yield f, "not a regular file (a FIFO, device or socket)"
        stack.extend(reversed(subdirs))


def walk_files(folder: Path, walk: TreeWalk | None = None) -> tuple[list[Path], list[tuple[str, str]]]:
    """:func:`iter_files` collected: the files (sorted) and what cannot be read (links that lead
    nowhere, FIFOs, devices: skipped, with the reason)."""
    files: list[Path] = []
    broken: list[tuple[str, str]] = []
    for f, why in iter_files(folder, walk):
        if why is None:
            files.append(f)
        else:
            broken.append((str(f), why))
    return sorted(files), broken


# ----------------------------------------------------------------------------- patient ids
_KERMANY_PERSON = re.compile(r"^(?:[a-z]+-)?(person\d+)_", re.IGNORECASE)  # (split-)personN_…
_TRAILING_NUMBER = re.compile(r"^(.+)-\d+$")
_KERMANY_STUDY = re.compile(r"^((?:NORMAL2-)?IM-\d+)(?:-\d+)+$", re.IGNORECASE)  # IM-0115-0001(-0002)


def kermany_patient_id(name: str) -> str:
    """Patient id from a Kermany-style file name.

    ``person12_bacteria_3.jpeg`` → ``person12``; ``IM-0115-0001.jpeg`` → ``IM-0115``;
    ``NORMAL2-IM-1427-0001.jpeg`` → ``NORMAL2-IM-1427``; a study's further images
    (``IM-0429-0001-0002.jpeg``, beside ``IM-0429-0001.jpeg``) → the same ``IM-0429``; another
    name ending in ``-N`` → the name without it; anything else → the file stem.
    """
    return _kermany_id(Path(name).stem)[0]


def _kermany_id(stem: str) -> tuple[str, bool]:
    """``(patient id, named)``: the rules of :func:`kermany_patient_id`; ``named`` when the name
    itself names the patient (``personN_…``, ``IM-…``), not when the id only stands in for one."""
    m = _KERMANY_PERSON.match(stem)
    if m:
        return m.group(1).lower(), True
    m = _KERMANY_STUDY.match(stem)
    if m:
        return m.group(1), True
    m = _TRAILING_NUMBER.match(stem)
    return (m.group(1) if m else stem), False


def patient_id_for(f: Path) -> str:
    return patient_id_and_source(f)[0]


def patient_id_and_source(f: Path) -> tuple[str, bool]:
    """``(patient id, known)`` of a scan file: its DICOM PatientID, or the patient a Kermany-style
    file name names (``person12_…``, ``IM-0115-…``, ``NORMAL2-IM-…``) — known; otherwise the
    file name stands in for the patient (:func:`kermany_patient_id`'s other rules) — not known."""
    if is_dicom(f):
        try:
            pid = read_dicom_patient_id(f)
        except UserError:
            pid = None
        if pid:
            return pid, True
    return _kermany_id(Path(f.name).stem)


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


class UnknownLabels(UserError):
    """``data.labels`` names a class or label the data does not have (bad input: one line)."""


def pick_classes(available: Sequence[str], label_set: Sequence[str] | None, where: str) -> list[str]:
    """The classes of ``label_set`` (``data.labels``, any case) as ``available`` spells them, or
    all of ``available`` when it is None; :class:`UnknownLabels` names the allowed ones."""
    if label_set is None:
        return list(available)
    by_upper = {a.upper(): a for a in available}
    missing = [c for c in label_set if c.upper() not in by_upper]
    if missing:
        raise UnknownLabels(f"data {where}: data.labels {list(missing)} not found; allowed: {list(available)}")
    return [by_upper[c.upper()] for c in label_set]


def stable_fraction(key: str, seed: int) -> float:
    """A deterministic pseudo-random number in [0, 1) for ``key`` (SHA-256 of seed:key)."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64
