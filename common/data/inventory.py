"""What a hospital's data holds, before it joins a federation (``xrayfed data check``): per split
and class the usable scans, patients, image sizes and bit depths seen, unreadable files, empty
classes, patients found in two splits, the class balance and the task it would train.

It reads the data exactly as training does (:func:`xrayfed.common.data.load_dataset`, decoded at a
small size) and each usable file's header once more for its size and bit depth.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from xrayfed.common.data import CHECK_SIZE, SPLITS, detect_format, load_dataset, targets_array
from xrayfed.common.data.dataset import UnknownLabels
from xrayfed.common.data.npz import npz_arrays
from xrayfed.common.errors import UserError
from xrayfed.common.preprocess import is_dicom, read_dicom


#: The row of the multi-label scans that carry none of the labels (NIH's own name for them).
NO_FINDING = "No Finding"
#: That row when ``data.labels`` chooses some of the labels: such a scan may carry another finding.
NONE_OF_CHOSEN = "none of data.labels"


@dataclass
class ClassSummary:
    name: str
    images: int
    patients: int | None


@dataclass
class SplitSummary:
    split: str
    images: int
    patients: int | None
    classes: list[ClassSummary]
    sizes: dict[str, int]  # "W×H" → count (most common first)
    bit_depths: dict[str, int]  # "8", "16", "8 (RGB)" → count
    unreadable: list[tuple[str, str]]  # (file, reason)
    empty_classes: list[str]
    links_skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): links not followed


@dataclass
class DataReport:
    path: str
    layout: str
    task: str
    class_names: list[str]
    splits: list[SplitSummary]
    patients_in_two_splits: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # why it cannot train (empty: it can)
    warnings: list[str] = field(default_factory=list)  # worth fixing, but it can train

    def to_dict(self) -> dict:
        return asdict(self)


def _header(path: str) -> tuple[str, str]:
    """``("W×H", bit depth)`` from a scan file's header (nothing decoded)."""
    from PIL import Image

    p = Path(path)
    if is_dicom(p):
        ds = read_dicom(p, pixels=False)
        bits = str(int(getattr(ds, "BitsStored", 0) or getattr(ds, "BitsAllocated", 0) or 0))
        return f"{int(ds.Columns)}×{int(ds.Rows)}", bits
    with Image.open(p) as im:
        mode = im.mode
        bits = {"1": "1", "L": "8", "P": "8 (palette)", "RGB": "8 (RGB)", "RGBA": "8 (RGBA)", "LA": "8",
                "I;16": "16", "I;16B": "16", "I": "32", "F": "32 (float)"}.get(mode, mode)
        return f"{im.size[0]}×{im.size[1]}", bits


def scans_per_class(ds) -> list[int]:
    """Scans of each class of ``ds`` in ``task.class_names`` order; multilabel: the scans that
    carry each label (a scan with two findings counts under both)."""
    y = np.asarray(targets_array(ds))
    if ds.task.kind == "multilabel":
        return [int(v) for v in y.reshape(len(y), -1).sum(axis=0)] if len(y) else [0] * len(ds.task.class_names)
    return [int((y.reshape(-1) == k).sum()) for k in range(len(ds.task.class_names))]


def no_finding_scans(ds) -> int | None:
    """Multilabel: the scans with none of the labels (NIH "No Finding"); else None."""
    if ds.task.kind != "multilabel":
        return None
    y = np.asarray(targets_array(ds))
    return int((y.reshape(len(y), -1).sum(axis=1) == 0).sum())


def training_findings(ds) -> tuple[list[str], list[str]]:
    """``(problems, warnings)`` of the training scans ``ds``: the one rule that `data check`,
    `demo` and `simulate` apply before anything trains. A binary or multi-class model needs scans
    of every class (a problem: it cannot train); a multi-label model trains with a label no scan
    carries, but learns it as always absent (a warning naming ``data.labels``)."""
    counts = scans_per_class(ds)
    names = list(ds.task.class_names)
    empty = [n for n, c in zip(names, counts) if c == 0]
    if not empty:
        return [], []
    if ds.task.kind == "multilabel":
        return [], [f"train has no scans with {empty}: the model learns them as always absent; choose the "
                    "labels to train with data.labels"]
    return [f"train has no scans of {empty}: a {ds.task.kind} model needs scans of every class to train (add "
            "them, or choose the classes with data.labels)"], []


def _no_usable_split(split: str, msg: str) -> str:
    """The warning for a split other than ``train`` that exists but has no usable scan (``msg``:
    the loader's one line): nothing to evaluate on there, and training, which reads ``train``,
    is not affected."""
    m = re.search(r"\((\d+) file\(s\) skipped", msg)
    n = int(m.group(1)) if m else 0
    why = f"none of its {n} file(s) could be read" if n else "it holds no scans"
    return f"the {split} split has no usable scans ({why}): nothing to evaluate on there; training reads train"


