"""``xrayfed export --model CHECKPOINT --format onnx|torchscript --out FILE``: the global model for a
hospital's own inference stack, usable without xrayfed.

The exported file carries what a consumer needs besides the weights, as JSON metadata
(:func:`export_metadata`): the whole preprocessing as data
(:func:`xrayfed.common.preprocess.preprocessing_spec`: decoding of PNG/JPEG/DICOM with the DICOM
display rules, grey conversion, uint8, resize method and size, scale, normalisation mean/std,
channels), the input shape, the task (binary: one logit, sigmoid; multi-class:
softmax; multi-label: sigmoid per label), the class names, the decision threshold and the model
version. ONNX stores it in ``metadata_props["xrayfed"]``, TorchScript in the extra file
``xrayfed.json``.

Every export verifies itself before it is kept: the exported model's outputs on real scans
(the hospital's own, ``--data``; synthetic scans otherwise) must equal the checkpoint's within
``1e-4``; ONNX is run with onnxruntime when it is installed, else with ONNX's reference
evaluator. A file that fails the check is deleted and the command ends with one line.

``--int8`` quantizes statically (:mod:`xrayfed.client.quantize`: onnxruntime for ONNX,
``torch.ao`` for TorchScript), calibrated on up to ``--calibration-scans`` of the hospital's
own training scans (``--data`` is required), and replaces the 1e-4 check by a measured one: the
FP32 and INT8 models are scored on the data's held-out split (``test``, else ``val``) and the
export is refused when the macro AUROC drops by more than 0.005. The figures go into the
metadata (``quantization``) and the command's output.
"""

from __future__ import annotations

import argparse
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from xrayfed.client import quantize as Q
from xrayfed.client.quantize import CALIBRATION_SCANS
from xrayfed.common.checkpoint import Checkpoint
from xrayfed.common.data import load_dataset, targets_array
from xrayfed.common.errors import UserError
from xrayfed.common.files import atomic_write
from xrayfed.common.preprocess import normalize, preprocessing_spec
from xrayfed.common.security.atrest import load_checkpoint, load_key
from xrayfed.common.synthetic import make_synthetic

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
        "format_version": 2,
        "model_version": ckpt.model_version,
        "architecture": ckpt.model.model_dump(mode="json"),
        "task": ckpt.task.to_dict(),
        "output": {"binary": "1 logit: P(class_names[1]) = sigmoid(logit)",
                   "multiclass": "one logit per class: softmax",
                   "multilabel": "one logit per label: sigmoid each"}[ckpt.task.kind],
        "decision_threshold": float(threshold) if threshold is not None else _operating_point(ckpt),
        # sensitivity/specificity per class at that threshold on the server's held-out scans (null: not measured)
        "performance": ckpt.performance if threshold is None else None,
        "input": {"name": "scan", "shape": ["batch", int(ckpt.model.in_channels), int(ckpt.image_size),
                                            int(ckpt.image_size)], "dtype": "float32"},
        "preprocessing": preprocessing_spec(int(ckpt.image_size), int(ckpt.model.in_channels)),
        "round": int(ckpt.round),
    }


def _spread(ds, n: int, ch: int) -> torch.Tensor:
    """``n`` scans of ``ds`` spread evenly over it (reproducible), as model inputs."""
    idx = np.linspace(0, len(ds) - 1, num=min(n, len(ds))).astype(int)
    x = torch.stack([ds[int(i)][0] for i in idx])
    return x.repeat(1, ch, 1, 1) if ch > 1 and x.shape[1] == 1 else x


def _load(ckpt: Checkpoint, data: Path, split: str):
    return load_dataset(Path(data), split=split, image_size=int(ckpt.image_size), task=ckpt.task)


def verification_scans(ckpt: Checkpoint, data: Path | None, n: int = VERIFY_SCANS) -> torch.Tensor:
    """Model inputs for the self-check: ``n`` of the hospital's scans (``data``), else synthetic."""
    size, ch = int(ckpt.image_size), int(ckpt.model.in_channels)
    if data is not None:
        return _spread(_load(ckpt, data, "train"), n, ch)
    else:
        imgs, _ = make_synthetic(n, size, "binary", seed=0)
        x = normalize(torch.as_tensor(imgs))
    return x.repeat(1, ch, 1, 1) if ch > 1 and x.shape[1] == 1 else x


