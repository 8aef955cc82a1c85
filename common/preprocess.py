"""The one preprocessing path, shared by training and by a patient's scan at inference.

    load_image(path)        → float32 (H, W) grayscale in [0, 1]   (PNG, JPEG, DICOM)
    to_uint8(img, S)        → uint8 (S, S): squashed to a square, bilinear + antialiased, quantised
    normalize(u8)           → float32 tensor (1, S, S) = (u8/255 − 0.5)/0.5, values in [−1, 1]
    load_scan_uint8(p, S)   = to_uint8(load_image(p, size_hint=S), S)
    prepare_scan(p, S)      = normalize(load_scan_uint8(p, S)) with a batch axis → (1, 1, S, S)

Datasets (:mod:`xrayfed.common.data`) decode every file with :func:`load_scan_uint8`, keep the
uint8 scans and call :func:`normalize` per item; a patient's scan goes through
:func:`prepare_scan`. Both are the same functions, so training and inference cannot drift.

Intensity conventions (all outputs: 0 = black, 1 = white, i.e. bone/opacity bright):

* 8-bit PNG/JPEG: value / 255 (colour → ITU-R 601 luma, as PIL ``convert("L")``);
* 16-bit (and 32-bit/float) PNG: min–max stretched to [0, 1] (such files usually hold 10–12-bit
  detector values);
* DICOM: Modality LUT (Rescale Slope/Intercept), then VOI LUT or window centre/width when the
  file has one, MONOCHROME1 inverted, then min–max to [0, 1].

Every failure to read a file is a one-line :class:`~xrayfed.common.errors.UserError` naming the
file (name only) and what is allowed; no pixel data ever appears in a message. A scan may hold at
most :data:`MAX_SCAN_PIXELS` pixels (checked from a DICOM header before its pixel data is decoded).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported where a tensor is made: a patient's process never imports it
    import torch

from xrayfed.common.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
SCAN_SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES
MIN_SIZE = 8  # px: smallest accepted scan side and smallest model input
MAX_IMAGE_SIZE = 2048  # px: largest model input side (``image_size``), in configs and checkpoints alike
#: pixels: the most a scan file may hold — Pillow's decompression-bomb limit, above which it refuses a
#: PNG/JPEG (2 × ``Image.MAX_IMAGE_PIXELS``, about 179 million); a DICOM file's Rows × Columns ×
#: frames × samples per pixel is held to it from its header, before any pixel data is decoded.
MAX_SCAN_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
_ALLOWED = "allowed: PNG, JPEG or DICOM radiographs"
_RASTER_FORMATS = ("PNG", "JPEG", "MPO")  # MPO: multi-picture JPEG, the first picture is used


def is_dicom(path: Path | str) -> bool:
    """True when ``path`` is DICOM by content (``DICM`` at byte offset 128) or by extension."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    return _has_dicom_preamble(path)


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _why(e: BaseException, path: Path | None = None) -> str:
    """A short, pixel-free reason: the exception type and the first line of its message
    (with the file's folder left out)."""
    msg = str(e).splitlines()[0] if str(e) else ""
    if path is not None:
        msg = msg.replace(str(path), path.name).replace(str(path.resolve()), path.name)
    msg = msg[:100]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _minmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.all():
        x = np.where(finite, x, np.nan)
        if not finite.any():
            return np.zeros(x.shape, np.float32)
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    if not hi > lo:
        return np.zeros(x.shape, np.float32)
    out = (x - lo) / (hi - lo)
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


# ----------------------------------------------------------------------------- DICOM
def _dicom_luts():
    try:  # pydicom ≥ 3
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def read_dicom(path: Path, *, pixels: bool = True):
    import pydicom

    force = not _has_dicom_preamble(path)  # a .dcm without the 128-byte preamble + 'DICM'
    try:
        return pydicom.dcmread(str(path), force=force, stop_before_pixels=not pixels)
    except Exception as e:  # noqa: BLE001 - anything pydicom raises means: not a readable DICOM file
        raise UserError(f"{path.name}: not a readable DICOM file ({_why(e, path)}); {_ALLOWED}") from None


def _dicom_int(ds, keyword: str, default: int, path: Path) -> int:
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


def dicom_pixel_count(ds, path: Path) -> int:
    """Pixels the DICOM dataset ``ds`` declares: Rows × Columns × frames × samples per pixel,
    read from the header only. A one-line UserError when a factor is malformed, zero, or the
    product exceeds :data:`MAX_SCAN_PIXELS`."""
    rows, cols = _dicom_int(ds, "Rows", 0, path), _dicom_int(ds, "Columns", 0, path)
    frames, samples = _dicom_int(ds, "NumberOfFrames", 1, path), _dicom_int(ds, "SamplesPerPixel", 1, path)
    n = rows * cols * max(frames, 1) * max(samples, 1)
    if rows == 0 or cols == 0:
        raise UserError(f"{path.name}: DICOM header declares {cols}×{rows} px (Columns × Rows); {_ALLOWED}")
    if n > MAX_SCAN_PIXELS:
        raise UserError(f"{path.name}: DICOM header declares {cols}×{rows} px × {max(frames, 1)} frame(s) × "
                        f"{max(samples, 1)} sample(s) = {n:,} pixels; at most {MAX_SCAN_PIXELS:,} are allowed")
    return n


