"""Data loading and the one preprocessing path (training and inference share it)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xrayfed.common import data as D
from xrayfed.common import preprocess as P
from xrayfed.common.errors import UserError
from xrayfed.common.synthetic import make_synthetic, write_class_folders, write_npz
from xrayfed.common.prediction import NIH_LABELS, TaskSpec

from dicom_files import write_dicom as _write_dicom

REAL_NPZ = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pneumoniamnist.npz"  # ../shared/data


# ----------------------------------------------------------------------------- helpers
def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _ramp(h: int = 32, w: int = 40, hi: int = 4000) -> np.ndarray:
    return (np.linspace(0, hi, h * w).reshape(h, w)).astype(np.uint16)


def _one_line_error(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n.lower() in msg.lower(), (n, msg)
    return msg


# ----------------------------------------------------------------------------- preprocessing
def test_normalize_values_and_shapes():
    u8 = np.array([[0, 255], [128, 64]], dtype=np.uint8)
    u8 = np.kron(u8, np.ones((4, 4), dtype=np.uint8))  # 8×8
    x = P.normalize(u8)
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert x[0, 0, 0] == -1.0 and x[0, 0, 7] == 1.0
    assert abs(float(x[0, 4, 0]) - (128 / 255 - 0.5) / 0.5) < 1e-6
    batch = P.normalize(np.stack([u8, u8, u8]))
    assert batch.shape == (3, 1, 8, 8) and torch.equal(batch[1], x)
    assert torch.equal(P.normalize(torch.from_numpy(u8)), x)
    with pytest.raises(TypeError):
        P.normalize(x)  # already normalised: refused, never normalised twice
    # the numpy twin (a patient's process has no torch) gives the same values, bit for bit
    every = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(P.normalize_array(every), P.normalize(every).numpy())
    assert P.normalize_array(np.stack([u8, u8])).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("size", [8, 13, 28, 64])
def test_to_uint8_any_size(size):
    img = np.random.default_rng(0).random((50, 37)).astype(np.float32)
    out = P.to_uint8(img, size)
    assert out.shape == (size, size) and out.dtype == np.uint8
    # a uint8 input and the same pixels as [0, 1] floats give the same result
    q = np.rint(img * 255).astype(np.uint8)
    assert np.array_equal(P.to_uint8(q, size), P.to_uint8(q.astype(np.float32) / 255, size))


def test_to_uint8_rejects_tiny_size_and_antialiases():
    with pytest.raises(UserError):
        P.to_uint8(np.zeros((20, 20), np.float32), 7)
    checker = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)  # 1-px checkerboard
    small = P.to_uint8(checker, 16)
    assert abs(float(small.mean()) - 127.5) < 3 and small.std() < 3  # averaged, not aliased


def test_prepare_scan_png_equals_pipeline_and_dataset(tmp_path):
    imgs, _ = make_synthetic(4, 48, seed=1)
    root = tmp_path / "cf"
    for i, img in enumerate(imgs):
        _png(root / "train" / ("NORMAL" if i % 2 else "PNEUMONIA") / f"person{i}_bacteria_{i}.png", img)
    ds = D.load_dataset(root, "train", image_size=32)
    f = Path(ds.files[0])
    x = P.prepare_scan(f, 32)
    assert x.shape == (1, 1, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x[0], P.normalize(P.to_uint8(P.load_image(f), 32)))
    assert torch.equal(x[0], ds[0][0])
    for i in range(len(ds)):
        assert torch.equal(ds[i][0], P.prepare_scan(ds.files[i], 32)[0])


def test_prepare_scan_large_jpeg_matches_dataset(tmp_path):
    """JPEGs may be decoded at reduced scale: the dataset and inference use the same hint."""
    rng = np.random.default_rng(0)
    base = make_synthetic(1, 64, seed=2)[0][0]
    rgb = np.asarray(Image.fromarray(base).resize((300, 260), Image.Resampling.BILINEAR).convert("RGB"))
    rgb = np.clip(rgb.astype(int) + rng.integers(-3, 4, rgb.shape), 0, 255).astype(np.uint8)
    root = tmp_path / "cf"
    p = root / "test" / "PNEUMONIA" / "person1_virus_1.jpeg"
    p.parent.mkdir(parents=True)
    Image.fromarray(rgb).save(p, quality=95)
    _png(root / "test" / "NORMAL" / "IM-0001-0001.png", base)
    ds = D.load_dataset(root, "test", image_size=32)
    j = ds.files.index(str(p))
    assert torch.equal(ds[j][0], P.prepare_scan(p, 32)[0])
    full = P.normalize(P.to_uint8(P.load_image(p), 32))
    assert (ds[j][0] - full).abs().max() <= 6 / 127.5  # reduced-scale decode ≈ full decode


def test_grayscale_and_16bit_png(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    p = _png(tmp_path / "rgb.png", rgb)
    expect = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255
    assert np.array_equal(P.load_image(p), expect)
    a16 = (np.arange(20 * 24).reshape(20, 24) * 7 + 100).astype(np.uint16)
    p16 = _png(tmp_path / "x16.png", a16)
    img = P.load_image(p16)
    assert img.dtype == np.float32 and img.shape == (20, 24)
    assert img.min() == 0.0 and img.max() == 1.0  # min–max stretched
    assert np.allclose(img, (a16 - 100) / (a16.max() - 100.0), atol=1e-6)


def test_unreadable_files_give_one_line_user_error(tmp_path):
    txt = tmp_path / "notes.png"
    txt.write_text("this is not an image\n" * 20)
    with pytest.raises(UserError) as e:
        P.load_image(txt)
    _one_line_error(e, "notes.png", "PNG, JPEG or DICOM")

    good = _png(tmp_path / "good.png", make_synthetic(1, 64, seed=0)[0][0])
    blob = good.read_bytes()
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError) as e:
        P.load_image(trunc)
    _one_line_error(e, "trunc.png")

    jpg = tmp_path / "full.jpg"
    Image.fromarray(make_synthetic(1, 64, seed=0)[0][0]).save(jpg)
    tj = tmp_path / "trunc.jpg"
    tj.write_bytes(jpg.read_bytes()[:300])
    with pytest.raises(UserError) as e:
        P.prepare_scan(tj, 32)
    _one_line_error(e, "trunc.jpg")

    gif = tmp_path / "scan.gif"
    Image.fromarray(make_synthetic(1, 32, seed=0)[0][0]).save(gif)
    with pytest.raises(UserError) as e:
        P.load_image(gif)
    _one_line_error(e, "scan.gif", "GIF", "PNG, JPEG or DICOM")

    tiny = _png(tmp_path / "tiny.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(UserError) as e:
        P.load_image(tiny)
    _one_line_error(e, "tiny.png", "8×8")

    with pytest.raises(UserError) as e:
        P.load_image(tmp_path / "nope.png")
    _one_line_error(e, "no file")

    bad_dcm = tmp_path / "bad.dcm"
    bad_dcm.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    with pytest.raises(UserError) as e:
        P.load_image(bad_dcm)
    _one_line_error(e, "bad.dcm")


# ----------------------------------------------------------------------------- DICOM
def test_dicom_monochrome1_is_inverted(tmp_path):
    px = _ramp()
    m2 = P.load_image(_write_dicom(tmp_path / "m2.dcm", px, photometric="MONOCHROME2"))
    m1 = P.load_image(_write_dicom(tmp_path / "m1.dcm", px, photometric="MONOCHROME1"))
    assert m2.shape == (32, 40) and m2.dtype == np.float32
    assert m2[0, 0] == 0.0 and m2[-1, -1] == 1.0
    assert np.allclose(m1, 1.0 - m2, atol=1e-6)


def test_dicom_voi_window_and_rescale(tmp_path):
    px = np.zeros((16, 16), np.uint16)
    px[:, 0:4], px[:, 4:8], px[:, 8:12], px[:, 12:16] = 500, 1000, 3000, 4000
    plain = P.load_image(_write_dicom(tmp_path / "plain.dcm", px))
    assert plain[0, 10] < plain[0, 14]  # no window: 3000 darker than 4000
    win = P.load_image(_write_dicom(tmp_path / "win.dcm", px, window=(1000, 500)))
    assert win[0, 0] == 0.0 and win[0, 10] == 1.0 and win[0, 14] == 1.0  # saturated above 1250
    assert abs(win[0, 5] - 0.5) < 0.01
    # the window is in rescaled (modality) units: stored × 2 − 1000
    resc = P.load_image(_write_dicom(tmp_path / "resc.dcm", px, window=(1000, 1000), slope=2.0, intercept=-1000.0))
    # stored 500 → 0, 1000 → 1000 (centre), 3000/4000 → saturated
    assert resc[0, 0] == 0.0 and abs(resc[0, 5] - 0.5) < 0.01 and resc[0, 10] == 1.0


def test_dicom_detected_by_content_and_patient_id(tmp_path):
    px = _ramp()
    f = _write_dicom(tmp_path / "scan_without_extension", px, patient_id="  PAT-0042 ")
    assert P.is_dicom(f)
    ref = P.load_image(_write_dicom(tmp_path / "ref.dcm", px))
    assert np.array_equal(P.load_image(f), ref)
    assert P.read_dicom_patient_id(f) == "PAT-0042"
    assert P.read_dicom_patient_id(_write_dicom(tmp_path / "anon.dcm", px, patient_id=None)) is None
    assert P.read_dicom_patient_id(_png(tmp_path / "x.png", np.zeros((9, 9), np.uint8))) is None
    assert P.prepare_scan(f, 16).shape == (1, 1, 16, 16)


def test_dicom_multiframe_refused(tmp_path):
    f = _write_dicom(tmp_path / "cine.dcm", np.stack([_ramp(), _ramp()]), frames=2)
    with pytest.raises(UserError) as e:
        P.load_image(f)
    _one_line_error(e, "cine.dcm", "multi-frame")


def test_dicom_class_folders_and_labels_csv(tmp_path):
    root = tmp_path / "dcm"
    for i in range(6):
        cls = "PNEUMONIA" if i % 2 else "NORMAL"
        _write_dicom(root / "train" / cls / f"s{i}.dcm", _ramp(hi=1000 + 500 * i), patient_id=f"P{i // 2}")
    ds = D.load_dataset(root, "train", image_size=16)
    assert ds.task.kind == "binary" and len(ds) == 6
    assert sorted(set(ds.patient_ids)) == ["P0", "P1", "P2"]

    flat = tmp_path / "flat"
    rows = []
    for i in range(5):
        _write_dicom(flat / f"img{i}.dcm", _ramp(hi=2000 + i), patient_id=f"Q{i}")
        rows.append({"file": f"img{i}.dcm", "label": ["healthy", "covid", "viral"][i % 3]})
    rows.append({"file": "missing.dcm", "label": "healthy"})
    with (flat / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "label"])
        w.writeheader()
        w.writerows(rows)
    ds = D.load_dataset(flat, "train", image_size=16)
    assert ds.task == TaskSpec(kind="multiclass", class_names=("covid", "healthy", "viral"))
    assert len(ds) == 5 and len(ds.skipped) == 1 and ds.skipped[0][0] == "missing.dcm"
    assert D.targets_array(ds).tolist() == [1, 0, 2, 1, 0]
    assert ds.patient_ids == [f"Q{i}" for i in range(5)]
    with pytest.raises(UserError) as e:
        D.load_dataset(flat, "test", image_size=16)
    _one_line_error(e, "split")


# ----------------------------------------------------------------------------- class folders
def test_class_folders_binary_with_jpeg_and_corrupt_file(tmp_path, caplog):
    root = write_class_folders(tmp_path / "kermany", n_train=24, n_test=8, size=40, seed=0)
    jpg = root / "train" / "PNEUMONIA" / "person900_virus_1700.jpeg"
    Image.fromarray(make_synthetic(1, 50, seed=9)[0][0]).convert("RGB").save(jpg)
    (root / "train" / "PNEUMONIA" / "person901_bacteria_3.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (root / "train" / "NORMAL" / ".DS_Store").write_bytes(b"junk")  # hidden: ignored
    with caplog.at_level(logging.WARNING, logger="xrayfed.common.data"):
        ds = D.load_dataset(root, "train", image_size=32)
    assert ds.task == TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA"))
    assert len(ds) == 25 and ds.images.shape == (25, 32, 32) and ds.images.dtype == np.uint8
    assert [Path(p).name for p, _ in ds.skipped] == ["person901_bacteria_3.jpeg"]
    assert any("person901_bacteria_3.jpeg" in r.getMessage() for r in caplog.records)
    for f, y in zip(ds.files, D.targets_array(ds)):
        assert y == (Path(f).parent.name == "PNEUMONIA")
    assert ds.patient_ids[ds.files.index(str(jpg))] == "person900"
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert y.dtype == torch.float32
    test = D.load_dataset(root, "test", image_size=32, task=ds.task)
    assert len(test) == 8 and not set(test.patient_ids) & set(ds.patient_ids)


def test_class_folders_names(tmp_path):
    for name in ("normal", "Pneumonia"):
        _png(tmp_path / "a" / "train" / name / "IM-0001-0001.png", np.full((9, 9), 10, np.uint8))
    assert D.load_dataset(tmp_path / "a", image_size=8).task.class_names == ("NORMAL", "PNEUMONIA")
    for i, name in enumerate(("viral", "COVID-19", "healthy", "bacterial")):
        _png(tmp_path / "b" / "train" / name / f"person{i}_{i}.png", np.full((9, 9), 10 * i, np.uint8))
    ds = D.load_dataset(tmp_path / "b", image_size=8)
    assert ds.task == TaskSpec(kind="multiclass", class_names=("COVID-19", "bacterial", "healthy", "viral"))
    assert ds.targets.dtype == torch.int64
    sub = D.load_dataset(tmp_path / "b", image_size=8, label_set=["healthy", "COVID-19"])
    assert sub.task.class_names == ("COVID-19", "healthy") and len(sub) == 2
    with pytest.raises(UserError) as e:
        D.load_dataset(tmp_path / "b", image_size=8, task=TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")))
    _one_line_error(e, "differ")


@pytest.mark.parametrize("name,pid", [
    ("person12_bacteria_3.jpeg", "person12"), ("person1_virus_6.jpeg", "person1"),
    ("IM-0115-0001.jpeg", "IM-0115"), ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
    # a study's further images belong to the same patient (they sit beside IM-0429-0001.jpeg):
    ("IM-0429-0001-0002.jpeg", "IM-0429"), ("NORMAL2-IM-0381-0001-0001.jpeg", "NORMAL2-IM-0381"),
    ("scan-3.png", "scan"), ("scan.png", "scan"),
])
def test_kermany_patient_ids(name, pid):
    assert D.kermany_patient_id(name) == pid


def test_layout_errors(tmp_path):
    write_class_folders(tmp_path / "cf", n_train=4, n_test=2, size=16)
    with pytest.raises(UserError) as e:
        D.load_dataset(tmp_path / "cf", "val", image_size=16)
    _one_line_error(e, "val_fraction")
    with pytest.raises(UserError) as e:
        D.load_dataset(tmp_path / "missing", image_size=16)
    _one_line_error(e, "no such file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        D.load_dataset(tmp_path / "empty", image_size=16)
    _one_line_error(e, "unknown layout")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError):
        D.load_dataset(tmp_path / "x.csv", image_size=16)


def test_no_usable_images(tmp_path, caplog):
    for name in ("NORMAL", "PNEUMONIA"):
        d = tmp_path / "bad" / "train" / name
        d.mkdir(parents=True)
        (d / "a.png").write_bytes(b"not a png")
        (d / "b.dcm").write_bytes(b"not a dicom")
    with caplog.at_level(logging.WARNING), pytest.raises(UserError) as e:
        D.load_dataset(tmp_path / "bad", image_size=16)
    _one_line_error(e, "no usable scans", "4 file(s) skipped")


# ----------------------------------------------------------------------------- NIH
def _nih(root: Path, *, lists: bool) -> list[dict]:
    """15 patients × 1–4 scans; patient 14's second scan has no image file."""
    rng = np.random.default_rng(0)
    labels_cycle = ["No Finding", "Effusion|Mass", "Pneumonia", "Atelectasis|Cardiomegaly|Hernia", "No Finding"]
    rows = []
    k = 0
    for pid in range(1, 16):
        for j in range(1 + pid % 4):
            name = f"{pid:08d}_{j:03d}.png"
            rows.append({"Image Index": name, "Finding Labels": labels_cycle[k % 5], "Follow-up #": j,
                         "Patient ID": pid, "Patient Age": 50, "Patient Gender": "M", "View Position": "PA"})
            sub = root / ("images_001/images" if k % 2 else "images")
            if not (pid == 14 and j == 1):
                _png(sub / name, rng.integers(0, 256, (24, 24), dtype=np.uint8))
            k += 1
    with (root / "Data_Entry_2017.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if lists:
        names = [r["Image Index"] for r in rows]
        (root / "train_val_list.txt").write_text("\n".join(n for n in names if int(n[:8]) <= 10) + "\n")
        (root / "test_list.txt").write_text("\n".join(n for n in names if int(n[:8]) > 10) + "\n")
    return rows


def test_nih_patient_wise_split_and_labels(tmp_path, caplog):
    root = tmp_path / "nih"
    rows = _nih(root, lists=False)
    with caplog.at_level(logging.WARNING):
        tr = D.load_dataset(root, "train", image_size=16, test_fraction=0.2)
        te = D.load_dataset(root, "test", image_size=16, test_fraction=0.2)
    assert tr.task == TaskSpec(kind="multilabel", class_names=NIH_LABELS)
    assert len(tr) > 0 and len(te) > 0
    assert not set(tr.patient_ids) & set(te.patient_ids)  # no patient in both splits
    assert len(tr) + len(te) == len(rows) - 1 and len(tr.skipped) + len(te.skipped) == 1
    assert ("00000014_001.png", "image file missing") in tr.skipped + te.skipped
    by_file = {Path(f).name: t for ds in (tr, te) for f, t in zip(ds.files, D.targets_array(ds))}
    for r in rows:
        if r["Image Index"] not in by_file:
            continue
        t = by_file[r["Image Index"]]
        assert t.shape == (14,)
        want = set() if r["Finding Labels"] == "No Finding" else set(r["Finding Labels"].split("|"))
        assert {NIH_LABELS[i] for i in np.flatnonzero(t)} == want
    pair = by_file[next(r["Image Index"] for r in rows if r["Finding Labels"] == "Effusion|Mass")]
    assert pair.sum() == 2 and pair[NIH_LABELS.index("Effusion")] == 1 and pair[NIH_LABELS.index("Mass")] == 1
    assert by_file["00000001_000.png"].sum() == 0  # No Finding = all zeros
    # deterministic and seed-dependent
    assert D.load_dataset(root, "train", image_size=16, test_fraction=0.2).patient_ids == tr.patient_ids
    # no local test split unless one is asked for: every scan trains
    assert len(D.load_dataset(root, "train", image_size=16)) == len(tr) + len(te)
    with pytest.raises(UserError) as e:
        D.load_dataset(root, "test", image_size=16)
    _one_line_error(e, "local_test_fraction")
    with pytest.raises(UserError) as e:
        D.load_dataset(root, "val", image_size=16)
    _one_line_error(e, "val_fraction")


def test_nih_official_lists_and_label_set(tmp_path):
    root = tmp_path / "nih"
    _nih(root, lists=True)
    tr = D.load_dataset(root, "train", image_size=16)
    te = D.load_dataset(root, "test", image_size=16)
    assert {int(p) for p in tr.patient_ids} <= set(range(1, 11))
    assert {int(p) for p in te.patient_ids} == set(range(11, 16))
    listed = (root / "train_val_list.txt").read_text().split()
    assert sorted(Path(f).name for f in tr.files) == sorted(listed)
    two = D.load_dataset(root, "train", image_size=16, label_set=["Mass", "Effusion"])
    assert two.task.class_names == ("Mass", "Effusion") and D.targets_array(two).shape == (len(tr), 2)
    task = TaskSpec(kind="multilabel", class_names=("Pneumonia",))
    assert D.load_dataset(root, "train", image_size=16, task=task).task == task


# ----------------------------------------------------------------------------- npz
def test_npz_synthetic_roundtrip_and_resize(tmp_path):
    p = write_npz(tmp_path / "syn.npz", n_train=30, n_val=10, n_test=12, size=28, task="binary", seed=0)
    tr = D.load_dataset(p, "train", image_size=28)
    assert tr.task == TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA"))
    assert tr.images.shape == (30, 28, 28) and tr.patient_ids_known
    with np.load(p) as z:
        assert tr.patient_ids == [str(x) for x in z["train_patient_ids"]]  # several scans for some patients
        assert len(set(tr.patient_ids)) < len(tr.patient_ids)
    with np.load(p) as z:
        assert np.array_equal(tr.images, z["train_images"])
        assert np.array_equal(D.targets_array(tr), z["train_labels"][:, 0])
        big = D.load_dataset(p, "val", image_size=64)
        assert big.images.shape == (10, 64, 64)
        assert np.array_equal(big.images[3], P.to_uint8(z["val_images"][3], 64))
    ml = write_npz(tmp_path / "ml.npz", n_train=20, n_val=5, n_test=5, size=16, task="multilabel", seed=0)
    ds = D.load_dataset(ml, "test", image_size=16)
    assert ds.task.kind == "multilabel" and ds.task.class_names == NIH_LABELS and ds[0][1].shape == (14,)


def test_npz_inferred_tasks_and_rgb(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (12, 20, 20), dtype=np.uint8)
    np.savez(tmp_path / "mc.npz", train_images=imgs, train_labels=(np.arange(12) % 3).reshape(-1, 1),
             test_images=imgs[:3], test_labels=np.zeros((3, 1), np.uint8))
    ds = D.load_dataset(tmp_path / "mc.npz", "test", image_size=20)  # test has one value; file has 3
    assert ds.task == TaskSpec(kind="multiclass", class_names=("class0", "class1", "class2"))
    np.savez(tmp_path / "bin.npz", train_images=imgs, train_labels=(np.arange(12) % 2).reshape(-1, 1))
    assert D.load_dataset(tmp_path / "bin.npz", image_size=20).task.kind == "binary"
    np.savez(tmp_path / "ml.npz", train_images=imgs, train_labels=rng.integers(0, 2, (12, 5)))
    ds = D.load_dataset(tmp_path / "ml.npz", image_size=20)
    assert ds.task.kind == "multilabel" and len(ds.task.class_names) == 5
    rgb = rng.integers(0, 256, (4, 20, 20, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", train_images=rgb, train_labels=np.array([[0], [1], [0], [1]]))
    ds = D.load_dataset(tmp_path / "rgb.npz", image_size=20)
    assert np.array_equal(ds.images[2], np.asarray(Image.fromarray(rgb[2]).convert("L")))
    with pytest.raises(UserError) as e:
        D.load_dataset(tmp_path / "rgb.npz", "val", image_size=20)
    _one_line_error(e, "no split 'val'")


@pytest.mark.skipif(not REAL_NPZ.is_file(), reason="shared PneumoniaMNIST not on this machine")
def test_real_pneumoniamnist():
    counts = {"train": (4708, 3494), "val": (524, 389), "test": (624, 390)}
    for split, (n, pos) in counts.items():
        ds = D.load_dataset(REAL_NPZ, split, image_size=28)
        assert ds.task == TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA"))
        assert ds.images.shape == (n, 28, 28) and int(D.targets_array(ds).sum()) == pos


# ----------------------------------------------------------------------------- splits and partitions
def _toy(n: int = 400, patients: int = 80, seed: int = 0) -> D.XrayDataset:
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
    y = (np.arange(n) % 2).astype(np.int64)
    pids = [f"p{rng.integers(patients)}" for _ in range(n)]
    return D.XrayDataset(imgs, y, TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")), patient_ids=pids,
                         source="toy")


def _covers_once(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "patient"])
def test_partition_covers_every_index_once(scheme):
    ds = _toy()
    parts = D.partition(ds, 4, scheme, seed=1, alpha=0.3)
    assert len(parts) == 4 and all(len(p) >= 10 for p in parts)
    _covers_once(parts, len(ds))
    assert all(p.dtype == np.int64 for p in parts)
    again = D.partition(ds, 4, scheme, seed=1, alpha=0.3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))  # deterministic


def test_partition_dirichlet_is_skewed_and_iid_is_not():
    ds = _toy(n=600)
    y = D.targets_array(ds)
    iid = [y[p].mean() for p in D.partition(ds, 5, "iid", seed=0)]
    assert max(iid) - min(iid) < 0.2
    skews = []
    for seed in range(3):
        rates = [y[p].mean() for p in D.partition(ds, 5, "dirichlet", seed=seed, alpha=0.1)]
        skews.append(max(rates) - min(rates))
    assert min(skews) > 0.5, skews


def test_partition_patient_keeps_patients_together():
    ds = _toy()
    parts = D.partition(ds, 3, "patient", seed=0)
    owner = {}
    for j, p in enumerate(parts):
        for i in p:
            assert owner.setdefault(ds.patient_ids[i], j) == j
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 15  # balanced
    with pytest.raises(UserError):
        D.partition(ds, 1000, "iid")
    with pytest.raises(UserError):
        D.partition(ds, 2, "random")


def test_partition_dirichlet_small_parts_are_topped_up():
    ds = _toy(n=120)
    parts = D.partition(ds, 6, "dirichlet", seed=0, alpha=0.01)
    assert all(len(p) >= 10 for p in parts)
    _covers_once(parts, 120)


def test_split_train_val_patient_wise_and_subset():
    ds = _toy()
    tr, va = D.split_train_val(ds, 0.2, seed=0)
    assert not set(tr.patient_ids) & set(va.patient_ids)
    assert len(tr) + len(va) == len(ds) and 0.12 <= len(va) / len(ds) <= 0.28
    assert isinstance(va, D.XrayDataset) and va.task == ds.task
    assert D.split_train_val(ds, 0.0)[1] is None
    sub = D.subset(ds, [5, 1, 7])
    assert len(sub) == 3 and sub.patient_ids == [ds.patient_ids[i] for i in (5, 1, 7)]
    assert torch.equal(sub[1][0], ds[1][0]) and sub.targets[0] == ds.targets[5]
    nopid = D.XrayDataset(ds.images, D.targets_array(ds), ds.task)
    tr2, va2 = D.split_train_val(nopid, 0.25, seed=0)
    assert len(va2) == 100 and len(tr2) == 300


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_shaped():
    a, ya = make_synthetic(20, 32, "binary", seed=5)
    b, yb = make_synthetic(20, 32, "binary", seed=5)
    c, _ = make_synthetic(20, 32, "binary", seed=6)
    assert a.dtype == np.uint8 and a.shape == (20, 32, 32) and np.array_equal(a, b) and np.array_equal(ya, yb)
    assert not np.array_equal(a, c)
    assert set(np.unique(ya)) <= {0, 1} and 0 < ya.sum() < 20
    _, ym = make_synthetic(40, 24, "multiclass", num_classes=5, seed=0)
    assert ym.shape == (40,) and ym.max() <= 4
    _, yl = make_synthetic(30, 24, "multilabel", seed=0)
    assert yl.shape == (30, 14) and set(np.unique(yl)) <= {0, 1}


def test_synthetic_finding_is_visible():
    """Positive scans are brighter inside the lungs on average (the opacity), per scan noisy."""
    imgs, y = make_synthetic(200, 32, "binary", seed=0)
    lungs = imgs[:, 6:26, 4:28].astype(float).mean(axis=(1, 2))
    assert lungs[y == 1].mean() > lungs[y == 0].mean() + 5


# ----------------------------------------------------------------------------- bad input
def test_nih_short_row_is_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "nih"
    _nih(root, lists=True)
    csv_path = root / "Data_Entry_2017.csv"
    lines = csv_path.read_text().splitlines()
    lines.insert(3, "00000099_000.png")  # a short row: only the image name (used to be a traceback)
    csv_path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        ds = D.load_dataset(root, split="train", image_size=16)
    assert len(ds) > 0 and any(reason == "short row" for _, reason in ds.skipped)
    assert "1 row(s) without an image name or finding labels skipped (line 4)" in caplog.text


def test_npz_without_images_or_with_bad_labels_is_one_line(tmp_path):
    imgs = np.zeros((4, 28, 28), np.uint8)
    cases = {
        "empty": (dict(train_images=np.zeros((0, 28, 28), np.uint8), train_labels=np.zeros((0, 1))),
                  ["train_images holds no images"]),
        "nan": (dict(train_images=imgs, train_labels=np.array([[0], [1], [np.nan], [1]])),
                ["train_labels", "invalid label", "nan"]),
        "neg": (dict(train_images=imgs, train_labels=np.array([[0], [1], [-1], [2]])),
                ["train_labels", "-1", "0, 1, ..., K−1"]),
        "range": (dict(train_images=imgs, train_labels=np.array([[0], [1], [2], [1]]),
                       class_names=np.array(["NORMAL", "PNEUMONIA"])), ["train_labels has label 2", "0..1"]),
        "split": (dict(train_images=imgs, train_labels=np.array([[0], [1], [0], [1]]), test_images=imgs,
                       test_labels=np.array([[0], [1], [0.5], [1]])), ["test_labels", "0.5"]),
        "multilabel": (dict(train_images=imgs, train_labels=np.array([[0, 1], [1, 2], [0, 0], [1, 1]])),
                       ["train_labels", "2", "0 or 1"]),
    }
    for name, (arrays, needles) in cases.items():
        p = tmp_path / f"{name}.npz"
        np.savez(p, **arrays)
        with pytest.raises(UserError) as e:
            D.load_dataset(p, split="train", image_size=16)
        _one_line_error(e, *needles)
    # and through the CLI: one line, exit status 2, no traceback
    from xrayfed.common import cli

    assert cli.main(["client", "--server", "127.0.0.1:1", "--insecure", "--data", str(tmp_path / "empty.npz"),
                     "--state-dir", str(tmp_path / "st")]) == 2


def test_binary_class_folders_with_an_empty_class_are_refused_for_training(tmp_path):
    root = tmp_path / "cf"
    for i in range(6):
        _png(root / "train" / "NORMAL" / f"n{i}.png", np.full((24, 24), 40 + i, np.uint8))
    (root / "train" / "PNEUMONIA").mkdir(parents=True)
    (root / "train" / "PNEUMONIA" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(UserError) as e:
        D.load_dataset(root, split="train", image_size=16)
    _one_line_error(e, "['PNEUMONIA']", "no usable scans", "NORMAL 6, PNEUMONIA 0")


def test_symlinked_scans_and_folders_are_followed_without_looping(tmp_path, caplog):
    store = tmp_path / "store"
    for i in range(3):
        _png(store / "pneu" / f"p{i}.png", np.full((24, 24), 200, np.uint8))
    _png(store / "n0.png", np.full((24, 24), 20, np.uint8))
    root = tmp_path / "cf"
    (root / "train" / "NORMAL").mkdir(parents=True)
    (root / "train" / "PNEUMONIA").mkdir(parents=True)
    _png(root / "train" / "NORMAL" / "own.png", np.full((24, 24), 30, np.uint8))
    (root / "train" / "NORMAL" / "linked.png").symlink_to(store / "n0.png")  # a linked scan
    (root / "train" / "PNEUMONIA" / "archive").symlink_to(store / "pneu")  # a linked folder
    (root / "train" / "PNEUMONIA" / "archive-again").symlink_to(store / "pneu")  # the same folder twice
    (store / "pneu" / "loop").symlink_to(root / "train" / "PNEUMONIA")  # a loop back up
    (root / "train" / "NORMAL" / "gone.png").symlink_to(tmp_path / "missing.png")  # a broken link
    with caplog.at_level(logging.WARNING):
        ds = D.load_dataset(root, split="train", image_size=16)
    y = D.targets_array(ds)
    assert (int((y == 0).sum()), int((y == 1).sum())) == (2, 3)  # every scan once, none twice
    assert any("missing file" in reason for _, reason in ds.skipped)


# ----------------------------------------------------------------------------- one hospital's part of a folder
def _layout(kind: str, root: Path) -> Path:
    """A small data folder of each file-based layout, every file readable."""
    if kind == "nih":
        root.mkdir()
        _nih(root, lists=False)
        return root
    data = write_class_folders(root / "cf", n_train=48, n_test=4, size=24, seed=3, flat=kind == "flat-class-folders")
    if kind != "labels-csv":
        return data
    rows = [{"file": str(f.relative_to(data)), "label": f.parent.name, "split": f.parts[-3]}
            for f in sorted(data.rglob("*.png"))]
    with (data / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    return data


@pytest.mark.parametrize("kind", ["class-folders", "flat-class-folders", "labels-csv", "nih"])
def test_select_decodes_the_same_scans_as_a_subset_of_the_whole(tmp_path, kind):
    """``load_dataset(select=…)`` picks from the index of listed files what it would pick from the
    decoded split, and gives the same scans, targets, patient ids and files."""
    root = _layout(kind, tmp_path / kind)
    assert D.detect_format(root) == kind
    whole = D.load_dataset(root, "train", image_size=16)
    for scheme in ("iid", "dirichlet", "patient"):
        for i in range(3):
            pick = lambda ds: D.partition(ds, 3, scheme, seed=1, alpha=0.5)[i]  # noqa: E731
            part = D.load_dataset(root, "train", image_size=16, select=pick)
            want = D.subset(whole, pick(whole))
            assert part.files == want.files and len(part) < len(whole), (scheme, i)
            assert np.array_equal(part.images, want.images)
            assert np.array_equal(D.targets_array(part), D.targets_array(want))
            assert part.patient_ids == want.patient_ids and part.patient_ids_known == want.patient_ids_known


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "patient"])
def test_a_hospital_decodes_only_its_part_of_a_shared_folder(tmp_path, scheme):
    """Hospitals that share one folder (``data.partition``) each decode their own part: the same
    train and validation scans as partitioning the whole decoded folder; an unreadable file is
    skipped and counted by the one hospital whose part lists it, and no usable scan is lost."""
    from xrayfed.client.hospital import hospital_split, load_local_data, split_local
    from xrayfed.common.config import HospitalConfig

    root = write_class_folders(tmp_path / "shared", n_train=60, n_test=4, size=24, seed=2)

    def cfg(i: int) -> HospitalConfig:
        return HospitalConfig.model_validate({
            "hospital": {"name": f"h{i}", "state_dir": str(tmp_path / f"s{i}")},
            "data": {"path": str(root), "partition": f"{i}/3", "partition_scheme": scheme, "dirichlet_alpha": 0.5,
                     "seed": 4, "val_fraction": 0.2}})

    whole = D.load_dataset(root, "train", image_size=D.CHECK_SIZE)
    for i in range(3):
        c = cfg(i)
        part, train, val = hospital_split(c)
        want_train, want_val = split_local(whole, 0.2, f"{i}/3", scheme, 0.5, 4)
        assert train.files == want_train.files and val.files == want_val.files
        assert len(part) == len(train) + len(val) < len(whole)
        local = load_local_data(c, 20, whole.task)
        assert local.train.files == want_train.files and local.val.files == want_val.files
        assert local.train.image_size == 20 and local.skipped == 0

    bad = root / "train" / "PNEUMONIA" / "person777_bacteria_1.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a scan")
    parts = [hospital_split(cfg(i)) for i in range(3)]
    assert sorted(Path(p).name for ds, _, _ in parts for p, _ in ds.skipped) == [bad.name]
    usable = sorted(f for ds, _, _ in parts for f in ds.files)
    assert usable == sorted(whole.files)
    # `xrayfed data check` (the whole folder decoded, then this hospital's split) plans on the same scans
    decoded = D.load_dataset(root, "train", image_size=D.CHECK_SIZE)
    for i, (_, train, val) in enumerate(parts):
        _, train2, val2 = hospital_split(cfg(i), decoded)
        assert train2.files == train.files and getattr(val2, "files", None) == getattr(val, "files", None)