def _to_onnx(model, example: torch.Tensor, meta: dict) -> bytes:

    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript-based exporter warns that it is deprecated
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, dynamo=False, input_names=["scan"], output_names=["logits"],
                          dynamic_axes={"scan": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    return _onnx_with_metadata(buf.getvalue(), meta)


def _onnx_with_metadata(blob: bytes, meta: dict) -> bytes:
    """``blob`` (an ONNX model) with ``meta`` as its only ``metadata_props[METADATA_KEY]``."""
    import onnx

    proto = onnx.load_from_string(blob)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    return proto.SerializeToString()


def _torchscript_with_metadata(module: torch.jit.ScriptModule, meta: dict) -> bytes:
    """``module`` saved as TorchScript with ``meta`` in the extra file ``xrayfed.json``."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, not gone
        torch.jit.save(module, buf, _extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})
    return buf.getvalue()


def _to_torchscript(model, example: torch.Tensor, meta: dict) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(model, example)
    return _torchscript_with_metadata(scripted, meta)


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


def held_out(ckpt: Checkpoint, data: Path):
    """``(split name, dataset)``: the data's test split, else its validation split — scans the
    INT8 check scores both models on."""
    for split in ("test", "val"):
        try:
            return split, _load(ckpt, data, split)
        except UserError:
            continue
    raise UserError(f"--int8: {data} has neither a test nor a val split to measure the INT8 model on")


def _export_int8(ckpt: Checkpoint, fmt: str, out: Path, data: Path | None, calibration_scans: int) -> dict:
    """Quantize, measure on held-out scans, refuse a drop above the bar, then write ``out``."""
    if data is None:
        raise UserError("--int8 calibrates on your own scans and measures the AUROC change on their held-out split: "
                        "pass --data PATH")
    if calibration_scans < 1:
        raise UserError(f"--calibration-scans {calibration_scans}: must be at least 1")
    ch = int(ckpt.model.in_channels)
    train = _load(ckpt, data, "train")
    calib = _spread(train, calibration_scans, ch)
    split, test = held_out(ckpt, data)
    x_test, y_test = _spread(test, len(test), ch), targets_array(test)
    model = ckpt.build(plain=True).eval()
    reference = ckpt.build().eval()
    meta = export_metadata(ckpt)

    def fp32(x):
        with torch.no_grad():
            return reference(x).numpy()

    if fmt == "onnx":
        import onnxruntime as ort

        blob = Q.quantize_onnx(_to_onnx(model, calib[:1], meta), calib, fp32_front=ckpt.model.scattering)
        sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        cmp = Q.compare(ckpt.task, ckpt.threshold, fp32, lambda x: sess.run(None, {"scan": x.numpy()})[0],
                        x_test, y_test)
        tool = f"onnxruntime {ort.__version__} quantize_static: QDQ, INT8 weights per channel, UINT8 activations"
    else:
        scripted = Q.quantize_torch(model, calib)
        with torch.no_grad():
            cmp = Q.compare(ckpt.task, ckpt.threshold, fp32, lambda x: scripted(x).numpy(), x_test, y_test)
        tool = (f"torch {torch.__version__.split('+')[0]} torch.ao FX static quantization, engine "
                f"{Q.quantized_engine()} (CPU only; set torch.backends.quantized.engine to it before loading)")
    where = f"the {split} split of {Path(data).name}"
    Q.check_drop(cmp, where)
    meta["quantization"] = {
        "scheme": "static int8", "tool": tool, "calibration_scans": int(len(calib)),
        "held_out": {"split": split, "scans": cmp["scans"], "auc_fp32": cmp["fp32"]["auc"],
                     "auc_int8": cmp["int8"]["auc"], "accuracy_fp32": cmp["fp32"]["accuracy"],
                     "accuracy_int8": cmp["int8"]["accuracy"], "agreement": cmp["agreement"]},
        "max_auc_drop": Q.MAX_AUC_DROP,
    }
    blob = _onnx_with_metadata(blob, meta) if fmt == "onnx" else _torchscript_with_metadata(scripted, meta)
    atomic_write(out, blob, mode=0o600)
    probe = x_test[:8]  # read back from disk the way a consumer would: the same outputs as measured
    with torch.no_grad():
        want = sess.run(None, {"scan": probe.numpy()})[0] if fmt == "onnx" else scripted(probe).numpy()
    got = run_exported(out, fmt, probe)
    if got.shape != want.shape or not np.allclose(got, want, atol=1e-6):
        out.unlink(missing_ok=True)
        raise UserError(f"export to {fmt} --int8: the file read back differs from the model measured; nothing was written")
    return {"path": str(out), "format": fmt, "int8": cmp, "split": split, "calibration_scans": int(len(calib)),
            "scans": cmp["scans"], "bytes": len(blob)}


def export_model(ckpt: Checkpoint, fmt: str, out: Path, *, data: Path | None = None, force: bool = False,
                 int8: bool = False, calibration_scans: int | None = None) -> dict:
    """Export ``ckpt`` as ``fmt`` to ``out`` and verify it; returns ``{"path", "format",
    "max_abs_diff", "scans", "bytes"}`` (FP32) or ``{"path", "format", "int8", "split",
    "calibration_scans", "scans", "bytes"}`` (``int8``: ``"int8"`` is
    :func:`xrayfed.client.quantize.compare`'s result). Nothing is left at ``out`` when a check fails."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: allowed are {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    if int8:
        return _export_int8(ckpt, fmt, out, data, CALIBRATION_SCANS if calibration_scans is None else calibration_scans)
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
    ckpt = load_checkpoint(args.model, load_key(args.atrest_key_file))
    res = export_model(ckpt, args.format, args.out, data=args.data, force=args.force, int8=args.int8,
                       calibration_scans=args.calibration_scans)
    if args.int8:
        c = res["int8"]
        print(f"exported model {ckpt.model_version} ({ckpt.task.kind}, {list(ckpt.task.class_names)}, "
              f"{ckpt.image_size} px) as static INT8 to {res['path']} ({args.format}, {res['bytes'] / 1e6:.2f} MB), "
              f"calibrated on {res['calibration_scans']} of your training scans; on {c['scans']} scans of your "
              f"{res['split']} split: macro AUROC FP32 {c['fp32']['auc']:.4f} → INT8 {c['int8']['auc']:.4f} "
              f"(drop {c['auc_drop']:+.4f}, allowed ≤ 0.005), accuracy {c['fp32']['accuracy']:.4f} → "
              f"{c['int8']['accuracy']:.4f}, same decision on {100 * c['agreement']:.1f} %")
        return 0
    print(f"exported model {ckpt.model_version} ({ckpt.task.kind}, {list(ckpt.task.class_names)}, {ckpt.image_size} px) "
          f"to {res['path']} ({args.format}, {res['bytes'] / 1e6:.2f} MB); verified on {res['scans']} "
          f"{'of your' if args.data else 'synthetic'} scans: max |Δ logit| = {res['max_abs_diff']:.2g} "
          f"(≤ {TOLERANCE:g}); metadata (preprocessing, classes, threshold) under '{METADATA_KEY}'")
    return 0
