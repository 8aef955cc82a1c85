"""NIH ChestX-ray14: ``Data_Entry_2017.csv`` + ``images/`` (14 labels; official or patient-wise split)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from xrayfed.common.data.dataset import (
    NIH_CSVS,
    Select,
    XrayDataset,
    decode_files,
    index_dataset,
    no_local_test,
    no_usable_error,
    pick_classes,
    selected,
    stable_fraction,
)
from xrayfed.common.errors import UserError
from xrayfed.common.prediction import NIH_LABELS, TaskSpec

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- NIH
def nih_csv(root: Path) -> Path | None:
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


def _read_list(p: Path) -> set[str]:
    return set(p.read_text(encoding="utf-8").split())


def load_nih(root: Path, split: str, size: int, label_set: Sequence[str] | None, seed: int,
              test_fraction: float, select: Select | None = None) -> XrayDataset:
    csv_path = nih_csv(root)
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
    labels = pick_classes(NIH_LABELS, label_set, str(root))
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
        if split == "test" and test_fraction == 0:
            raise UserError(no_local_test(root, "NIH data without train_val_list.txt / test_list.txt"))
        want_test = split == "test"
        rows = [r for r in rows
                if (stable_fraction(str(r.get("Patient ID") or r["Image Index"]).strip(), seed) < test_fraction)
                == want_test]
    index = _nih_image_index(root)
    files: list[Path] = []
    targets: list[np.ndarray] = []
    patients: list[str] = []
    rows_used: list = []
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
        rows_used.append(r)
    if skipped:
        log.warning("NIH data %s (%s): %d listed image(s) skipped (file missing or unknown finding label)",
                    root.name, split, len(skipped))
    task = TaskSpec(kind="multilabel", class_names=tuple(labels))
    known = all(str(r.get("Patient ID") or "").strip() for r in rows_used)  # over every listed scan
    if select is not None:
        keep = selected(select, index_dataset(task, np.asarray(targets).reshape(len(files), len(labels)), patients,
                                              files, known))
        files, targets = [files[i] for i in keep], [targets[i] for i in keep]
        patients = [patients[i] for i in keep]
    images, ok, bad = decode_files(files, size)
    if not ok:
        raise no_usable_error(root, len(skipped) + len(bad))
    return XrayDataset(images, np.asarray(targets)[ok], task, patient_ids=[patients[i] for i in ok],
                       patient_ids_known=known,
                       skipped=skipped + bad, source=f"{root} ({split})", files=[str(files[i]) for i in ok])


