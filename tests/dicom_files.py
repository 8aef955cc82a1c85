"""DICOM files written by the tests (pydicom), shared by the loader and encrypted-inference tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", patient_id: str | None = "P-1",
                 window: tuple[float, float] | None = None, slope: float | None = None,
                 intercept: float | None = None, frames: int = 1, preamble: bool = True) -> Path:
    """A minimal uncompressed DX DICOM file; pixels: uint16 (16-bit) or uint8 (8-bit), (H, W) or (F, H, W)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept or 0.0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8 if bits == 8 else "<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(path, enforce_file_format=preamble)  # pydicom ≥ 3
    except TypeError:  # pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=not preamble)
    return path


def jpeg_lossless_sv1(pixels: np.ndarray, precision: int = 16) -> bytes:
    """``pixels`` (one 2-D frame of unsigned integers, or int16 as its 16-bit pattern) as a JPEG
    Lossless stream, Process 14 with selection value 1 (predictor: the sample to the left; the
    first column from the sample above), written here from ITU-T T.81 H.1 (SOF3, one Huffman
    table in which every difference category 0..16 has a 5-bit code)."""
    h, w = pixels.shape
    x = np.asarray(pixels).astype(np.int64) & ((1 << precision) - 1)
    pred = np.empty_like(x)
    pred[:, 1:] = x[:, :-1]  # Ra
    pred[1:, 0] = x[:-1, 0]  # Rb at the start of each line
    pred[0, 0] = 1 << (precision - 1)
    diff = (x - pred) % 65536
    diff = np.where(diff > 32768, diff - 65536, diff)  # T.81 H.1.2.2: modulo 2^16, 32768 is category 16
    out, acc, nbits = bytearray(), 0, 0

    def put(value: int, n: int) -> None:
        nonlocal acc, nbits
        acc, nbits = (acc << n) | (value & ((1 << n) - 1)), nbits + n
        while nbits >= 8:
            byte = (acc >> (nbits - 8)) & 0xFF
            out.append(byte)
            if byte == 0xFF:
                out.append(0x00)  # byte stuffing
            nbits -= 8
        acc &= (1 << nbits) - 1

    for d in diff.reshape(-1).tolist():
        ssss = 16 if d == 32768 else abs(d).bit_length()
        put(ssss, 5)
        if 0 < ssss < 16:
            put(d if d > 0 else d - 1, ssss)
    if nbits:
        put((1 << (8 - nbits)) - 1, 8 - nbits)  # pad with 1-bits
    sof = bytes([precision]) + h.to_bytes(2, "big") + w.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    bits = bytes([0, 0, 0, 0, 17] + [0] * 11)  # 17 codes of length 5
    dht = bytes([0x00]) + bits + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # Ns, Cs1, Td/Ta, Ss = predictor 1, Se, Ah/Al = point transform 0

    def seg(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body

    return b"\xff\xd8" + seg(0xC3, sof) + seg(0xC4, dht) + seg(0xDA, sos) + bytes(out) + b"\xff\xd9"


def recompress(src: Path, dst: Path, transfer_syntax: str, frame: bytes, **attrs) -> Path:
    """``src`` (a DICOM file) saved as ``dst`` with its pixel data replaced by the compressed
    ``frame`` in ``transfer_syntax``; ``attrs``: header attributes to set (e.g. ``Modality="DX"``)."""
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    for k, v in attrs.items():
        setattr(ds, k, v)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return dst
