"""``xrayfed export CHECKPOINT --format onnx|torchscript --out FILE``: the global model for a
hospital's own inference stack, usable without xrayfed.

The exported file carries what a consumer needs besides the weights, as JSON metadata
(:func:`export_metadata`): the preprocessing (grayscale → resize to ``image_size`` → uint8 →
``(x / 255 − 0.5) / 0.5``), the input shape, the task (binary: one logit, sigmoid; multi-class:
softmax; multi-label: sigmoid per label), the class names, the decision threshold and the model
version. ONNX stores it in ``metadata_props["xrayfed"]``, TorchScript in the extra file
``xrayfed.json``.

Every export verifies itself before it is kept: the exported model's outputs on real scans
(the hospital's own, ``--data``; synthetic scans otherwise) must equal the checkpoint's within
``1e-4``; ONNX is run with onnxruntime when it is installed, else with ONNX's reference
evaluator. A file that fails the check is deleted and the command ends with one line.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from xrayfed.common.checkpoint import Checkpoint
from xrayfed.common.errors import UserError
from xrayfed.common.files import atomic_write

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4  # max |Δ logit| between the exported model and the checkpoint (FP32)
METADATA_KEY = "xrayfed"
VERIFY_SCANS = 32


def _operating_point(ckpt: Checkpoint) -> float | list[float] | None:
    """The checkpoint's decision threshold(s): one number (binary), one per label (multi-label;
    0.5 each without a stored threshold) or None (multi-class: the most probable class)."""
    if ckpt.task.kind == "multiclass":
        return None
    if ckpt.threshold is None:
        return 0.5
    return ckpt.threshold[0] if ckpt.task.kind == "binary" else list(ckpt.threshold)


def export_metadata(ckpt: Checkpoint, threshold: float | None = None) -> dict:
    """What a consumer of the exported model needs besides the weights (JSON-serialisable)."""
    return {
        "format_version": 1,
        "model_version": ckpt.model_version,
        "architecture": ckpt.model.model_dump(mode="json"),
        "task": ckpt.task.to_dict(),
        "output": {"binary": "1 logit: P(class_names[1]) = sigmoid(logit)",
                   "multiclass": "one logit per class: softmax",
                   "multilabel": "one logit per label: sigmoid each"}[ckpt.task.kind],
        "decision_threshold": float(threshold) if threshold is not None else _operating_point(ckpt),
        "input": {"name": "scan", "shape": ["batch", int(ckpt.model.in_channels), int(ckpt.image_size),
                                            int(ckpt.image_size)], "dtype": "float32"},
        "preprocessing": ("grayscale (DICOM: modality + VOI LUT, MONOCHROME1 inverted) → resize to "
                          f"{ckpt.image_size}×{ckpt.image_size} → uint8 → (x / 255 − 0.5) / 0.5 "
                          "(xrayfed.common.preprocess.prepare_scan)"),
        "round": int(ckpt.round),
    }


def verification_scans(ckpt: Checkpoint, data: Path | None, n: int = VERIFY_SCANS) -> torch.Tensor:
    """Model inputs for the self-check: ``n`` of the hospital's scans (``data``), else synthetic."""
    size, ch = int(ckpt.image_size), int(ckpt.model.in_channels)
    if data is not None:
        from xrayfed.common.data import load_dataset

        ds = load_dataset(Path(data), split="train", image_size=size)
        idx = np.linspace(0, len(ds) - 1, num=min(n, len(ds))).astype(int)
        x = torch.stack([ds[int(i)][0] for i in idx])
    else:
        from xrayfed.common.preprocess import normalize
        from xrayfed.common.synthetic import make_synthetic

        imgs, _ = make_synthetic(n, size, "binary", seed=0)
        x = normalize(torch.as_tensor(imgs))
    return x.repeat(1, ch, 1, 1) if ch > 1 and x.shape[1] == 1 else x


def _to_onnx(model, example: torch.Tensor, meta: dict) -> bytes:
    import io

    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript-based exporter warns that it is deprecated
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, dynamo=False, input_names=["scan"], output_names=["logits"],
                          dynamic_axes={"scan": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    proto = onnx.load_from_string(buf.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    return proto.SerializeToString()


def _to_torchscript(model, example: torch.Tensor, meta: dict) -> bytes:
    import io

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(model, example)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf, _extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})
    return buf.getvalue()


def run_exported(path: Path, fmt: str, x: torch.Tensor) -> np.ndarray:
    """Outputs of an exported file on ``x``, read back from disk the way a consumer would."""
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, not gone
            return torch.jit.load(str(path)).eval()(x).numpy()
    try:
        import onnxruntime as ort  # noqa: F401
    except ImportError:
        import onnx
        from onnx.reference import ReferenceEvaluator

        return np.asarray(ReferenceEvaluator(onnx.load(str(path))).run(None, {"scan": x.numpy()})[0])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"scan": x.numpy()})[0])


def read_metadata(path: Path, fmt: str) -> dict:
    """The metadata an exported file carries (see :func:`export_metadata`)."""
    if fmt == "torchscript":
        extra = {f"{METADATA_KEY}.json": ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.load(str(path), _extra_files=extra)
        return json.loads(extra[f"{METADATA_KEY}.json"])
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(props[METADATA_KEY])


def export_model(ckpt: Checkpoint, fmt: str, out: Path, *, data: Path | None = None, force: bool = False) -> dict:
    """Export ``ckpt`` as ``fmt`` to ``out`` and verify it; returns ``{"path", "format",
    "max_abs_diff", "scans", "bytes"}``. Nothing is left at ``out`` when the check fails."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: allowed are {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    model = ckpt.build(plain=True)  # weight standardisation folded: plain convolutions
    x = verification_scans(ckpt, data)
    meta = export_metadata(ckpt)
    blob = (_to_onnx if fmt == "onnx" else _to_torchscript)(model, x[:1], meta)
    atomic_write(out, blob, mode=0o600)
    with torch.no_grad():
        want = ckpt.build()(x).numpy()  # the checkpoint's own model (weight standardisation unfolded)
    got = run_exported(out, fmt, x)
    diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
    if not diff <= TOLERANCE:
        out.unlink(missing_ok=True)
        raise UserError(f"export to {fmt} failed its check: outputs differ from the checkpoint by {diff:.3g} "
                        f"(allowed {TOLERANCE:g}) on {len(x)} scans; nothing was written")
    return {"path": str(out), "format": fmt, "max_abs_diff": diff, "scans": int(len(x)), "bytes": len(blob)}


def run_export_cmd(args: argparse.Namespace) -> int:
    from xrayfed.common.security.atrest import load_checkpoint, load_key

    ckpt = load_checkpoint(args.checkpoint, load_key(args.atrest_key_file))
    res = export_model(ckpt, args.format, args.out, data=args.data, force=args.force)
    print(f"exported model {ckpt.model_version} ({ckpt.task.kind}, {list(ckpt.task.class_names)}, {ckpt.image_size} px) "
          f"to {res['path']} ({args.format}, {res['bytes'] / 1e6:.2f} MB); verified on {res['scans']} "
          f"{'of your' if args.data else 'synthetic'} scans: max |Δ logit| = {res['max_abs_diff']:.2g} "
          f"(≤ {TOLERANCE:g}); metadata (preprocessing, classes, threshold) under '{METADATA_KEY}'")
    return 0
