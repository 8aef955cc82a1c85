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
    train = D.load_dataset(root, split="train", image_size=16, test_fraction=0.2)
    test = D.load_dataset(root, split="test", image_size=16, test_fraction=0.2)
    assert train.task.kind == "binary" and train.task.class_names == ("NORMAL", "PNEUMONIA")
    assert len(train) + len(test) == 2 * 30 * 3  # every readable scan once (the broken one skipped)
    assert set(train.patient_ids).isdisjoint(test.patient_ids)  # patient-wise
    assert 0.1 < len(test) / (len(train) + len(test)) < 0.35
    again = D.load_dataset(root, split="test", image_size=16, test_fraction=0.2)
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


def test_the_verdict_agrees_with_the_counts_when_a_test_split_has_no_usable_scan(tmp_path, capsys):
    """Six usable training scans and one skipped file train, whatever an empty or unreadable test
    folder holds: that split is a warning naming it, not a "no usable scans" refusal."""
    root = tmp_path / "cf"
    for i in range(6):
        cls = "NORMAL" if i % 2 else "PNEUMONIA"
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((24, 24), 30 + 20 * i, np.uint8)).save(root / "train" / cls / f"s{i}.png")
    (root / "train" / "NORMAL" / "broken.png").write_bytes(b"not a png")
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / "test" / cls).mkdir(parents=True)
    assert cli.main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "train: 6 usable scans" in out and "1 file(s) skipped:" in out and "broken.png" in out
    assert "WARNING: the test split has no usable scans (it holds no scans)" in out
    assert "CANNOT TRAIN" not in out and "ready to join a federation" in out
    (root / "test" / "NORMAL" / "x.png").write_bytes(b"not a png either")
    assert cli.main(["data", "check", str(root)]) == 0
    assert "the test split has no usable scans (none of its 1 file(s) could be read)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- a hospital's split, stated
def test_flat_class_folders_train_on_every_scan_unless_a_local_test_split_is_asked_for(tmp_path, capsys):
    from xrayfed.client.hospital import hospital_split
    from xrayfed.common.config import HospitalConfig, load_config

    root = _flat(tmp_path / "flat")  # 180 readable scans of 60 patients
    assert len(D.load_dataset(root, split="train", image_size=16)) == 180  # nothing held out by default
    with pytest.raises(UserError, match="local_test_fraction"):
        D.load_dataset(root, split="test", image_size=16)
    cfg = tmp_path / "hospital.toml"
    cfg.write_text(f'[data]\npath = "{root}"\n')
    _, train, val = hospital_split(load_config(HospitalConfig, cfg))
    assert len(train) + len(val) == 180  # what `xrayfed client` trains and validates on: every scan
    assert cli.main(["data", "check", str(root), "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert (f"scans this hospital uses: {len(train)} for training, {len(val)} for validation (val_fraction = 0.1), "
            "none held out as a local test split (local_test_fraction = 0: the federation's test set is the "
            f"server's); set in {cfg} [data]") in out
    assert "  test:" not in out
    # a local test split is a stated choice: the config asks for it and data check shows it
    cfg.write_text(f'[data]\npath = "{root}"\nlocal_test_fraction = 0.2\n')
    assert cli.main(["data", "check", str(root), "--config", str(cfg), "--json"]) == 0
    split = json.loads(capsys.readouterr().out)["split"]
    assert split["train"] + split["validation"] + split["local_test"] == 180
    assert 0.1 < split["local_test"] / 180 < 0.35 and split["local_test_fraction"] == 0.2
    assert cli.main(["data", "check", str(root)]) == 0  # no --config: the defaults, and where to change them
    assert "set in the defaults of hospital.toml [data] (no --config)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- NIH: one rule, counts over scans
NIH_COLUMNS = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
               "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", ""]


def _nih_release(root: Path) -> Path:
    """The NIH ChestX-ray14 layout as released: ``Data_Entry_2017.csv`` (its 12 columns, the last
    one unnamed) and ``images/``: 10 patients × 2 scans, every finding but Hernia, 4 scans with
    no finding."""
    import csv

    labels = ["No Finding", "Effusion|Mass", "Pneumonia", "Atelectasis|Cardiomegaly", "Infiltration|Nodule",
              "Pneumothorax|Consolidation", "Edema|Emphysema", "Fibrosis|Pleural_Thickening", "No Finding", "Effusion"]
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    with (root / "Data_Entry_2017.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(NIH_COLUMNS)
        for k in range(20):
            pid, j = 1 + k // 2, k % 2
            name = f"{pid:08d}_{j:03d}.png"
            Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / "images" / name)
            w.writerow([name, labels[k % 10], j, pid, 58, "F", "PA", 1024, 1024, 0.143, 0.143, ""])
    return root


