"""A validation split no hospital trains on, for class-folder data that has none (Kermany).

Builds ``OUT/{train,val,test}/CLASS/`` of symbolic links (nothing is copied): ``val`` holds the
scans of a reproducible ``--fraction`` of the *patients* of ``ROOT/train`` (so no patient is on
both sides), ``train`` the rest, ``test`` is ``ROOT/test`` unchanged. Hospitals partition
``OUT/train``; the server chooses its operating point on ``OUT/val``; test is read once per figure.

Usage::

    ./dev bench heldout ../shared/data/kermany-cxr-224 --out bench/results/work-kermany-heldout
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(root: Path, out: Path, fraction: float = 0.1, seed: int = 0) -> dict[str, int]:
    from xrayfed.common.data.dataset import kermany_patient_id, stable_fraction

    root, out = root.resolve(), out.resolve()
    counts: dict[str, int] = {}
    for split in ("train", "test"):
        for cls_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            for f in sorted(cls_dir.iterdir()):
                if not f.is_file():
                    continue
                dest = split
                if split == "train" and stable_fraction(kermany_patient_id(f.name), seed) < fraction:
                    dest = "val"
                link = out / dest / cls_dir.name / f.name
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.is_symlink():
                    link.symlink_to(f)
                counts[dest] = counts.get(dest, 0) + 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(build(a.root, a.out, a.fraction, a.seed))


if __name__ == "__main__":
    main()
