"""The flat ROOT/CLASS/* layout and `xrayfed data check` (multi-class data support)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xrayfed.common import cli
from xrayfed.common import data as D
from xrayfed.common.errors import UserError


def _flat(root: Path, patients: int = 30, per_patient: int = 3, broken: bool = True) -> Path:
    """Kermany-style names: NORMAL/IM-PPPP-000k.jpeg, PNEUMONIA/personP_bacteria_k.jpeg."""
    rng = np.random.default_rng(0)
    for p in range(patients):
        for k in range(per_patient):
            for cls, name in (("NORMAL", f"IM-{p:04d}-{k:04d}.jpeg"), ("PNEUMONIA", f"person{p}_bacteria_{k}.jpeg")):
                (root / cls).mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(root / cls / name)
    if broken:
        (root / "PNEUMONIA" / "person999_virus_0.jpeg").write_bytes(b"not a jpeg")
    return root


def test_flat_class_folders_are_split_by_patient_reproducibly(tmp_path):
    root = _flat(tmp_path / "flat")
    assert D.detect_format(root) == "flat-class-folders"
    train = D.load_dataset(root, split="train", image_size=16)
    test = D.load_dataset(root, split="test", image_size=16)
    assert train.task.kind == "binary" and train.task.class_names == ("NORMAL", "PNEUMONIA")
    assert len(train) + len(test) == 2 * 30 * 3  # every readable scan once (the broken one skipped)
    assert set(train.patient_ids).isdisjoint(test.patient_ids)  # patient-wise
    assert 0.1 < len(test) / (len(train) + len(test)) < 0.35
    again = D.load_dataset(root, split="test", image_size=16)
    assert list(again.files) == list(test.files)  # reproducible
    with pytest.raises(UserError, match="val_fraction"):
        D.load_dataset(root, split="val", image_size=16)


def test_data_check_reports_and_plans(tmp_path, capsys):
    root = _flat(tmp_path / "flat")
    cfg = tmp_path / "hospital.toml"
    cfg.write_text('[hospital]\nname = "st-mary"\n[privacy]\nepsilon = 8.0\nmax_rounds = 4\n[training]\n'
                   'batch_size = 16\n')
    assert cli.main(["data", "check", str(root), "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "flat-class-folders layout, binary task" in out and "48×40" in out and "bit depth 8" in out
    assert "person999_virus_0.jpeg" in out and "ready to join a federation" in out
    assert "σ = " in out and "ε after round: 1:" in out and "4:" in out
    assert cli.main(["data", "check", str(root), "--config", str(cfg), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    train = next(s for s in doc["data"]["splits"] if s["split"] == "train")
    assert sum(c["images"] for c in train["classes"]) == train["images"]
    assert [Path(f).name for f, _ in train["unreadable"]] == ["person999_virus_0.jpeg"]  # its patient is in train
    total_unreadable = sum(len(s["unreadable"]) for s in doc["data"]["splits"])
    assert total_unreadable == 1
    eps = list(doc["plan"]["epsilon_after_round"].values())
    assert eps == sorted(eps) and eps[-1] <= 8.0  # ε grows to the budget, never past it
    # a budget the data cannot carry: refused, exit status 1
    bad = tmp_path / "bad.toml"
    bad.write_text("[privacy]\ndelta = 0.5\n")
    assert cli.main(["data", "check", str(root), "--config", str(bad)]) == 1
    assert "REFUSED: privacy.delta = 0.5" in capsys.readouterr().out


def test_data_check_says_when_data_cannot_train(tmp_path, capsys):
    root = tmp_path / "cf"
    for i in range(4):
        (root / "train" / "NORMAL").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((24, 24), 30 + i, np.uint8)).save(root / "train" / "NORMAL" / f"n{i}.png")
    (root / "train" / "PNEUMONIA").mkdir(parents=True)
    assert cli.main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "CANNOT TRAIN" in out and "PNEUMONIA" in out and "not ready" in out