def test_nih_data_check_and_demo_apply_one_rule_and_count_scans(tmp_path, capsys):
    import argparse

    from xrayfed.server.demo import probe_local_data

    root = _nih_release(tmp_path / "nih")
    assert cli.main(["data", "check", str(root)]) == 0  # no Hernia scan: it can train, and says so
    out = capsys.readouterr().out
    assert "WARNING: train has no scans with ['Hernia']" in out and "data.labels" in out
    assert "CANNOT TRAIN" not in out and "ready to join a federation" in out
    assert "Effusion                   4 scans (20.0 %), 4 patients" in out  # of 20 scans, not of 28 labels
    assert "Mass                       2 scans (10.0 %), 2 patients" in out
    assert "No Finding                 4 scans (20.0 %), 4 patients" in out
    probe = probe_local_data(argparse.Namespace(privacy_unit=None), root)  # what `demo` and `simulate` check
    said = capsys.readouterr().out  # (the demo holds out a test split: this NIH copy has none of its own)
    assert probe.task.kind == "multilabel" and "[demo] WARNING: data" in said and "'Hernia']" in said
    # the labels a hospital trains are its choice, and data check counts those
    cfg = tmp_path / "hospital.toml"
    cfg.write_text('[data]\nlabels = ["Effusion", "Pneumonia"]\n')
    assert cli.main(["data", "check", str(root), "--config", str(cfg), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["data"]["class_names"] == ["Effusion", "Pneumonia"] and not doc["data"]["warnings"]
    rows = {c["name"]: c["images"] for c in doc["data"]["splits"][0]["classes"]}
    # 14 scans carry neither label, only 4 of them no finding at all: not called "No Finding"
    assert rows == {"Effusion": 4, "Pneumonia": 2, "none of data.labels": 14}
    # an unknown label: one line naming the allowed ones, before anything is read
    cfg.write_text('[data]\nlabels = ["Efusion"]\n')
    assert cli.main(["data", "check", str(root), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.labels ['Efusion'] not found; allowed: ['Atelectasis'" in err[0], err


def test_a_hospital_refuses_a_federation_that_trains_other_labels_than_its_own(tmp_path):
    from xrayfed.client.hospital import load_local_data
    from xrayfed.common.config import HospitalConfig
    from xrayfed.common.prediction import NIH_LABELS, TaskSpec

    root = _nih_release(tmp_path / "nih")
    cfg = HospitalConfig.model_validate({"data": {"path": str(root), "labels": ["Effusion", "Pneumonia"]}})
    data = load_local_data(cfg, 16, TaskSpec(kind="multilabel", class_names=("Pneumonia", "Effusion")))
    assert data.train.task.class_names == ("Pneumonia", "Effusion")  # the federation's order
    with pytest.raises(UserError, match=r"data.labels \['Effusion', 'Pneumonia'\]: the federation trains"):
        load_local_data(cfg, 16, TaskSpec(kind="multilabel", class_names=NIH_LABELS))


def test_demo_on_flat_folders_states_the_held_out_share_on_both_sides(tmp_path, capsys):
    """`demo` on data with no test split of its own holds out a share of its patients for the
    server's test set, and says so in the server's and in every hospital's config: no hospital
    trains on a test patient, and together they cover every scan."""
    import argparse

    from xrayfed.client.hospital import hospital_split
    from xrayfed.common.config import FederationConfig, HospitalConfig, load_config
    from xrayfed.server.demo import DEMO_TEST_FRACTION, probe_local_data, write_demo_configs

    root = _flat(tmp_path / "flat", broken=False)  # 180 scans of 60 patients
    args = argparse.Namespace(privacy_unit=None, rounds=1, hospitals=2, lr=None, width=None, split="iid", alpha=0.5,
                              epsilon=8.0, delta=1e-5, local_epochs=None, batch_size=None)
    probe = probe_local_data(args, root)
    assert "20% of its patients are held out as the federation's test set" in capsys.readouterr().out
    (tmp_path / "out").mkdir()
    fed_path, hospitals = write_demo_configs(tmp_path / "out", root, args, 16, probe.task, 9)
    fed = load_config(FederationConfig, fed_path)
    assert fed.eval.test_fraction == DEMO_TEST_FRACTION
    test = D.load_dataset(root, split="test", image_size=16, test_fraction=fed.eval.test_fraction)
    trained = []
    for h in hospitals:
        cfg = load_config(HospitalConfig, h)
        assert cfg.data.local_test_fraction == DEMO_TEST_FRACTION
        _, train, val = hospital_split(cfg)
        trained += train.patient_ids + (val.patient_ids if val is not None else [])
    assert not set(trained) & set(test.patient_ids)
    assert len(trained) + len(test) == 180 == len(probe) + len(test)


def test_the_plan_of_a_small_hospital_counts_its_privacy_units_and_prints_no_stray_warning(tmp_path, capfd):
    """Few patients with several scans each: every step uses every patient (q = 1); the warning
    counts patients as the plan does, and Opacus's log(0) at q = 1 prints no RuntimeWarning."""
    root = _flat(tmp_path / "flat", patients=3, per_patient=3, broken=False)
    cfg = tmp_path / "h.toml"
    cfg.write_text('[hospital]\nname = "h1"\n[data]\nval_fraction = 0\n')
    assert cli.main(["data", "check", str(root), "--config", str(cfg)]) == 0
    out = capfd.readouterr()
    warn = [ln for ln in out.out.splitlines() if "WARNING: batch size" in ln]
    assert len(warn) == 1 and "N = 6 patients" in warn[0], out.out  # 3 NORMAL + 3 PNEUMONIA patients
    assert "RuntimeWarning" not in out.err, out.err
