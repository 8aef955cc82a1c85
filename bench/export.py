"""Benchmark: exported models, FP32 vs static INT8 (``xrayfed export [--int8]``).

For each format (ONNX in onnxruntime, TorchScript in PyTorch) the checkpoint is exported through
the product's own code (``client.export.export_model``) as FP32 and as INT8 (calibrated on
``--calibration-scans`` training scans; the INT8 export itself scores FP32 and INT8 on the test
split — read once per format, the figures reported). Then every exported file is loaded back
the way a consumer would and timed on real test scans: median latency at batch 1 and batch 32
over ``--repeats`` runs, FP32 and INT8 interleaved in the same loop so their ratio holds when
the machine is shared. File sizes and the load average are recorded.

PyTorch's quantized kernels and onnxruntime's default package run on CPU; with ``--device cuda``
the FP32 TorchScript model is also timed on the GPU (INT8 on CUDA would need TensorRT or
onnxruntime-gpu, which this project does not ship).

    ./dev bench export --checkpoint CKPT --data ../shared/data/kermany-cxr-224 [--out bench/results/...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _timer(fn, x, repeats: int) -> list[float]:
    fn(x)  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--calibration-scans", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda to also time FP32 TorchScript on the GPU")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from xrayfed.client import export as E
    from xrayfed.common.security.atrest import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint, None)
    report: dict = {"checkpoint": str(args.checkpoint), "data": str(args.data), "model": ckpt.model.model_dump(),
                    "image_size": ckpt.image_size, "task": ckpt.task.to_dict(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "onnxruntime": ort.__version__, "threads": torch.get_num_threads(),
                    "load_avg_start": os.getloadavg(), "repeats": args.repeats, "formats": {}}
    _, test = E.held_out(ckpt, args.data)
    x = torch.stack([test[i][0] for i in range(min(64, len(test)))])
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in E.FORMATS:
            f32, f8 = Path(tmp, f"fp32.{fmt}"), Path(tmp, f"int8.{fmt}")
            r32 = E.export_model(ckpt, fmt, f32, data=args.data)
            t0 = time.perf_counter()
            r8 = E.export_model(ckpt, fmt, f8, data=args.data, int8=True, calibration_scans=args.calibration_scans)
            quantize_s = time.perf_counter() - t0
            if fmt == "onnx":
                runners = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in
                           (("fp32", f32), ("int8", f8))}
                run = {k: (lambda b, s=s: s.run(None, {"scan": b.numpy()})) for k, s in runners.items()}
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mods = {k: torch.jit.load(str(p)).eval() for k, p in (("fp32", f32), ("int8", f8))}

                def _call(b, m):
                    with torch.no_grad():
                        return m(b)
                run = {k: (lambda b, m=m: _call(b, m)) for k, m in mods.items()}
            lat: dict = {}
            for bs in (1, 32):
                xb = x[:bs]
                times = {"fp32": [], "int8": []}
                for _ in range(max(1, args.repeats // 10)):  # interleaved blocks: both see the same load
                    for k in ("fp32", "int8"):
                        times[k] += _timer(run[k], xb, 10)
                for k in times:
                    lat[f"{k}_batch{bs}_ms"] = 1e3 * statistics.median(times[k])
                lat[f"speedup_batch{bs}"] = lat[f"fp32_batch{bs}_ms"] / lat[f"int8_batch{bs}_ms"]
            c = r8["int8"]
            report["formats"][fmt] = {
                "fp32_bytes": r32["bytes"], "int8_bytes": r8["bytes"], "size_ratio": r32["bytes"] / r8["bytes"],
                "fp32_max_abs_diff_vs_checkpoint": r32["max_abs_diff"], "quantize_and_check_s": quantize_s,
                "test_split": r8["split"], "test_scans": c["scans"], "calibration_scans": r8["calibration_scans"],
                "test_auc_fp32": c["fp32"]["auc"], "test_auc_int8": c["int8"]["auc"], "auc_drop": c["auc_drop"],
                "test_accuracy_fp32": c["fp32"]["accuracy"], "test_accuracy_int8": c["int8"]["accuracy"],
                "decision_agreement": c["agreement"], "max_abs_prob_diff": c["max_abs_prob_diff"],
                "cpu_latency": lat,
            }
            if args.device == "cuda" and fmt == "torchscript":
                if torch.cuda.is_available():
                    m = mods["fp32"].cuda()
                    for bs in (1, 32):
                        xb = x[:bs].cuda()

                        def _cuda(b, m=m):
                            with torch.no_grad():
                                m(b)
                            torch.cuda.synchronize()
                        report["formats"][fmt].setdefault("cuda_latency", {})[f"fp32_batch{bs}_ms"] = \
                            1e3 * statistics.median(_timer(_cuda, xb, args.repeats))
                    report["cuda_device"] = torch.cuda.get_device_name()
                else:
                    report["cuda"] = "not measured: no CUDA device"
            print(fmt, json.dumps(report["formats"][fmt], indent=1), flush=True)
    report["load_avg_end"] = os.getloadavg()
    name = f"export-{args.data.name.removesuffix('.npz')}-{ckpt.image_size}px.json"
    out = args.out or Path(__file__).parent / "results" / name
    out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
