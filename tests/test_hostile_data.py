"""Hostile data: links that lead a class folder's walk elsewhere, scans that declare more pixels
than any memory holds, and files at `xrayfed data check`, `xrayfed simulate` and `xrayfed explain`
that are not what they claim (empty or foreign .npz files, FIFOs, devices, absurd checkpoint
sizes). Each is read correctly, skipped and counted, or refused with one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xrayfed.common import cli
from xrayfed.common import data as D
from xrayfed.common import preprocess as P
from xrayfed.common.checkpoint import Checkpoint, from_bytes, save_checkpoint, to_bytes
from xrayfed.common.errors import UserError
from xrayfed.common.model import build_model, default_model
from xrayfed.common.prediction import TaskSpec

from dicom_files import write_dicom


def _png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 24), value, np.uint8)).save(path)
    return path


def _counts(*datasets: D.XrayDataset) -> tuple[int, ...]:
    """Scans per class (binary: NORMAL, PNEUMONIA) over ``datasets``."""
    y = np.concatenate([D.targets_array(ds) for ds in datasets]).astype(int)
    return tuple(int(n) for n in np.bincount(y, minlength=2))


def _one_error_line(capsys, argv: list[str], *needles: str) -> str:
    """Run the real CLI: exit status 2 and exactly one line ``xrayfed: error: ...``, no traceback."""
    rc = cli.main(argv)
    cap = capsys.readouterr()
    lines = [line for line in cap.err.splitlines() if line.strip()]
    assert "Traceback" not in cap.err + cap.out
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("xrayfed: error: "), (rc, cap.out, cap.err)
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- links in class folders
def test_a_link_up_to_the_data_folder_does_not_read_another_class_again(tmp_path, capsys):
    root = tmp_path / "flat"
    for i in range(4):
        _png(root / "NORMAL" / f"n{i}.png", 20 + i)
    for i in range(3):
        _png(root / "PNEUMONIA" / f"p{i}.png", 200 + i)
    (root / "PNEUMONIA" / "loop").symlink_to("..")  # would reach NORMAL's scans from PNEUMONIA
    train = D.load_dataset(root, split="train", image_size=16)  # a flat layout: every scan trains
    assert _counts(train) == (4, 3)  # every scan once, in its own class
    pneumonia = train.images[D.targets_array(train) == 1]
    assert pneumonia.min() >= 190  # no NORMAL scan labelled PNEUMONIA
    assert [Path(f).name for f, _ in train.links_skipped] == ["loop"]
    assert "loop" in train.links_skipped[0][1]

    assert cli.main(["data", "check", str(root), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    per_class = {"NORMAL": 0, "PNEUMONIA": 0}
    for s in doc["data"]["splits"]:
        for c in s["classes"]:
            per_class[c["name"]] += c["images"]
        assert [Path(f).name for f, _ in s["links_skipped"]] == ["loop"]
    assert per_class == {"NORMAL": 4, "PNEUMONIA": 3}
    cli.main(["data", "check", str(root)])
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "link(s) skipped" in line]
    assert said and all("1 link(s) skipped" in line and "PNEUMONIA/loop" in line for line in said), out


def test_links_into_other_classes_or_splits_and_second_paths_to_a_scan_are_not_followed(tmp_path):
    root = tmp_path / "cf"
    normal, pneumonia = root / "train" / "NORMAL", root / "train" / "PNEUMONIA"
    for i in range(3):
        _png(normal / f"n{i}.png", 20 + i)
    for i in range(2):
        _png(pneumonia / f"p{i}.png", 200 + i)
    _png(root / "test" / "PNEUMONIA" / "tp0.png", 210)
    _png(root / "test" / "PNEUMONIA" / "tp1.png", 211)
    (normal / "dup.png").symlink_to("n0.png")  # the same scan by a second path
    os.link(normal / "n1.png", normal / "hard.png")  # ... and by a hard link
    (normal / "other").symlink_to("../PNEUMONIA")  # into another class
    (normal / "up").symlink_to("../..")  # up to the data folder (a loop)
    (pneumonia / "stolen.png").symlink_to("../NORMAL/n2.png")  # a scan of another class
    (pneumonia / "peek").symlink_to("../../test/PNEUMONIA")  # into another split
    (root / "test" / "NORMAL").symlink_to("../train/PNEUMONIA")  # a class folder linked to another class

    train = D.load_dataset(root, split="train", image_size=16)
    assert _counts(train) == (3, 2)
    assert len({Path(os.path.realpath(f)) for f in train.files}) == len(train)  # each real file once
    skipped = sorted(Path(f).name for f, _ in train.links_skipped)
    assert len(skipped) == 6 and {"other", "up", "peek", "stolen.png"} <= set(skipped), train.links_skipped
    assert {"n0.png", "dup.png"} & set(skipped) and {"n1.png", "hard.png"} & set(skipped)
    assert train.images[D.targets_array(train) == 1].min() >= 190  # PNEUMONIA holds only its own scans
    test = D.load_dataset(root, split="test", image_size=16)
    assert _counts(test) == (0, 2)  # test/NORMAL is train's PNEUMONIA folder: not read as NORMAL
    assert [Path(f).name for f, _ in test.links_skipped] == ["NORMAL"]


# ----------------------------------------------------------------------------- DICOM size from the header
def _dicom_over_the_pixel_limit(path: Path) -> Path:
    """A small DICOM file (deflated, about 200 kB) whose pixel data decodes to more than
    MAX_SCAN_PIXELS 8-bit pixels."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    side = math.isqrt(2 * Image.MAX_IMAGE_PIXELS) + 16  # Pillow refuses a PNG or JPEG of this many pixels
    write_dicom(path, np.zeros((16, 16), np.uint8), patient_id="P-BIG")
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(side * side)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path)
    assert path.stat().st_size < 1_000_000
    return path


