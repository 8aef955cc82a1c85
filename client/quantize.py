"""INT8 post-training quantization for ``xrayfed export --int8``, with the ecosystem's tools.

* **ONNX**: onnxruntime's static quantization (``quantize_static``), QDQ format, INT8 weights per
  output channel, UINT8 activations, ranges calibrated (min/max) on the hospital's own scans,
  after onnxruntime's recommended pre-processing (``quant_pre_process``: shape inference and
  graph optimisation). Runs in onnxruntime on CPU (and on any execution provider that reads QDQ).
* **TorchScript**: PyTorch's FX graph-mode static quantization (``torch.ao.quantization``:
  ``prepare_fx`` → calibrate → ``convert_fx``) for the ``x86`` engine (``qnnpack`` on ARM), then
  traced and frozen. PyTorch's quantized kernels run on CPU only.

Static quantization applies to every model xrayfed trains (convolutions, pooling, ReLU,
linear); what it changes is measured, not assumed: :func:`compare` scores the FP32 and the INT8
model on the same held-out scans (macro AUROC, accuracy at the checkpoint's threshold, agreement
of the decided class), and the export is refused when the AUROC drops by more than
:data:`MAX_AUC_DROP`.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from xrayfed.common.errors import UserError
from xrayfed.common.model.scatter_front import ScatterFront
from xrayfed.common.prediction import TaskSpec, compute_metrics, decide, probabilities

MAX_AUC_DROP = 0.005  # the largest macro-AUROC loss on held-out scans an INT8 export may cost
CALIBRATION_SCANS = 300  # scans of the hospital's training data the activation ranges come from
CALIBRATION_BATCH = 25


def quantize_onnx(fp32: bytes, calibration: torch.Tensor, *, fp32_front: bool = False) -> bytes:
    """A static INT8 (QDQ) version of the FP32 ONNX model ``fp32``, its activation ranges
    calibrated on ``calibration`` (N, C, H, W) normalised scans. ``fp32_front``: quantize only
    the convolutions and the head (a ScatterNet model's fixed front end, matrix products and a
    modulus, stays in FP32: it is not the trained part, and 8 bits would blur its small
    second-order coefficients)."""
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quant_pre_process,
            quantize_static,
        )
    except ImportError as e:
        raise UserError("--int8 --format onnx uses onnxruntime's quantization, which is not installed: "
                        "pip install 'xrayfed[export]' (or onnxruntime)") from e

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(calibration[i:i + CALIBRATION_BATCH].numpy()
                                 for i in range(0, len(calibration), CALIBRATION_BATCH))

        def get_next(self):
            b = next(self._batches, None)
            return None if b is None else {"scan": b}

    ort_log = logging.getLogger()  # onnxruntime's quantizer logs advice on the root logger
    level = ort_log.level
    with tempfile.TemporaryDirectory(prefix="xrayfed-int8-") as tmp:
        src, pre, dst = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(fp32)
        try:
            ort_log.setLevel(logging.ERROR)
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            # reduce_range: 7-bit weights. onnxruntime's U8S8 kernels on x86 CPUs without VNNI (AVX2,
            # e.g. this project's AMD EPYC machine) saturate 16-bit sums of 8-bit products; a model
            # exported at one hospital may run on any of its machines, so always quantize for those.
            # Without it a small 4-class model lost 0.011 AUROC here (tests/test_export.py).
            quantize_static(str(pre), str(dst), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv", "Gemm"] if fp32_front else None)
        finally:
            ort_log.setLevel(level)
        return dst.read_bytes()


def quantized_engine() -> str:
    """PyTorch's quantized back end on this CPU: ``x86`` (fbgemm) where built, else ``qnnpack``."""
    engines = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm", "qnnpack"):
        if name in engines:
            return name
    raise UserError(f"--int8 --format torchscript: this PyTorch build has no quantized CPU engine ({engines})")


def quantize_torch(model: torch.nn.Module, calibration: torch.Tensor) -> torch.jit.ScriptModule:
    """``model`` (FP32, eval) statically quantized to INT8 with FX graph mode, traced and frozen.
    A ScatterNet front end is a leaf that FX does not trace into: it stays FP32."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engine = quantized_engine()
    torch.backends.quantized.engine = engine
    model = model.cpu().eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        qmap = get_default_qconfig_mapping(engine).set_object_type(ScatterFront, None)
        prepared = prepare_fx(model, qmap, example_inputs=(calibration[:1],),
                              prepare_custom_config={"non_traceable_module_class": [ScatterFront]})
        for i in range(0, len(calibration), CALIBRATION_BATCH):
            prepared(calibration[i:i + CALIBRATION_BATCH])
        quantized = convert_fx(prepared)
        return torch.jit.freeze(torch.jit.trace(quantized, calibration[:1]))


def compare(task: TaskSpec, threshold, fp32: Callable[[torch.Tensor], np.ndarray],
            int8: Callable[[torch.Tensor], np.ndarray], x: torch.Tensor, targets: np.ndarray,
            batch: int = 64) -> dict:
    """FP32 vs INT8 on the same held-out scans ``x`` with labels ``targets``.

    Returns ``{"scans", "fp32": metrics, "int8": metrics, "auc_drop", "agreement",
    "max_abs_prob_diff"}``; metrics as :func:`~xrayfed.common.prediction.compute_metrics`
    (``auc`` is the macro AUROC), the decided classes at the checkpoint's ``threshold``.
    """
    def run(fn):
        return np.concatenate([np.asarray(fn(x[i:i + batch]), dtype=np.float64) for i in range(0, len(x), batch)])

    a, b = run(fp32), run(int8)
    pa, pb = probabilities(task, a), probabilities(task, b)
    same = [decide(task, p, threshold) == decide(task, q, threshold) for p, q in zip(pa, pb)]
    ma, mb = compute_metrics(task, a, targets, threshold), compute_metrics(task, b, targets, threshold)
    return {"scans": int(len(x)), "fp32": ma, "int8": mb, "auc_drop": float(ma["auc"] - mb["auc"]),
            "agreement": float(np.mean(same)), "max_abs_prob_diff": float(np.abs(pa - pb).max())}


def check_drop(cmp: dict, where: str) -> None:
    """Refuse an INT8 model that costs more than :data:`MAX_AUC_DROP` macro AUROC on ``where``."""
    if not np.isfinite(cmp["fp32"]["auc"]):
        raise UserError(f"--int8: the held-out scans of {where} have a single outcome per class, so the "
                        "AUROC change cannot be measured; pass --data with a test or val split that holds "
                        "both outcomes")
    if not cmp["auc_drop"] <= MAX_AUC_DROP:
        raise UserError(f"--int8: the INT8 model loses {cmp['auc_drop']:.4f} AUROC on {cmp['scans']} held-out scans "
                        f"of {where} (FP32 {cmp['fp32']['auc']:.4f} → INT8 {cmp['int8']['auc']:.4f}; allowed "
                        f"{MAX_AUC_DROP}); nothing was written. Export FP32, or calibrate on more scans "
                        "(--calibration-scans)")
