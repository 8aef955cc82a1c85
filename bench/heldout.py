"""A validation split no hospital trains on, for class-folder data that has none (Kermany).

Builds ``OUT/{train,val,test}/CLASS/`` of symbolic links (nothing is copied): ``val`` holds the
scans of a reproducible ``--fraction`` of the *patients* of ``ROOT/train`` (so no patient is on
both sides), ``train`` the rest, ``test`` is ``ROOT/test`` unchanged. Hospitals partition
``OUT/train``; the server chooses its operating point on ``OUT/val``; test is read once per figure.

``--order earliest`` holds out by study order instead, where the file names number the
studies (Kermany's normals: ``IM-NNNN`` and ``NORMAL2-IM-NNNN``): ``val`` then takes the
lowest-numbered ``--fraction`` of the studies of each such series, and the rest of each class
(``personN``, not numbered by time) by patient as above. Kermany's official test normals are
the series' first studies (``IM-0001``–``0111``, ``NORMAL2-IM-0007``–``0381``; train starts at
``IM-0115`` and ``NORMAL2-IM-0383``), so this validation split sits next to test in
acquisition order: a temporal validation (the split's layout only; no test scan is read).

Usage::

    ./dev bench heldout ../shared/data/kermany-cxr-224 --out bench/results/work-kermany-heldout
    ./dev bench heldout ../shared/data/kermany-cxr-224 --order earliest --out bench/results/work-kermany-earliest
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


_SERIES = re.compile(r"^(.*?)(\d+)$")  # "NORMAL2-IM-0383" -> ("NORMAL2-IM-", "0383")


def earliest_studies(patients: list[str], fraction: float) -> dict[str, bool]:
    """For each id among ``patients`` that belongs to a numbered series (``IM-0115``: series
    ``IM-``, study 115), whether it is among the lowest-numbered ``fraction`` of its series'
    studies. ``person`` ids and unnumbered ones are not numbered by time and are left out (the
    caller holds them out at random)."""
    series: dict[str, list[tuple[int, str]]] = {}
    for pid in set(patients):
        m = _SERIES.match(pid)
        if m and not pid.startswith("person"):
            series.setdefault(m.group(1), []).append((int(m.group(2)), pid))
    held: dict[str, bool] = {}
    for studies in series.values():
        studies.sort()
        cut = round(len(studies) * fraction)
        held.update((pid, i < cut) for i, (_, pid) in enumerate(studies))
    return held


def build(root: Path, out: Path, fraction: float = 0.1, seed: int = 0, order: str = "random") -> dict[str, int]:
    from xrayfed.common.data.dataset import kermany_patient_id, stable_fraction

    root, out = root.resolve(), out.resolve()
    counts: dict[str, int] = {}
    for split in ("train", "test"):
        for cls_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            files = sorted(f for f in cls_dir.iterdir() if f.is_file())
            pids = [kermany_patient_id(f.name) for f in files]
            by_order = earliest_studies(pids, fraction) if order == "earliest" and split == "train" else {}
            for f, pid in zip(files, pids):
                dest = split
                held = by_order.get(pid)
                if split == "train" and (stable_fraction(pid, seed) < fraction if held is None else held):
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
    ap.add_argument("--order", choices=("random", "earliest"), default="random",
                    help="random: val by patient at random; earliest: numbered series by study order")
    a = ap.parse_args()
    print(build(a.root, a.out, a.fraction, a.seed, a.order))


if __name__ == "__main__":
    main()