def inventory(path: Path | str, loaded: dict | None = None, *, label_set: Sequence[str] | None = None,
              seed: int = 0, test_fraction: float = 0.0) -> DataReport:
    """The :class:`DataReport` of the data at ``path`` (any supported layout). ``loaded``, when
    given, receives each split's dataset (decoded at ``CHECK_SIZE``) for further checks.
    ``label_set``, ``seed``, ``test_fraction``: a hospital's ``data.labels``, ``data.seed`` and
    ``data.local_test_fraction`` (see :func:`~xrayfed.common.data.load_dataset`)."""
    path = Path(path)
    layout = detect_format(path)
    warnings: list[str] = []
    splits: list[SplitSummary] = []
    task = None
    problems: list[str] = []
    patients_of: dict[str, set[str]] = {}
    for split in SPLITS:
        try:
            ds = load_dataset(path, split=split, image_size=CHECK_SIZE, label_set=label_set, seed=seed,
                              test_fraction=test_fraction)
            if loaded is not None:
                loaded[split] = ds
        except UnknownLabels:
            raise  # bad input (data.labels), not a fault of the data: one line
        except UserError as e:
            msg = str(e)
            if msg in problems:
                pass  # the same fault seen from another split: said once
            elif split == "train":
                problems.append(msg)
            elif "no usable scans" in msg:  # an empty or unreadable test/val split: training is unaffected
                warnings.append(_no_usable_split(split, msg))
            elif "no '" not in msg and "not available" not in msg and "no split" not in msg \
                    and "no rows with split" not in msg and "has no 'split' column" not in msg:
                problems.append(msg)  # a split that exists but cannot be read
            continue
        task = task or ds.task
        y = np.asarray(targets_array(ds))
        names = list(ds.task.class_names)
        pids = list(ds.patient_ids) if getattr(ds, "patient_ids", None) is not None else None
        counts = scans_per_class(ds)
        # which scans count under each row: a class, or a label they carry (multilabel)
        members = [y.reshape(len(y), -1)[:, k] == 1 if ds.task.kind == "multilabel" else y.reshape(-1) == k
                   for k in range(len(names))]
        rows = list(zip(names, counts, members))
        if ds.task.kind == "multilabel":
            rows.append((NO_FINDING if label_set is None else NONE_OF_CHOSEN, no_finding_scans(ds),
                         y.reshape(len(y), -1).sum(axis=1) == 0))
        classes = [ClassSummary(name=name, images=n, patients=None if pids is None else
                                len({pids[i] for i in np.flatnonzero(m)}))
                   for name, n, m in rows]
        sizes: Counter = Counter()
        depths: Counter = Counter()
        for f in getattr(ds, "files", None) or []:
            try:
                s, b = _header(f)
            except Exception:  # noqa: BLE001 - it decoded a moment ago; a header oddity is not fatal
                s, b = "?", "?"
            sizes[s] += 1
            depths[b] += 1
        if layout == "npz":  # one array per split: its shape and dtype (from its header)
            shape, dtype = npz_arrays(path)[f"{split}_images"]
            sizes[f"{shape[2]}×{shape[1]}"] = shape[0]
            depths[f"{dtype.itemsize * 8}" + (" (RGB)" if len(shape) == 4 and shape[-1] in (3, 4) else "")] = shape[0]
        splits.append(SplitSummary(
            split=split, images=len(ds), patients=len(set(pids)) if pids is not None else None, classes=classes,
            sizes=dict(sizes.most_common()), bit_depths=dict(depths.most_common()),
            unreadable=[(str(f), str(r)) for f, r in getattr(ds, "skipped", [])],
            empty_classes=[c.name for c in classes[:len(names)] if c.images == 0],
            links_skipped=[(str(f), str(r)) for f, r in getattr(ds, "links_skipped", [])]))
        if pids is not None:
            patients_of[split] = set(pids)
        if split == "train":
            found, said = training_findings(ds)
            problems += found
            warnings += said
    if task is None:  # no split could be read: say why, as a report (it cannot train)
        return DataReport(path=str(path), layout=layout, task="unknown", class_names=[], splits=[],
                          problems=problems or [f"data {path}: nothing readable"])
    shared = sorted(set.intersection(*patients_of.values())) if len(patients_of) > 1 else []
    if shared:
        warnings.append(f"{len(shared)} patient(s) appear in more than one split (e.g. {shared[0]}): evaluation "
                        "would see scans of patients it trained on (or the data reuses patient numbers across splits)")
    return DataReport(path=str(path), layout=layout, task=task.kind, class_names=list(task.class_names),
                      splits=splits, patients_in_two_splits=shared, problems=problems, warnings=warnings)