def test_a_part_knows_its_patients_only_when_the_whole_split_does(tmp_path):
    """A part of a folder is at the patient unit exactly when the whole split would be: file
    names that only stand in for patients (``scan000.png`` in labels.csv, no ``patient_id``
    column) are not known ids, in a part as in the whole; one such file among Kermany-named
    ones makes every part unknown, as it makes the whole."""
    flat = tmp_path / "csv"
    rows = []
    for i in range(30):
        _png(flat / f"scan{i:03d}.png", make_synthetic(1, 24, seed=i)[0][0])
        rows.append({"file": f"scan{i:03d}.png", "label": ["NORMAL", "PNEUMONIA"][i % 2]})
    with (flat / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "label"])
        w.writeheader()
        w.writerows(rows)
    folders = write_class_folders(tmp_path / "cf", n_train=30, n_test=4, size=24, seed=1)
    _png(folders / "train" / "NORMAL" / "anonymous.png", make_synthetic(1, 24, seed=99)[0][0])
    for root in (flat, folders):
        whole = D.load_dataset(root, "train", image_size=16)
        assert not whole.patient_ids_known
        for i in range(3):
            part = D.load_dataset(root, "train", image_size=16,
                                  select=lambda ds: D.partition(ds, 3, "iid", seed=0)[i])  # noqa: B023
            assert not part.patient_ids_known, (root.name, i)
    (folders / "train" / "NORMAL" / "anonymous.png").unlink()
    assert D.load_dataset(folders, "train", image_size=16, select=lambda ds: [0, 1, 2]).patient_ids_known


