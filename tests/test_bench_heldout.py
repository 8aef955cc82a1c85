"""bench/heldout.py: the validation split no hospital trains on (random by patient, or by study
order for numbered series), with no patient on both sides."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from xrayfed.common.data.dataset import kermany_patient_id, stable_fraction

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def heldout():
    spec = importlib.util.spec_from_file_location("bench_heldout", ROOT / "bench" / "heldout.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _layout(root: Path) -> None:
    names = {
        "train/NORMAL": [f"IM-{i:04d}-0001.jpeg" for i in range(100, 120)]
        + ["IM-0100-0001-0002.jpeg"]  # a further image of study IM-0100
        + [f"NORMAL2-IM-{i:04d}-0001.jpeg" for i in range(400, 410)]
        + [f"scan_{c}.jpeg" for c in "abcdefghij"],  # no study number: held out at random
        "train/PNEUMONIA": [f"person{i}_bacteria_{j}.jpeg" for i in range(1, 41) for j in (1, 2)],
        "test/NORMAL": ["IM-0001-0001.jpeg"], "test/PNEUMONIA": ["person1_virus_1.jpeg"],
    }
    for folder, files in names.items():
        (root / folder).mkdir(parents=True)
        for f in files:
            (root / folder / f).write_bytes(b"x")


def _patients(out: Path, split: str) -> set[str]:
    return {kermany_patient_id(p.name) for p in (out / split).rglob("*.jpeg")}


@pytest.mark.parametrize("order", ["random", "earliest"])
def test_heldout_keeps_each_patient_on_one_side(tmp_path, heldout, order):
    _layout(tmp_path / "src")
    counts = heldout.build(tmp_path / "src", tmp_path / "out", fraction=0.2, order=order)
    out = tmp_path / "out"
    assert counts["test"] == 2 and sum(counts.values()) == 41 + 80 + 2
    assert not _patients(out, "train") & _patients(out, "val")
    assert _patients(out, "val") and all(p.is_symlink() for p in out.rglob("*.jpeg"))


def test_earliest_holds_out_the_first_studies_of_each_series(tmp_path, heldout):
    _layout(tmp_path / "src")
    heldout.build(tmp_path / "src", tmp_path / "out", fraction=0.2, order="earliest")
    val_normals = sorted(p.name for p in (tmp_path / "out" / "val" / "NORMAL").iterdir()
                         if not p.name.startswith("scan_"))
    # 20 % of each numbered series: IM-0100..0103 (with IM-0100's second image) and NORMAL2-IM-0400..0401
    assert val_normals == sorted(["IM-0100-0001.jpeg", "IM-0100-0001-0002.jpeg", "IM-0101-0001.jpeg",
                                  "IM-0102-0001.jpeg", "IM-0103-0001.jpeg",
                                  "NORMAL2-IM-0400-0001.jpeg", "NORMAL2-IM-0401-0001.jpeg"])
    # unnumbered ids beside a numbered series are still held out at random, as with --order random
    scans = {f"scan_{c}" for c in "abcdefghij"}
    assert _patients(tmp_path / "out", "val") & scans == {p for p in scans if stable_fraction(p, 0) < 0.2}
    # person ids carry no study order: held out at random by patient, about the fraction asked
    val_persons = _patients(tmp_path / "out", "val") & {f"person{i}" for i in range(1, 41)}
    assert 2 <= len(val_persons) <= 16


def test_series_holds_out_one_whole_series_and_trains_on_the_others(tmp_path, heldout):
    _layout(tmp_path / "src")
    heldout.build(tmp_path / "src", tmp_path / "out", fraction=0.2, order="series", series="NORMAL2-IM-")
    out = tmp_path / "out"
    val = {p.name for p in (out / "val" / "NORMAL").iterdir() if not p.name.startswith("scan_")}
    train = {p.name for p in (out / "train" / "NORMAL").iterdir() if not p.name.startswith("scan_")}
    assert val == {f"NORMAL2-IM-{i:04d}-0001.jpeg" for i in range(400, 410)}  # all of it, nothing else
    assert len(train) == 21 and all(n.startswith("IM-") for n in train)  # the other series, further image included
    assert not _patients(out, "train") & _patients(out, "val")
    val_persons = _patients(out, "val") & {f"person{i}" for i in range(1, 41)}
    assert 2 <= len(val_persons) <= 16  # pneumonia patients: held out at random, as before
    with pytest.raises(ValueError):
        heldout.build(tmp_path / "src", tmp_path / "out2", order="random", series="IM-")
