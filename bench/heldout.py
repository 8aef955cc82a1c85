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

``--order series --series NORMAL2-IM-`` holds out a whole acquisition series instead: every
study of that numbered series goes to ``val`` (none of it is trained on), the other series
stay in ``train``, and the rest of each class (``personN``) is held out by patient at
``--fraction`` as above. Validation then asks whether the model recognises normal scans of a
series it never saw, the kind of shift that a random patient split cannot show.

Usage::

    ./dev bench heldout ../shared/data/kermany-cxr-224 --out bench/results/work-kermany-heldout
    ./dev bench heldout ../shared/data/kermany-cxr-224 --order earliest --out bench/results/work-kermany-earliest
    ./dev bench heldout ../shared/data/kermany-cxr-224 --order series --series NORMAL2-IM- \
        --out bench/results/work-kermany-series-normal2
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


_SERIES = re.compile(r"^(.*?)(\d+)$")  # "NORMAL2-IM-0383" -> ("NORMAL2-IM-", "0383")


def numbered_series(patients: list[str]) -> dict[str, list[tuple[int, str]]]:
    """The ids among ``patients`` that belong to a numbered series (``IM-0115``: series ``IM-``,
    study 115), as ``{series: [(study number, id), ...]}``. ``person`` ids and unnumbered ones
    are not numbered by time and are left out (the caller holds them out at random)."""
    series: dict[str, list[tuple[int, str]]] = {}
    for pid in set(patients):
        m = _SERIES.match(pid)
        if m and not pid.startswith("person"):
            series.setdefault(m.group(1), []).append((int(m.group(2)), pid))
    return series


def earliest_studies(patients: list[str], fraction: float) -> dict[str, bool]:
    """For each id of a numbered series among ``patients`` (:func:`numbered_series`), whether
    it is among the lowest-numbered ``fraction`` of its series' studies."""
    held: dict[str, bool] = {}
    for studies in numbered_series(patients).values():
        studies.sort()
        cut = round(len(studies) * fraction)
        held.update((pid, i < cut) for i, (_, pid) in enumerate(studies))
    return held


def whole_series(patients: list[str], series: str) -> dict[str, bool]:
    """For each id of a numbered series among ``patients`` (:func:`numbered_series`), whether
    it is in the series ``series`` (``"NORMAL2-IM-"``: every ``NORMAL2-IM-NNNN`` study)."""
    return {pid: name == series for name, studies in numbered_series(patients).items() for _, pid in studies}


def build(root: Path, out: Path, fraction: float = 0.1, seed: int = 0, order: str = "random",
          series: str | None = None) -> dict[str, int]:
    from xrayfed.common.data.dataset import kermany_patient_id, stable_fraction

    if (order == "series") != (series is not None):
        raise ValueError("--series names the held-out series with --order series, and only then")
    root, out = root.resolve(), out.resolve()
    counts: dict[str, int] = {}
    for split in ("train", "test"):
        for cls_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            files = sorted(f for f in cls_dir.iterdir() if f.is_file())
            pids = [kermany_patient_id(f.name) for f in files]
            by_order: dict[str, bool] = {}
            if split == "train" and order == "earliest":
                by_order = earliest_studies(pids, fraction)
            elif split == "train" and order == "series":
                by_order = whole_series(pids, series)
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
    ap.add_argument("--order", choices=("random", "earliest", "series"), default="random",
                    help="random: val by patient at random; earliest: numbered series by study order; "
                         "series: the whole series named by --series")
    ap.add_argument("--series", default=None, help="with --order series: the held-out series (e.g. NORMAL2-IM-)")
    a = ap.parse_args()
    try:
        print(build(a.root, a.out, a.fraction, a.seed, a.order, a.series))
    except ValueError as e:
        ap.error(f"--order {a.order} --series {a.series}: {e}")


if __name__ == "__main__":
    main()