def _load_dicom(path: Path) -> np.ndarray:
    ds = read_dicom(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise UserError(f"{path.name}: DICOM file holds no image (no Pixel Data); {_ALLOWED}")
    dicom_pixel_count(ds, path)  # before any pixel data is decoded
    frames = _dicom_int(ds, "NumberOfFrames", 1, path) or 1
    if frames != 1:
        raise UserError(f"{path.name}: multi-frame DICOM ({frames} frames) is not supported; "
                        "one 2-D radiograph per file is allowed")
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper().strip()
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - truncated data, missing decoder plugin, bad header...
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", None) or str(ts or "unknown transfer syntax")
        raise UserError(f"{path.name}: cannot decode the DICOM pixel data ({ts_name}; {_why(e, path)}); "
                        f"{_ALLOWED} (uncompressed or a transfer syntax pydicom can decode)") from None
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim != 2:
            raise UserError(f"{path.name}: DICOM pixel data has shape {tuple(arr.shape)}; "
                            "one 2-D grayscale frame is allowed")
        apply_modality_lut, apply_voi_lut = _dicom_luts()
        try:
            x = apply_modality_lut(arr, ds)  # Rescale Slope/Intercept or Modality LUT
            x = apply_voi_lut(x, ds)  # VOI LUT Sequence, else Window Center/Width (when present)
        except Exception as e:  # noqa: BLE001 - malformed LUT/window attributes
            raise UserError(f"{path.name}: invalid DICOM LUT/window attributes ({_why(e, path)})") from None
        x = np.asarray(x, dtype=np.float64)
        if photometric == "MONOCHROME1":  # high stored values are dark: invert
            x = -x
        return _minmax(x)
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420") and arr.ndim == 3 \
            and arr.shape[-1] == 3:
        # pydicom returns RGB for YBR data by default; secondary-capture colour radiographs.
        rgb = np.asarray(arr, dtype=np.float64)
        luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        return _minmax(luma)
    raise UserError(f"{path.name}: DICOM photometric interpretation {photometric or '?'} with pixel shape "
                    f"{tuple(arr.shape)} is not supported; allowed: MONOCHROME1/2 (or RGB) single-frame images")


# ----------------------------------------------------------------------------- PNG / JPEG
def _load_raster(path: Path, size_hint: int | None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.format not in _RASTER_FORMATS:
                raise UserError(f"{path.name}: {im.format or 'unknown'} images are not supported; {_ALLOWED}")
            if getattr(im, "n_frames", 1) > 1 and im.format == "PNG":
                raise UserError(f"{path.name}: animated PNG ({im.n_frames} frames) is not supported; "
                                "one 2-D radiograph per file is allowed")
            if im.format in ("JPEG", "MPO"):
                # Decode luma only; with a size hint let the JPEG decoder downscale by 1/2, 1/4
                # or 1/8 (DCT scaling) while keeping ≥ 2× the target size (then antialiased
                # resize). Training and inference pass the same hint → identical pixels.
                req = im.size if size_hint is None else (2 * size_hint, 2 * size_hint)
                im.draft("L", (min(req[0], im.size[0]), min(req[1], im.size[1])))
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                return _minmax(np.asarray(im))
            if mode not in ("L", "RGB", "RGBA", "LA", "P", "PA", "1", "CMYK", "YCbCr", "La", "RGBa"):
                raise UserError(f"{path.name}: image mode {mode} is not supported; {_ALLOWED} "
                                "(8/16-bit grayscale or 8-bit colour)")
            g = im.convert("L")
            return np.asarray(g, dtype=np.float32) / np.float32(255.0)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, truncated data, decompression bomb...
        raise UserError(f"{path.name}: not a readable image ({_why(e, path)}); {_ALLOWED}") from None


# ----------------------------------------------------------------------------- public API
def load_image(path: Path | str, *, size_hint: int | None = None) -> np.ndarray:
    """Decode a scan file to float32 (H, W) grayscale in [0, 1] (0 black, 1 white).

    DICOM is recognised by content (``DICM`` at byte 128) or by a ``.dcm``/``.dicom``
    extension; everything else must be PNG or JPEG. ``size_hint`` (px, optional): the side the
    caller will resize to — JPEGs may then be decoded at 1/2, 1/4 or 1/8 scale, never below
    2 × ``size_hint`` (the result differs from a full decode by less than the resize blurs).
    Raises a one-line :class:`UserError` for missing, non-image, truncated, multi-frame or
    otherwise unsupported files, and for images smaller than 8 × 8 px.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"scan: no file at {path}")
    img = _load_dicom(path) if is_dicom(path) else _load_raster(path, size_hint)
    if img.ndim != 2 or min(img.shape) < MIN_SIZE:
        raise UserError(f"{path.name}: image of {'×'.join(map(str, img.shape))} px is too small or not 2-D "
                        f"(at least {MIN_SIZE}×{MIN_SIZE} px)")
    return img


def to_uint8(img: np.ndarray, size: int) -> np.ndarray:
    """Resize a (H, W) image to uint8 (size, size).

    ``img``: float in [0, 1] (values outside are clipped, NaN → 0) or uint8 (0–255). The image
    is quantised to uint8 (round half to even), then squashed to a size × size square (aspect
    ratio not kept, like the public datasets) with PIL bilinear resampling, antialiased on
    downscaling. ``size`` ≥ 8 px.
    """
    size = int(size)
    if size < MIN_SIZE:
        raise UserError(f"image_size {size}: must be at least {MIN_SIZE} px")
    a = np.asarray(img)
    if a.ndim != 2:
        raise ValueError(f"to_uint8 expects one (H, W) image, got shape {a.shape}")
    if a.dtype != np.uint8:
        f = np.nan_to_num(np.asarray(a, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        a = np.rint(np.clip(f, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
    if a.shape == (size, size):
        return np.ascontiguousarray(a)
    # reducing_gap=None: the exact (full-support, antialiased) filter, no JPEG-style shortcut.
    out = Image.fromarray(np.ascontiguousarray(a), mode="L").resize((size, size), Image.Resampling.BILINEAR,
                                                                   reducing_gap=None)
    return np.asarray(out, dtype=np.uint8)


def normalize(u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 scan(s) → model input: float32 (u8/255 − 0.5)/0.5 ∈ [−1, 1].

    (S, S) → (1, S, S); a batch (N, S, S) → (N, 1, S, S). Only uint8 is accepted, so an
    already-normalised tensor cannot be normalised twice.
    """
    import torch

    if isinstance(u8, torch.Tensor):
        t = u8
    else:
        a = np.asarray(u8)
        if not (a.flags.writeable and a.flags.c_contiguous):
            a = a.copy()  # torch cannot wrap read-only arrays (e.g. from PIL)
        t = torch.from_numpy(a)
    if t.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 scans (from to_uint8), got {t.dtype}")
    if t.dim() not in (2, 3):
        raise ValueError(f"normalize expects (S, S) or (N, S, S), got shape {tuple(t.shape)}")
    x = t.to(torch.float32).div_(255.0).sub_(0.5).div_(0.5)
    return x.unsqueeze(-3)


def normalize_array(u8: np.ndarray) -> np.ndarray:
    """:func:`normalize` in numpy (float32, same arithmetic): for processes without torch."""
    a = np.asarray(u8)
    if a.dtype != np.uint8:
        raise TypeError(f"normalize expects uint8 scans (from to_uint8), got {a.dtype}")
    x = ((a.astype(np.float32) / np.float32(255.0)) - np.float32(0.5)) / np.float32(0.5)
    return x[..., None, :, :]


def load_scan_uint8(path: Path | str, size: int) -> np.ndarray:
    """A scan file as uint8 (size, size): ``to_uint8(load_image(path, size_hint=size), size)``.

    The single decode step of both training datasets and inference (:func:`prepare_scan`).
    """
    return to_uint8(load_image(path, size_hint=int(size)), size)


def prepare_scan(path: Path | str, size: int) -> torch.Tensor:
    """A patient's scan ready for the model: float32 (1, 1, size, size) in [−1, 1].

    Exactly what a training dataset yields for the same file (plus a batch axis).
    """
    return normalize(load_scan_uint8(path, size)).unsqueeze(0)


def prepare_scan_array(path: Path | str, size: int) -> np.ndarray:
    """:func:`prepare_scan` as a numpy float32 array (1, 1, size, size), without torch."""
    return normalize_array(load_scan_uint8(path, size))[None]


def read_dicom_patient_id(path: Path | str) -> str | None:
    """The DICOM PatientID (0010,0020) of a file (stripped), or None for non-DICOM files and
    DICOM files without one. One-line :class:`UserError` for an unreadable DICOM file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"scan: no file at {path}")
    if not is_dicom(path):
        return None
    ds = read_dicom(path, pixels=False)
    pid = ds.get("PatientID", None)
    pid = str(pid).strip() if pid is not None else ""
    return pid or None
