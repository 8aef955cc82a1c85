"""DICOM scans: which files are one chest radiograph, the decoders of every transfer syntax in
clinical use, and the DICOM display rules that turn stored values into display values.

:func:`dicom_display` is the DICOM branch of :func:`xrayfed.common.preprocess.load_image`:

1. **Header checks, before any pixel data is decoded** (each refusal is one line saying why):
   one frame (``NumberOfFrames`` ≤ 1: a CT/MR series, cine or tomosynthesis stack is not one
   radiograph); a radiograph ``Modality`` (:data:`RADIOGRAPH_MODALITIES`, or none); grayscale
   (``MONOCHROME1``/``MONOCHROME2``, one sample per pixel), or colour (RGB/YBR, three samples)
   only when the Modality says radiograph (``CR``, ``DX``, ``RG``) — a colour secondary capture
   is refused; at most ``MAX_SCAN_PIXELS`` pixels.
2. **Decode** with pydicom and its plugins (:data:`DECODER_PACKAGES`): uncompressed, deflated, RLE,
   JPEG Baseline/Extended (8 and 12 bit), JPEG Lossless (Process 14 and its SV1), JPEG-LS
   (lossless, near-lossless), JPEG 2000 and High-Throughput JPEG 2000. A sequential JPEG stream
   whose scan header says spectral selection 0..0 (some archives write that; the standard
   requires 0..63 for sequential JPEG) is decoded with the header corrected to 0..63. pydicom's
   own log lines and warnings are silenced while a file is read; a file that still cannot be
   decoded is one :class:`UserError` naming it, its transfer syntax and what to install or how to
   convert it.
3. **Display rules** (PS3.3 C.11), giving display values 0..255 — what a DICOM viewer exporting
   the scan as an 8-bit JPEG/PNG shows:

   * Modality LUT: ``Rescale Slope/Intercept`` or the Modality LUT Sequence;
   * VOI: the first VOI LUT Sequence item (scaled from its ``LUTDescriptor`` bit depth to
     0..255), else the first ``Window Center/Width`` with its ``VOILUTFunction`` (LINEAR,
     LINEAR_EXACT or SIGMOID; output range 0..255); else, for an 8-bit image with no rescale,
     the stored value itself (× 255 / (2^BitsStored − 1) below 8 bits), so that the same pixels
     as DICOM and as PNG are the same scan; else (more than 8 bits, no window) min–max of the
     image to 0..255;
   * rounded half to even to integers 0..255;
   * ``MONOCHROME1``: inverted (255 − y), after the VOI, as the INVERSE presentation LUT;
   * colour (RGB after pydicom's YBR → RGB): ITU-R 601-2 luma as Pillow's ``convert("L")``
     (8-bit: exactly Pillow's), scaled from 2^BitsStored − 1 to 255, rounded likewise.

No pixel data and no header value other than sizes, codes and names ever appear in a message.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from xrayfed.common.errors import UserError

_ALLOWED = "allowed: PNG, JPEG or DICOM radiographs"
#: Modality values of a projection radiograph (computed, digital, conventional radiography) and
#: OT ("other", e.g. a digitised film) for grayscale images. A file without Modality is accepted.
RADIOGRAPH_MODALITIES = ("CR", "DX", "RG", "OT")
#: Modalities whose colour (RGB/YBR) images are still radiographs (converted to grey).
COLOUR_RADIOGRAPH_MODALITIES = ("CR", "DX", "RG")
_MODALITY_NAMES = {
    "CT": "computed tomography", "MR": "magnetic resonance", "US": "ultrasound", "NM": "nuclear medicine",
    "PT": "positron emission tomography", "MG": "mammography", "XA": "X-ray angiography",
    "RF": "fluoroscopy", "PX": "panoramic dental X-ray", "IO": "intra-oral X-ray", "ES": "endoscopy",
    "OP": "ophthalmic photography", "SM": "slide microscopy", "XC": "external camera photography",
    "SR": "structured report", "DOC": "document", "SEG": "segmentation", "RTIMAGE": "radiotherapy image",
}
_GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
#: The pydicom plugins xrayfed installs, and what each decodes (the install hint of a refusal).
DECODER_PACKAGES = {
    "pylibjpeg-libjpeg": "JPEG Baseline/Extended (8 and 12 bit), JPEG Lossless (Process 14, SV1)",
    "pyjpegls": "JPEG-LS lossless and near-lossless",
    "pylibjpeg-openjpeg": "JPEG 2000 and High-Throughput JPEG 2000",
    "pylibjpeg-rle": "RLE Lossless (faster; pydicom decodes RLE without it)",
}
_INSTALL = "pip install pylibjpeg " + " ".join(DECODER_PACKAGES)
_CONVERT = "or convert it to uncompressed DICOM (gdcmconv --raw IN OUT, or dcmtk's dcmdjpeg/dcmdjpls/dcmdrle IN OUT)"
_SEQUENTIAL_JPEG = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")  # JPEG Baseline, JPEG Extended


# ----------------------------------------------------------------------------- quiet pydicom
_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved = logging.NOTSET


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom's loggers (ERROR lines with tracebacks when a decoder plugin fails) and its Python
    warnings are silenced inside the block: the one line a failing file gets is xrayfed's own."""
    global _quiet_depth, _quiet_saved
    logger = logging.getLogger("pydicom")
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_saved = logger.level
            logger.setLevel(logging.CRITICAL + 1)
        _quiet_depth += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                logger.setLevel(_quiet_saved)