def test_a_hospital_decodes_its_part_once_and_only_its_part(tmp_path, monkeypatch):
    """``load_local_data`` decodes the hospital's part of a shared folder (a third of the files
    here), once per process; the data check's split of the whole folder, given through a
    differently spelt path (a symbolic link), keeps the same part."""
    from xrayfed.client import hospital as H
    from xrayfed.common.config import HospitalConfig
    from xrayfed.common.data import folders

    root = write_class_folders(tmp_path / "shared", n_train=60, n_test=4, size=24, seed=5)
    (tmp_path / "link").symlink_to(root)
    decoded: list[int] = []
    real_decode = folders.decode_files
    monkeypatch.setattr(folders, "decode_files", lambda files, size: (decoded.append(len(files)),
                                                                     real_decode(files, size))[1])
    cfg = HospitalConfig.model_validate({
        "hospital": {"name": "h1", "state_dir": str(tmp_path / "s")},
        "data": {"path": str(root), "partition": "1/3", "partition_scheme": "patient", "val_fraction": 0.2}})
    H.clear_data_caches()
    task = D.load_dataset(root, "train", image_size=8).task
    decoded.clear()
    local = H.load_local_data(cfg, 20, task)
    H.load_local_data(cfg, 20, task)
    assert decoded == [20]  # 60 files, a third of them, decoded once
    linked = D.load_dataset(tmp_path / "link", "train", image_size=D.CHECK_SIZE)
    _, train, val = H.hospital_split(cfg, linked)
    assert [Path(f).name for f in train.files] == [Path(f).name for f in local.train.files]
    assert [Path(f).name for f in val.files] == [Path(f).name for f in local.val.files]
    H.clear_data_caches()


