"""DICOM scans as hospitals' archives export them: every compressed transfer syntax in clinical use
decodes through the one decode path, the same pixels give the same model input in every format,
non-radiographs are refused with the reason, and a file that cannot be decoded is one line."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames

from xrayfed.common import dicom as DC
from xrayfed.common import preprocess as P
from xrayfed.common.errors import UserError
from xrayfed.common.model import ModelSpec, build_model

from dicom_files import jpeg_lossless_sv1, recompress, write_dicom

JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
#: pydicom's bundled MR_small.dcm and its lossless compressed copies (pixel-identical to it)
LOSSLESS = ("MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm")
#: pydicom's bundled compressed files without an uncompressed twin, with their decoded shape
LOSSY = {"JPEG-lossy.dcm": (1024, 256), "JPGExtended.dcm": (1024, 256), "JPEGLSNearLossless_16.dcm": (50, 10),
         "693_J2KI.dcm": (512, 512), "SC_rgb_rle_16bit.dcm": (100, 100, 3), "CT_small.dcm": (128, 128)}


def _as(src: str | Path, dst: Path, **attrs) -> Path:
    """A copy of the DICOM file ``src`` with header ``attrs`` set (e.g. ``Modality="DX"``)."""
    ds = pydicom.dcmread(src)
    for k, v in attrs.items():
        setattr(ds, k, v)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return dst


def _p14(tmp_path: Path) -> Path:
    """MR_small.dcm as JPEG Lossless, Process 14 SV1 (encoded by tests/dicom_files.py)."""
    src = get_testdata_file("MR_small.dcm")
    frame = jpeg_lossless_sv1(pydicom.dcmread(src).pixel_array, precision=16)
    return recompress(Path(src), tmp_path / "MR_small_jpeg_lossless_sv1.dcm", JPEG_LOSSLESS_SV1, frame,
                      Modality="DX")


def _one_line(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n.lower() in msg.lower(), (n, msg)
    return msg


# ----------------------------------------------------------------------------- transfer syntaxes
def test_lossless_transfer_syntaxes_give_the_uncompressed_pixels(tmp_path):
    ref_file = _as(get_testdata_file("MR_small.dcm"), tmp_path / "ref.dcm", Modality="DX")
    ref_ds = DC.read_dicom(ref_file)
    ref = DC.decode_pixels(ref_ds, ref_file)
    ref_img = P.load_image(ref_file)
    assert ref.shape == (64, 64) and ref.std() > 0 and ref_img.std() > 0
    files = [_as(get_testdata_file(n), tmp_path / n, Modality="DX") for n in LOSSLESS] + [_p14(tmp_path)]
    syntaxes = set()
    for f in files:
        ds = DC.read_dicom(f)
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
        assert np.array_equal(DC.decode_pixels(ds, f), ref), f.name
        assert np.array_equal(P.load_image(f), ref_img), f.name  # the whole decode path, display rules included
    assert syntaxes == {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5", JPEG_LOSSLESS_SV1}


def test_lossy_and_twelve_bit_transfer_syntaxes_decode(tmp_path):
    for name, shape in LOSSY.items():
        f = _as(get_testdata_file(name), tmp_path / name, Modality="DX")
        px = DC.decode_pixels(DC.read_dicom(f), f)
        assert px.shape == shape and px.std() > 0, name
        img = P.load_image(f)
        assert img.shape == shape[:2] and img.dtype == np.float32 and 0 <= img.min() < img.max() <= 1, name
    # JPEG-lossy.dcm's scan header says spectral selection 0..0 (sequential JPEG requires 0..63):
    # decoded with the header corrected, it is exactly JPGExtended.dcm, the archive's corrected copy
    lossy, fixed = tmp_path / "JPEG-lossy.dcm", tmp_path / "JPGExtended.dcm"
    assert np.array_equal(DC.decode_pixels(DC.read_dicom(lossy), lossy), DC.decode_pixels(DC.read_dicom(fixed), fixed))
    frame = next(generate_frames(pydicom.dcmread(lossy).PixelData, number_of_frames=1))
    good = next(generate_frames(pydicom.dcmread(fixed).PixelData, number_of_frames=1))
    assert DC.fix_sequential_scan_header(frame) == good and DC.fix_sequential_scan_header(good) is None


def test_twelve_bit_jpeg_lossless_process_14(tmp_path):
    rng = np.random.default_rng(4)
    px = np.clip(rng.normal(2000, 600, (40, 48)), 0, 4095).astype(np.uint16)  # a 12-bit detector image
    src = write_dicom(tmp_path / "raw.dcm", px)
    f = recompress(src, tmp_path / "p14.dcm", "1.2.840.10008.1.2.4.57", jpeg_lossless_sv1(px, precision=12),
                   BitsStored=12, HighBit=11)
    assert np.array_equal(DC.decode_pixels(DC.read_dicom(f), f), px)
    src12 = _as(src, tmp_path / "raw12.dcm", BitsStored=12, HighBit=11)
    assert np.array_equal(P.load_image(f), P.load_image(src12))


# ----------------------------------------------------------------------------- refusals
def test_non_radiographs_are_refused_with_the_reason(tmp_path):
    cases = {"MR_small.dcm": ("Modality MR", "magnetic resonance", "not a radiograph"),
             "CT_small.dcm": ("Modality CT", "computed tomography"),
             "JPEG-lossy.dcm": ("Modality NM",),
             "SC_rgb_rle_16bit.dcm": ("colour (RGB)", "Modality OT", "secondary capture")}
    for name, needles in cases.items():
        with pytest.raises(UserError) as e:
            P.load_image(get_testdata_file(name))
        _one_line(e, name, *needles)
    cine = write_dicom(tmp_path / "series.dcm", np.zeros((3, 16, 16), np.uint16), frames=3)
    with pytest.raises(UserError) as e:
        P.load_image(cine)
    _one_line(e, "series.dcm", "multi-frame", "3 frames")
    # a colour image whose Modality says radiograph is a radiograph: grey, as Pillow converts RGB
    rgb = _as(get_testdata_file("SC_rgb_rle_16bit.dcm"), tmp_path / "rgb.dcm", Modality="DX")
    assert P.load_image(rgb).shape == (100, 100)


def test_an_undecodable_scan_is_one_line_and_pydicom_stays_silent(tmp_path, caplog, monkeypatch):
    src = _as(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), tmp_path / "src.dcm", Modality="DX")
    ds = pydicom.dcmread(src)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(range(256)) * 4])  # a JPEG-LS frame of garbage
    ds.save_as(tmp_path / "damaged.dcm")
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(UserError) as e:
            P.load_image(tmp_path / "damaged.dcm")
    _one_line(e, "damaged.dcm", "JPEG-LS Lossless Image Compression", "1.2.840.10008.1.2.4.80", "damaged",
              "gdcmconv --raw")
    assert not [r for r in caplog.records if r.name.startswith("pydicom")] and not seen
    assert logging.getLogger("pydicom").level != logging.CRITICAL + 1  # the silence ends with the file

    class Missing:  # a machine without the decoder plugins
        is_available = False

    monkeypatch.setattr("pydicom.pixels.get_decoder", lambda uid: Missing())
    with pytest.raises(UserError) as e:
        P.load_image(tmp_path / "damaged.dcm")
    _one_line(e, "damaged.dcm", "no decoder for it is installed", "pip install pylibjpeg", "pyjpegls")


def test_data_check_reads_every_bundled_file_as_a_radiograph(tmp_path, capsys, caplog):
    """pydicom's bundled files with Modality DX are all usable scans in `xrayfed data check`; a
    damaged file, an MR image and a series are skipped, each with one line; pydicom says nothing."""
    from xrayfed.common import cli

    data = tmp_path / "data"
    names = ["MR_small.dcm", *LOSSLESS, *LOSSY]
    for i, n in enumerate(names):
        _as(get_testdata_file(n), data / ("NORMAL" if i % 2 else "PNEUMONIA") / n, Modality="DX", PatientID=f"P{i}")
    p14 = _p14(tmp_path)
    os.replace(p14, data / "NORMAL" / p14.name)
    ds = pydicom.dcmread(data / "NORMAL" / p14.name)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(range(256)) * 4])
    ds.save_as(data / "PNEUMONIA" / "damaged.dcm")
    _as(get_testdata_file("MR_small.dcm"), data / "NORMAL" / "brain.dcm")  # Modality MR
    write_dicom(data / "NORMAL" / "series.dcm", np.zeros((2, 16, 16), np.uint16), frames=2)
    with caplog.at_level(logging.DEBUG):
        rc = cli.main(["data", "check", str(data)])
    cap = capsys.readouterr()
    out = cap.out + cap.err
    assert rc == 0, out
    assert f"train: {len(names) + 1} usable scans" in out and "3 file(s) skipped:" in out, out
    assert "damaged.dcm: cannot decode DICOM pixel data in JPEG Lossless" in out
    assert "brain.dcm: DICOM Modality MR" in out and "series.dcm: multi-frame" in out
    assert "ready to join a federation" in out and "CANNOT TRAIN" not in out and "Traceback" not in out
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]


# ----------------------------------------------------------------------------- one input per image
def _image(seed: int = 0) -> np.ndarray:
    """An 8-bit scan whose values span 30..200 (not the full range: a per-image stretch shows)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    img = 30 + 120 * np.exp(-((yy - 30) ** 2 + (xx - 26) ** 2) / 300.0) + rng.normal(0, 8, (64, 64))
    return np.clip(np.rint(img), 30, 200).astype(np.uint8)


