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
* DICOM: the file's own display rules give display values 0..255, the pixels a viewer exporting
  the scan as an 8-bit JPEG/PNG would write (:mod:`xrayfed.common.dicom`): Modality LUT (Rescale
  Slope/Intercept), then the VOI LUT or Window Center/Width (output 0..255); without one, an 8-bit
  image's stored value itself (so the same pixels as DICOM and as PNG give the same model input)
  and a deeper image min–max stretched; MONOCHROME1 inverted; colour → luma as above; rounded to
  integers, then / 255. Multi-frame, non-radiograph (CT, MR, ...) and colour secondary-capture
  files are refused with the reason.

:func:`preprocessing_spec` states all of it as data (the exported model's metadata).

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

from xrayfed.common import dicom as _dicom
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
    return _dicom.has_dicom_preamble(path)


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
def read_dicom(path: Path, *, pixels: bool = True):
    """The pydicom dataset of ``path`` (:func:`xrayfed.common.dicom.read_dicom`)."""
    return _dicom.read_dicom(path, pixels=pixels)


def dicom_pixel_count(ds, path: Path) -> int:
    """Pixels the DICOM dataset ``ds`` declares (Rows × Columns × frames × samples per pixel,
    from the header only); a one-line UserError above :data:`MAX_SCAN_PIXELS`."""
    return _dicom.dicom_pixel_count(ds, path, MAX_SCAN_PIXELS)


def _load_dicom(path: Path, size_hint: int | None = None) -> np.ndarray:
    """A DICOM radiograph's display values (:func:`xrayfed.common.dicom.dicom_display`, 0..255) / 255;
    an 8-bit grey JPEG frame is decoded with the DCT scaling a ``.jpg`` file gets (``size_hint``)."""
    side = None if size_hint is None else JPEG_DRAFT_FACTOR * int(size_hint)
    return _dicom.dicom_display(path, MAX_SCAN_PIXELS, side).astype(np.float32) / np.float32(255.0)


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
                req = im.size if size_hint is None else (JPEG_DRAFT_FACTOR * size_hint,) * 2
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
        raise UserError(f"{path.name}: not a readable image ({_dicom.short_reason(e, path)}); {_ALLOWED}") from None


# ----------------------------------------------------------------------------- public API
def load_image(path: Path | str, *, size_hint: int | None = None) -> np.ndarray:
    """Decode a scan file to float32 (H, W) grayscale in [0, 1] (0 black, 1 white).

    DICOM is recognised by content (``DICM`` at byte 128) or by a ``.dcm``/``.dicom``
    extension; everything else must be PNG or JPEG. ``size_hint`` (px, optional): the side the
    caller will resize to — JPEGs (and 8-bit grey JPEG frames of a DICOM file, alike) may then be
    decoded at 1/2, 1/4 or 1/8 scale, never below
    2 × ``size_hint`` (the result differs from a full decode by less than the resize blurs).
    Raises a one-line :class:`UserError` for missing, non-image, truncated, multi-frame or
    otherwise unsupported files, and for images smaller than 8 × 8 px.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"scan: no file at {path}")
    img = _load_dicom(path, size_hint) if is_dicom(path) else _load_raster(path, size_hint)
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


#: The JPEG decoder's DCT scaling keeps both sides at least this many times the model input side.
JPEG_DRAFT_FACTOR = 2


def preprocessing_spec(size: int, channels: int = 1) -> dict:
    """The whole preprocessing of a scan file into the model input of side ``size`` px, as data
    (JSON-serialisable): what a hospital's own inference stack must do to match
    :func:`prepare_scan` (the exported model's metadata carries it)."""
    size = int(size)
    return {
        "reference": "xrayfed.common.preprocess.prepare_scan",
        "decode": {
            "png_jpeg": ("Pillow; an 8-bit image's values are its display values 0..255; a 16-bit, 32-bit or float "
                         "PNG is min-max stretched to 0..255 (float, not rounded)"),
            "jpeg_dct_scaling": {"factor": JPEG_DRAFT_FACTOR, "how": (
                "JPEG files are decoded as grey (the JPEG's own luma) at the smallest DCT scale (1, 1/2, 1/4 or 1/8) "
                "that keeps both sides >= factor x size: Pillow Image.draft('L', (min(factor*size, width), "
                "min(factor*size, height))) before load(); so is the frame of an 8-bit grayscale DICOM in JPEG "
                "Baseline/Extended whose display rules leave its values as stored (MONOCHROME2, no rescale, "
                "no VOI LUT or window)")},
            "dicom": {
                "reject": ["NumberOfFrames > 1",
                           f"Modality other than {', '.join(_dicom.RADIOGRAPH_MODALITIES)} (or none)",
                           "colour (RGB/YBR) unless Modality is "
                           + ", ".join(_dicom.COLOUR_RADIOGRAPH_MODALITIES),
                           "PhotometricInterpretation other than MONOCHROME1/2, RGB, YBR_*"],
                "steps": [
                    "modality LUT: Rescale Slope/Intercept, or the Modality LUT Sequence",
                    "VOI: the first VOI LUT Sequence item, its output scaled from 2^LUTDescriptor[2] - 1 to 255",
                    "else the first Window Center c / Width w (PS3.3 C.11.2.1.2, output 0..255): "
                    "LINEAR y = clip(((x - (c - 0.5)) / (w - 1) + 0.5) * 255, 0, 255); "
                    "LINEAR_EXACT y = clip(((x - c) / w + 0.5) * 255, 0, 255); "
                    "SIGMOID y = 255 / (1 + exp(-4 (x - c) / w))",
                    "else, 8 bits stored and no rescale: y = stored value * 255 / (2^BitsStored - 1)",
                    "else min-max of the image to 0..255",
                    "round half to even to integers 0..255",
                    "MONOCHROME1: y = 255 - y",
                    "colour (RGB; YBR converted to RGB): luma as for PNG (16-bit samples: the same weights, "
                    "scaled from 2^BitsStored - 1 to 255, then rounded half to even)",
                ],
            },
        },
        "grayscale": "ITU-R 601-2 luma, Pillow convert('L'): L = R*299/1000 + G*587/1000 + B*114/1000",
        "to_uint8": "display value (0..255) rounded half to even to uint8, before resizing",
        "resize": {"size": [size, size], "filter": "bilinear", "antialias": True, "keep_aspect_ratio": False,
                   "how": "Pillow Image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None) "
                          "on the uint8 image (mode L); output uint8"},
        "scale": 255.0,
        "normalize": {"mean": 0.5, "std": 0.5, "how": "x = (uint8 / scale - mean) / std, float32, in [-1, 1]"},
        "channels": {"count": int(channels), "how": "the grey image repeated on every input channel"},
        "layout": "NCHW float32: (batch, channels, size, size)",
    }