def test_the_check_the_rounds_and_data_check_agree_on_the_patient_unit(tmp_path):
    """A hospital's part of a shared folder is at the patient unit or not alike in its start-up
    check, its rounds and `xrayfed data check` (the whole split decoded, then the part), also
    when the one file that names no patient cannot be read."""
    from xrayfed.client import hospital as H
    from xrayfed.common.config import HospitalConfig

    root = write_class_folders(tmp_path / "shared", n_train=30, n_test=4, size=24, seed=6)
    (root / "train" / "NORMAL" / "anonymous.png").write_bytes(b"\x89PNG not a scan")
    whole = D.load_dataset(root, "train", image_size=D.CHECK_SIZE)
    assert whole.patient_ids_known  # without a partition: the readable files all name their patient
    H.clear_data_caches()
    for i in range(3):
        cfg = HospitalConfig.model_validate({
            "hospital": {"name": f"h{i}", "state_dir": str(tmp_path / f"s{i}")},
            "data": {"path": str(root), "partition": f"{i}/3", "val_fraction": 0.2}})
        _, train, _ = H.hospital_split(cfg)
        _, checked, _ = H.hospital_split(cfg, whole)
        rounds = H.load_local_data(cfg, 20, whole.task).train
        assert train.patient_ids_known is checked.patient_ids_known is rounds.patient_ids_known is False
    H.clear_data_caches()


def test_a_hospital_keeps_few_decoded_copies_whatever_sizes_a_server_asks_for(tmp_path, monkeypatch):
    """The image size is the server's to ask for: a hospital's own process keeps at most 4
    decoded copies of its scans however many sizes are asked for (a simulation, which serves
    many hospitals, keeps more)."""
    from xrayfed.client import hospital as H
    from xrayfed.client.nodeconfig import SIM_HOSPITALS_ENV
    from xrayfed.common.config import HospitalConfig

    monkeypatch.setattr(H, "_serves_many", False)
    monkeypatch.delenv(SIM_HOSPITALS_ENV, raising=False)
    root = write_class_folders(tmp_path / "own", n_train=20, n_test=4, size=24, seed=7)
    cfg = HospitalConfig.model_validate({"hospital": {"name": "h", "state_dir": str(tmp_path / "s")},
                                         "data": {"path": str(root)}})
    task = D.load_dataset(root, "train", image_size=8).task
    H.clear_data_caches()
    for size in range(16, 28):
        H.load_local_data(cfg, size, task)
    assert H._load_local.cache_info().currsize == 4
    assert H._load_local_many.cache_info().currsize == 0
    H.clear_data_caches()