# ----------------------------------------------------------------------------- header
def short_reason(e: BaseException, path: Path | None = None) -> str:
    """A short, pixel-free reason: the exception type and the first line of its message."""
    msg = str(e).splitlines()[0] if str(e) else ""
    if path is not None:
        msg = msg.replace(str(path), path.name).replace(str(path.resolve()), path.name)
    msg = msg[:100]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def has_dicom_preamble(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_dicom(path: Path, *, pixels: bool = True):
    """The pydicom dataset of ``path`` (without its pixel data unless ``pixels``); a one-line
    :class:`UserError` when it is not readable DICOM."""
    import pydicom

    force = not has_dicom_preamble(path)  # a .dcm without the 128-byte preamble + 'DICM'
    try:
        with quiet_pydicom():
            return pydicom.dcmread(str(path), force=force, stop_before_pixels=not pixels)
    except Exception as e:  # noqa: BLE001 - anything pydicom raises means: not a readable DICOM file
        raise UserError(f"{path.name}: not a readable DICOM file ({short_reason(e, path)}); {_ALLOWED}") from None


def dicom_int(ds, keyword: str, default: int, path: Path) -> int:
    """The integer header attribute ``keyword`` of ``ds`` (``default`` when absent or empty);
    a one-line UserError when it is not a non-negative integer."""
    try:
        v = ds.get(keyword, None)
        v = default if v is None or v == "" else v
        out = int(v)
    except Exception:  # noqa: BLE001 - a malformed header value (text, a list, an unparsable number)
        raise UserError(f"{path.name}: DICOM header {keyword} is not an integer; {_ALLOWED}") from None
    if out < 0:
        raise UserError(f"{path.name}: DICOM header {keyword} = {out} is negative; {_ALLOWED}")
    return out


def dicom_pixel_count(ds, path: Path, max_pixels: int) -> int:
    """Pixels the DICOM dataset ``ds`` declares: Rows × Columns × frames × samples per pixel,
    read from the header only. A one-line UserError when a factor is malformed, zero, or the
    product exceeds ``max_pixels``."""
    rows, cols = dicom_int(ds, "Rows", 0, path), dicom_int(ds, "Columns", 0, path)
    frames, samples = dicom_int(ds, "NumberOfFrames", 1, path), dicom_int(ds, "SamplesPerPixel", 1, path)
    n = rows * cols * max(frames, 1) * max(samples, 1)
    if rows == 0 or cols == 0:
        raise UserError(f"{path.name}: DICOM header declares {cols}×{rows} px (Columns × Rows); {_ALLOWED}")
    if n > max_pixels:
        raise UserError(f"{path.name}: DICOM header declares {cols}×{rows} px × {max(frames, 1)} frame(s) × "
                        f"{max(samples, 1)} sample(s) = {n:,} pixels; at most {max_pixels:,} are allowed")
    return n


def _text(ds, keyword: str) -> str:
    v = ds.get(keyword, None)
    return "" if v is None else str(v).strip().upper()


def transfer_syntax(ds) -> tuple[str, str]:
    """``(UID, name)`` of the dataset's transfer syntax (``("", "unknown transfer syntax")``)."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        return "", "unknown transfer syntax"
    name = getattr(ts, "name", "") or str(ts)
    return str(ts), name if name != str(ts) else f"transfer syntax {ts}"


def check_radiograph(ds, path: Path) -> None:
    """One-line :class:`UserError` unless the header describes one 2-D radiograph (module rules)."""
    frames = dicom_int(ds, "NumberOfFrames", 1, path) or 1
    if frames != 1:
        raise UserError(f"{path.name}: multi-frame DICOM ({frames} frames: a series, cine or tomosynthesis stack, "
                        "not one radiograph); one 2-D radiograph per file is allowed")
    modality = _text(ds, "Modality")
    if modality and modality not in RADIOGRAPH_MODALITIES:
        what = _MODALITY_NAMES.get(modality)
        raise UserError(f"{path.name}: DICOM Modality {modality}{f' ({what})' if what else ''} is not a radiograph; "
                        f"allowed Modality: {', '.join(RADIOGRAPH_MODALITIES)} (or none)")
    photometric = _text(ds, "PhotometricInterpretation") or "MONOCHROME2"
    samples = dicom_int(ds, "SamplesPerPixel", 1, path)
    if photometric in _GREY and samples == 1:
        return
    if photometric in _COLOUR and samples == 3:
        if modality in COLOUR_RADIOGRAPH_MODALITIES:
            return
        raise UserError(f"{path.name}: a colour ({photometric}) DICOM image with Modality {modality or 'none'} is a "
                        "secondary capture, not a radiograph; allowed: grayscale (MONOCHROME1/2), or colour with "
                        f"Modality {', '.join(COLOUR_RADIOGRAPH_MODALITIES)}")
    raise UserError(f"{path.name}: DICOM photometric interpretation {photometric} with {samples} sample(s) per pixel "
                    "is not supported; allowed: MONOCHROME1/2 (one sample), or RGB/YBR (three) for a radiograph")


# ----------------------------------------------------------------------------- decoding
def _segments(stream: bytes) -> Iterator[tuple[int, int, int]]:
    """``(marker, offset of its length field, length)`` of each marker segment of a JPEG
    stream, skipping entropy-coded data (stuffed bytes, restart markers)."""
    i, n = 2, len(stream)  # after SOI
    while i + 3 < n:
        if stream[i] != 0xFF:
            i += 1
            continue
        m = stream[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x00 or 0xD0 <= m <= 0xD7 or m in (0x01, 0xD8):  # stuffed byte, RSTn, TEM, SOI
            i += 2
            continue
        if m == 0xD9:  # EOI
            return
        length = int.from_bytes(stream[i + 2:i + 4], "big")
        yield m, i + 2, length
        i += 2 + length


def fix_sequential_scan_header(stream: bytes) -> bytes | None:
    """A sequential-DCT JPEG stream (SOF0/SOF1) whose scan header (SOS) says spectral selection
    ``Ss..Se`` other than 0..63, with it set to 0..63 and successive approximation to 0 — the only
    values the standard allows there, which decoders such as libjpeg enforce; None when there is
    nothing to fix (another process, or a conforming header)."""
    if stream[:2] != b"\xff\xd8":
        return None
    out = bytearray(stream)
    sequential, fixed = False, False
    for marker, at, length in _segments(stream):
        if marker in (0xC0, 0xC1):
            sequential = True
        elif marker == 0xDA and sequential:
            ns = stream[at + 2]
            ss_at = at + 3 + 2 * ns
            if ss_at + 2 < len(stream) and tuple(stream[ss_at:ss_at + 3]) != (0, 63, 0):
                out[ss_at:ss_at + 3] = b"\x00\x3f\x00"
                fixed = True
    return bytes(out) if fixed else None


def _repaired(ds):
    """``ds`` with each frame's sequential-JPEG scan header corrected, or None (nothing to fix)."""
    from pydicom.encaps import encapsulate, generate_frames

    uid, _ = transfer_syntax(ds)
    if uid not in _SEQUENTIAL_JPEG or "PixelData" not in ds:
        return None
    try:
        frames = list(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:  # noqa: BLE001 - not encapsulated as it should be: nothing this can fix
        return None
    fixed = [fix_sequential_scan_header(f) for f in frames]
    if not any(f is not None for f in fixed):
        return None
    ds.PixelData = encapsulate([f if f is not None else o for f, o in zip(fixed, frames)])
    return ds


def _plugin_reason(e: BaseException) -> str:
    """The first plugin's reason in pydicom's "exceptions were raised by all available plugins"
    message (else the first line), cut to 120 characters."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    reason = lines[1] if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else type(e).__name__)
    return reason[:120]


def _cannot_decode(path: Path, ds, e: BaseException) -> UserError:
    uid, name = transfer_syntax(ds)
    label = f"{name} ({uid})" if uid and name != f"transfer syntax {uid}" else name
    try:
        from pydicom.pixels import get_decoder

        decoder = get_decoder(uid)
    except Exception:  # noqa: BLE001 - no pydicom decoder at all for this transfer syntax
        decoder = None
    if decoder is None:
        return UserError(f"{path.name}: cannot decode DICOM pixel data in {label}: no decoder exists for it in "
                         f"pydicom; convert it to uncompressed DICOM (gdcmconv --raw IN OUT)")
    if not decoder.is_available:
        return UserError(f"{path.name}: cannot decode DICOM pixel data in {label}: no decoder for it is installed; "
                         f"install xrayfed's DICOM decoders ({_INSTALL}) {_CONVERT}")
    return UserError(f"{path.name}: cannot decode DICOM pixel data in {label} (damaged or non-conforming data: "
                     f"{_plugin_reason(e)}); re-export it from the archive {_CONVERT}")


def decode_pixels(ds, path: Path) -> np.ndarray:
    """The stored pixel values of ``ds`` (one frame: (H, W), or (H, W, 3) RGB for colour), decoded
    with pydicom's plugins (module rules); one-line :class:`UserError` when it cannot be."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise UserError(f"{path.name}: DICOM file holds no image (no Pixel Data); {_ALLOWED}")
    uid, _ = transfer_syntax(ds)
    # 8-bit sequential JPEG: Pillow first, the decoder of .jpg files, so that one JPEG stream gives
    # the same pixels in a .jpg and in a DICOM file; then every installed plugin
    plugins = ["pillow", ""] if uid in _SEQUENTIAL_JPEG and dicom_int(ds, "BitsStored", 8, path) <= 8 else [""]
    failure: BaseException | None = None
    with quiet_pydicom():
        for plugin in plugins:
            try:
                ds.pixel_array_options(decoding_plugin=plugin)
                return ds.pixel_array
            except Exception as e:  # noqa: BLE001 - missing plugin, damaged or non-conforming data
                failure = e  # the last attempt, with every plugin, says most
        fixed = _repaired(ds)
        if fixed is not None:
            try:
                return fixed.pixel_array
            except Exception:  # noqa: BLE001 - the correction did not help: report the failure before it
                pass
    raise _cannot_decode(path, ds, failure) from None


# ----------------------------------------------------------------------------- display rules
def _window(x: np.ndarray, center: float, width: float, function: str, path: Path) -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing of modality values ``x`` to display values 0..255 (float)."""
    c, w = float(center), float(width)
    if function == "SIGMOID":
        if not w > 0:
            raise UserError(f"{path.name}: DICOM Window Width {w:g} must be > 0 for SIGMOID")
        return 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if function == "LINEAR_EXACT":
        if not w > 0:
            raise UserError(f"{path.name}: DICOM Window Width {w:g} must be > 0 for LINEAR_EXACT")
        return np.clip(((x - c) / w + 0.5) * 255.0, 0.0, 255.0)
    if not w >= 1:
        raise UserError(f"{path.name}: DICOM Window Width {w:g} must be ≥ 1")
    return np.clip(((x - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0, 0.0, 255.0)


def _first(v) -> float:
    """The first value of a DICOM attribute that may hold several (Window Center/Width)."""
    from pydicom.multival import MultiValue

    return float(v[0]) if isinstance(v, (MultiValue, list, tuple)) else float(v)


def _minmax255(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros(x.shape)
    lo, hi = float(x[finite].min()), float(x[finite].max())
    if not hi > lo:
        return np.zeros(x.shape)
    return np.where(finite, (x - lo) / (hi - lo) * 255.0, 0.0)


def _bits(ds, arr: np.ndarray, path: Path) -> int:
    bits = dicom_int(ds, "BitsStored", 0, path) or dicom_int(ds, "BitsAllocated", 0, path)
    return bits or int(arr.dtype.itemsize * 8)


def _grey_display(ds, arr: np.ndarray, path: Path) -> np.ndarray:
    """Display values 0..255 (float) of a grayscale frame (module rules, before inversion)."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    bits = _bits(ds, arr, path)
    try:
        x = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        if ds.get("VOILUTSequence"):
            lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            y = np.asarray(apply_voi(np.rint(x).astype(np.int64), ds, index=0), dtype=np.float64)
            top = max(2.0 ** lut_bits - 1.0, float(y.max(initial=0.0)))
            return y / top * 255.0
        if ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
            function = _text(ds, "VOILUTFunction") or "LINEAR"
            return _window(x, _first(ds.WindowCenter), _first(ds.WindowWidth), function, path)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - malformed LUT/window attributes
        raise UserError(f"{path.name}: invalid DICOM LUT/window attributes ({short_reason(e, path)})") from None
    rescaled = "ModalityLUTSequence" in ds or float(ds.get("RescaleSlope", 1) or 1) != 1.0 \
        or float(ds.get("RescaleIntercept", 0) or 0) != 0.0
    if bits <= 8 and not rescaled and np.issubdtype(arr.dtype, np.unsignedinteger):
        return np.asarray(arr, dtype=np.float64) * (255.0 / (2.0 ** bits - 1.0))
    return _minmax255(x)


def _luma(rgb: np.ndarray, bits: int) -> np.ndarray:
    """ITU-R 601-2 luma of an (H, W, 3) image as display values 0..255: Pillow's ``convert("L")``
    for 8-bit samples (bit for bit), the same weights scaled from 2^bits − 1 otherwise."""
    if rgb.dtype == np.uint8:
        from PIL import Image

        return np.asarray(Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").convert("L"), dtype=np.float64)
    f = np.asarray(rgb, dtype=np.float64)
    luma = f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114
    return luma * (255.0 / (2.0 ** bits - 1.0))


def _identity_display(ds) -> bool:
    """Whether the display rules leave an 8-bit grayscale frame's stored values as they are
    (MONOCHROME2, 8 bits stored, no rescale, no VOI LUT or window)."""
    try:
        return (_text(ds, "PhotometricInterpretation") or "MONOCHROME2") == "MONOCHROME2" \
            and int(ds.get("SamplesPerPixel", 1) or 1) == 1 and int(ds.get("BitsStored", 8) or 8) == 8 \
            and int(ds.get("PixelRepresentation", 0) or 0) == 0 \
            and "ModalityLUTSequence" not in ds and float(ds.get("RescaleSlope", 1) or 1) == 1.0 \
            and float(ds.get("RescaleIntercept", 0) or 0) == 0.0 and not ds.get("VOILUTSequence") \
            and ds.get("WindowCenter") in (None, "") and ds.get("WindowWidth") in (None, "")
    except Exception:  # noqa: BLE001 - a malformed attribute: the full decode path reports it
        return False


def _scaled_jpeg(ds, draft_side: int) -> np.ndarray | None:
    """An 8-bit grayscale sequential-JPEG frame whose display is its stored values, decoded as a
    ``.jpg`` file with the same ``draft_side`` is (Pillow's DCT scaling to the smallest scale
    that keeps both sides ≥ ``draft_side``), so that one JPEG stream gives one model input in a
    ``.jpg`` and in a DICOM file; None when that does not apply or Pillow cannot decode it."""
    import io

    from PIL import Image
    from pydicom.encaps import generate_frames

    uid, _ = transfer_syntax(ds)
    if uid not in _SEQUENTIAL_JPEG or "PixelData" not in ds or not _identity_display(ds):
        return None
    try:
        frame = next(iter(generate_frames(ds.PixelData, number_of_frames=1)))
        with Image.open(io.BytesIO(frame)) as im:
            if im.format != "JPEG" or im.mode != "L":
                return None
            im.draft("L", (min(draft_side, im.size[0]), min(draft_side, im.size[1])))
            im.load()
            return np.asarray(im, dtype=np.uint8)
    except Exception:  # noqa: BLE001 - not a stream Pillow reads: the plugins' path decodes (or reports) it
        return None


def dicom_display(path: Path, max_pixels: int, draft_side: int | None = None) -> np.ndarray:
    """A DICOM radiograph as uint8 (H, W) display values 0..255 (0 black, 255 white): the header
    checks, decoding and display rules of this module. One-line :class:`UserError` otherwise.

    ``draft_side`` (px, optional): an 8-bit grayscale JPEG Baseline/Extended frame without
    rescale or window may be decoded at 1/2, 1/4 or 1/8 scale keeping both sides ≥ it, exactly
    as :func:`xrayfed.common.preprocess.load_image` decodes a ``.jpg`` file (then H, W are the
    scaled sides)."""
    ds = read_dicom(path)
    check_radiograph(ds, path)
    dicom_pixel_count(ds, path, max_pixels)  # before any pixel data is decoded
    if draft_side is not None:
        with quiet_pydicom():
            scaled = _scaled_jpeg(ds, int(draft_side))
        if scaled is not None:
            return scaled
    arr = decode_pixels(ds, path)
    photometric = _text(ds, "PhotometricInterpretation") or "MONOCHROME2"
    if photometric in _GREY:
        if arr.ndim != 2:
            raise UserError(f"{path.name}: DICOM pixel data has shape {tuple(arr.shape)}; "
                            "one 2-D grayscale frame is allowed")
        with quiet_pydicom():
            y = _rounded(_grey_display(ds, arr, path))
        if photometric == "MONOCHROME1":  # high values are dark: the presentation inverts the VOI output
            y = 255 - y
        return y
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return _rounded(_luma(arr, _bits(ds, arr, path)))
    raise UserError(f"{path.name}: DICOM {photometric} pixel data has shape {tuple(arr.shape)}; "
                    "one colour frame (H, W, 3) is allowed")


def _rounded(y: np.ndarray) -> np.ndarray:
    """Display values rounded half to even to uint8 0..255 (NaN → 0)."""
    y = np.nan_to_num(np.asarray(y, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    return np.rint(np.clip(y, 0.0, 255.0)).astype(np.uint8)
