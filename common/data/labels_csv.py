"""A flat folder of scans (often DICOM) with ``labels.csv`` (``file,label[,split,patient_id]``)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from xrayfed.common.data.dataset import (
    Select,
    XrayDataset,
    decode_files,
    index_dataset,
    no_usable_error,
    patient_id_and_source,
    pick_classes,
    selected,
    task_from_names,
)
from xrayfed.common.errors import UserError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- flat folder + labels.csv
def load_labels_csv(root: Path, split: str, size: int, label_set: Sequence[str] | None,
                    select: Select | None = None) -> XrayDataset:
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
    classes = pick_classes(sorted({r["label"] for r in rows}), label_set, str(csv_path))
    try:
        task, order = task_from_names(classes)
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

    def ids_of(positions) -> list[tuple[str, bool]]:  # (patient id, known): the patient_id column, else the file
        return [(pids[i], True) if pids[i] else patient_id_and_source(files[i]) for i in positions]

    ids = None
    known = None  # with a selection: whether every listed file names its patient (the whole split's answer)
    if select is not None:
        ids = ids_of(range(len(files)))
        known = all(k for _, k in ids)
        keep = selected(select, index_dataset(task, labels, [pid for pid, _ in ids], files, known))
        files, labels, ids = [files[i] for i in keep], [labels[i] for i in keep], [ids[i] for i in keep]
    images, ok, bad = decode_files(files, size)
    if not ok:
        raise no_usable_error(root, len(missing) + len(bad))
    ids = ids_of(ok) if ids is None else [ids[i] for i in ok]
    return XrayDataset(images, np.asarray(labels)[ok], task, patient_ids=[pid for pid, _ in ids],
                       patient_ids_known=all(k for _, k in ids) if known is None else known,
                       skipped=missing + bad, source=f"{root} ({split})", files=[str(files[i]) for i in ok])