def test_a_dicom_declaring_more_pixels_than_allowed_is_skipped_from_its_header(tmp_path, capsys):
    root = tmp_path / "cf"
    for i in range(2):
        _png(root / "train" / "NORMAL" / f"n{i}.png", 20 + i)
        _png(root / "train" / "PNEUMONIA" / f"p{i}.png", 200 + i)
    big = _dicom_over_the_pixel_limit(root / "train" / "PNEUMONIA" / "big.dcm")
    with pytest.raises(UserError) as e:
        P.load_image(big)
    msg = str(e.value)
    assert "\n" not in msg and "big.dcm" in msg and f"at most {2 * Image.MAX_IMAGE_PIXELS:,}" in msg
    assert P.MAX_SCAN_PIXELS == 2 * Image.MAX_IMAGE_PIXELS  # the limit PNG and JPEG files have
    ds = D.load_dataset(root, split="train", image_size=16)
    assert _counts(ds) == (2, 2)
    assert [(Path(f).name, "at most" in why) for f, why in ds.skipped] == [("big.dcm", True)]
    assert cli.main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "1 file(s) skipped" in out and "big.dcm" in out and "Traceback" not in out


# ----------------------------------------------------------------------------- hostile files at the CLI
def _hostile_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name → (data path, a word the one-line error must hold)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "empty.npz").write_bytes(b"")
    (tmp / "text.npz").write_text("not a zip archive\n")
    np.savez(tmp / "no-arrays.npz", something=np.zeros(3))
    np.savez(tmp / "flat-images.npz", train_images=np.zeros(5, np.uint8), train_labels=np.zeros(5, np.int64))
    np.savez(tmp / "text-images.npz", train_images=np.array([["a"] * 8] * 8), train_labels=np.zeros(8, np.int64))
    np.savez(tmp / "complex-images.npz", train_images=np.zeros((2, 8, 8), np.complex64),
             train_labels=np.zeros(2, np.int64))
    np.savez(tmp / "cube-labels.npz", train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.zeros((2, 3, 4)))
    np.savez(tmp / "few-labels.npz", train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros(3, np.int64))
    (tmp / "a-file").write_text("x")
    (tmp / "no-classes" / "scans" / "deeper").mkdir(parents=True)
    return {
        "empty": (tmp / "empty.npz", "not a readable .npz"),
        "not a zip": (tmp / "text.npz", "not a readable .npz"),
        "no arrays": (tmp / "no-arrays.npz", "no {split}_images"),
        "1-D images": (tmp / "flat-images.npz", "shape (5,)"),
        "text images": (tmp / "text-images.npz", "<U1"),
        "complex images": (tmp / "complex-images.npz", "complex64"),
        "3-D labels": (tmp / "cube-labels.npz", "train_labels"),
        "labels of other length": (tmp / "few-labels.npz", "for 4 images"),
        "parent is a file": (tmp / "a-file" / "data.npz", "is a file, not a folder"),
        "no class folders": (tmp / "no-classes", "unknown layout"),
    }


HOSTILE = ("empty", "not a zip", "no arrays", "1-D images", "text images", "complex images", "3-D labels",
           "labels of other length", "parent is a file", "no class folders")


@pytest.mark.parametrize("case", HOSTILE)
def test_data_check_refuses_hostile_data_with_one_line(tmp_path, capsys, case):
    path, needle = _hostile_inputs(tmp_path / "in")[case]
    _one_error_line(capsys, ["data", "check", str(path)], needle, path.name)