def _jpeg_bytes(img: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=100)
    return buf.getvalue()


def test_the_same_pixels_give_the_same_model_input_in_every_format(tmp_path):
    img = _image()
    size = 32
    png = tmp_path / "scan.png"
    Image.fromarray(img).save(png)
    jpg = tmp_path / "scan.jpg"
    jpg.write_bytes(_jpeg_bytes(img))
    dcm8 = write_dicom(tmp_path / "scan8.dcm", img)
    inverted = write_dicom(tmp_path / "mono1.dcm", (255 - img).astype(np.uint8), photometric="MONOCHROME1")
    # 12-bit detector values whose window (LINEAR_EXACT) displays exactly the PNG's pixels
    deep = write_dicom(tmp_path / "deep.dcm", (1000 + 16 * img.astype(np.uint16)), window=(1000 + 8 * 255, 16 * 255))
    _as(deep, deep, VOILUTFunction="LINEAR_EXACT")
    # the same JPEG stream as a .jpg and inside a DICOM file (JPEG Baseline)
    jdcm = recompress(dcm8, tmp_path / "jpeg.dcm", JPEG_BASELINE, _jpeg_bytes(img), BitsStored=8)

    want = P.prepare_scan(png, size)
    for f in (dcm8, inverted, deep):
        assert torch.equal(P.prepare_scan(f, size), want), f.name
    assert np.array_equal(P.load_scan_uint8(dcm8, size), P.load_scan_uint8(png, size))
    assert torch.equal(P.prepare_scan(jdcm, size), P.prepare_scan(jpg, size))  # one decoder for one stream
    jx = P.prepare_scan(jpg, size)
    assert (jx - want).abs().max() <= 4 / 127.5  # JPEG at quality 100: within 2 grey levels of 255
    torch.manual_seed(0)
    model = build_model(ModelSpec(num_outputs=1, width=8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        logits = {f.name: float(model(P.prepare_scan(f, size))) for f in (png, jpg, dcm8, inverted, deep, jdcm)}
    assert len({logits[k] for k in ("scan.png", "scan8.dcm", "mono1.dcm", "deep.dcm")}) == 1, logits
    assert abs(logits["scan.jpg"] - logits["scan.png"]) < 0.05 and logits["jpeg.dcm"] == logits["scan.jpg"], logits


def test_one_jpeg_stream_gives_one_model_input_at_a_real_scan_size(tmp_path):
    """A scan many times the model input side: the .jpg is decoded at a reduced DCT scale, and so is
    the same stream inside a DICOM file (an 8-bit grey JPEG Baseline frame without a window)."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:520, 0:600]
    img = np.clip(127 + 60 * np.sin(xx / 37.0) * np.cos(yy / 23.0) + rng.normal(0, 20, (520, 600)), 0, 255)
    img = img.astype(np.uint8)
    jpg = tmp_path / "big.jpg"
    jpg.write_bytes(_jpeg_bytes(img))
    dcm8 = write_dicom(tmp_path / "big8.dcm", img)
    jdcm = recompress(dcm8, tmp_path / "bigjpeg.dcm", JPEG_BASELINE, _jpeg_bytes(img), BitsStored=8)
    size = 32  # the .jpg decodes at 1/8 scale (75 x 65 px, both sides >= 2 x 32)
    assert P.load_image(jpg, size_hint=size).shape == (65, 75)
    assert np.array_equal(P.load_scan_uint8(jdcm, size), P.load_scan_uint8(jpg, size))
    assert DC.dicom_display(jdcm, P.MAX_SCAN_PIXELS).shape == (520, 600)  # without a size: every pixel


def test_dicom_windows_follow_the_standard(tmp_path):
    """LINEAR windowing (the default VOI LUT function) as pydicom implements it, mapped to 0..255;
    a VOI LUT Sequence scaled from its bit depth; rescale before the window."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    rng = np.random.default_rng(1)
    px = rng.integers(0, 4096, (24, 24)).astype(np.uint16)
    f = write_dicom(tmp_path / "w.dcm", px, window=(1200, 1000), slope=0.5, intercept=100.0)
    ds = pydicom.dcmread(f)
    y = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    top = 2 ** int(ds.BitsStored) - 1
    lo, hi = 0 * 0.5 + 100.0, top * 0.5 + 100.0  # pydicom's output range: the rescaled stored range
    want = np.rint((y - lo) / (hi - lo) * 255.0).astype(np.uint8)
    got = DC.dicom_display(f, P.MAX_SCAN_PIXELS)
    assert np.abs(got.astype(int) - want).max() <= 1 and (got == want).mean() > 0.99
    assert got.min() == 0 and got.max() == 255  # the window saturates at both ends

    lut = write_dicom(tmp_path / "lut.dcm", px)
    ds = pydicom.dcmread(lut)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 12])
    item.add_new("LUTData", "US", [4095 - v for v in range(4096)])  # an inverting 12-bit VOI LUT
    ds.VOILUTSequence = [item]
    ds.save_as(lut)
    expect = np.rint((4095 - px) / 4095 * 255).astype(np.uint8)
    assert np.array_equal(DC.dicom_display(lut, P.MAX_SCAN_PIXELS), expect)