@pytest.mark.parametrize("case", HOSTILE)
def test_simulate_refuses_hostile_data_with_one_line(tmp_path, capsys, case):
    path, needle = _hostile_inputs(tmp_path / "in")[case]
    _one_error_line(capsys, ["simulate", "--hospitals", "2", "--rounds", "1", "--data", str(path),
                             "--out", str(tmp_path / "out")], needle, path.name)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero on this system")
@pytest.mark.parametrize("command", ["data check", "simulate"])
def test_a_device_is_refused_without_reading_it(tmp_path, capsys, command):
    argv = ["data", "check", "/dev/zero"] if command == "data check" else \
        ["simulate", "--hospitals", "2", "--rounds", "1", "--data", "/dev/zero", "--out", str(tmp_path / "out")]
    _one_error_line(capsys, argv, "/dev/zero", "not a regular file", "character device")


@pytest.mark.parametrize("command", ["data check", "simulate"])
def test_a_fifo_is_refused_without_opening_it(tmp_path, command):
    fifo = tmp_path / "scans.npz"
    os.mkfifo(fifo)
    argv = ["data", "check", str(fifo)] if command == "data check" else \
        ["simulate", "--hospitals", "2", "--rounds", "1", "--data", str(fifo), "--out", str(tmp_path / "out")]
    try:  # reading a FIFO nobody writes would wait for ever: a separate process with a time limit
        r = subprocess.run([sys.executable, "-m", "xrayfed.common.cli", *argv], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"xrayfed {command} waited on the FIFO {fifo} instead of refusing it")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and lines == [f"xrayfed: error: data {fifo}: not a regular file (a FIFO); allowed: "
                                           "a .npz file or a folder"], (r.returncode, r.stderr)


def test_simulate_refuses_an_out_folder_below_a_file_and_an_absurd_image_size(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    _one_error_line(capsys, ["simulate", "--hospitals", "2", "--rounds", "1", "--out", str(tmp_path / "a-file" / "o")],
                    "--out", "cannot create the folder")
    _one_error_line(capsys, ["simulate", "--hospitals", "2", "--rounds", "1", "--image-size", str(10**6),
                             "--out", str(tmp_path / "o2")], "--image-size 1000000", "8 to 2048 px")
    assert not (tmp_path / "o2").exists()  # refused before anything was written


# ----------------------------------------------------------------------------- checkpoints
def _checkpoint(image_size) -> Checkpoint:
    spec = default_model(32)
    return Checkpoint(model=spec, task=TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")),
                      image_size=image_size, state_dict=build_model(spec).state_dict())


def _raw_checkpoint(**fields) -> bytes:
    """A checkpoint file's bytes with ``fields`` replaced (a field set to None is left out)."""
    import io

    import torch

    d = _checkpoint(32).to_dict()
    for k, v in fields.items():
        if v is None:
            del d[k]
        else:
            d[k] = v
    buf = io.BytesIO()
    torch.save(d, buf)
    return buf.getvalue()


def test_a_checkpoint_with_an_absurd_image_size_is_refused_when_loaded(tmp_path, capsys):
    ck = tmp_path / "global.pt"
    save_checkpoint(ck, _checkpoint(10**6))
    scan = _png(tmp_path / "scan.png", 100)
    _one_error_line(capsys, ["explain", "--model", str(ck), "--scan", str(scan), "--out", str(tmp_path / "h.png")],
                    "image_size 1000000", "from 8 to 2048", str(ck))
    assert not (tmp_path / "h.png").exists()
    for bad in (4, P.MAX_IMAGE_SIZE + 1, 10**12, "224", 224.0, True, [224]):
        with pytest.raises(UserError, match="image_size") as e:
            from_bytes(_raw_checkpoint(image_size=bad), source="global.pt")
        assert "\n" not in str(e.value)
    assert from_bytes(to_bytes(_checkpoint(P.MAX_IMAGE_SIZE))).image_size == P.MAX_IMAGE_SIZE
    for missing in ("task", "model", "image_size", "state_dict"):
        with pytest.raises(UserError, match=f"no '{missing}' field"):
            from_bytes(_raw_checkpoint(**{missing: None}), source="global.pt")
    with pytest.raises(UserError, match="its task field is malformed"):
        from_bytes(_raw_checkpoint(task={"kind": "binary"}), source="global.pt")


def test_the_config_and_checkpoint_image_size_bounds_agree():
    from xrayfed.common.config import FederationConfig

    field = FederationConfig.model_fields["image_size"]
    bounds = {type(m).__name__: getattr(m, "le", getattr(m, "ge", None)) for m in field.metadata}
    assert bounds.get("Le") == P.MAX_IMAGE_SIZE and bounds.get("Ge") == P.MIN_SIZE
