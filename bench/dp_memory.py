"""Benchmark: peak memory of one hospital's DP training round at 224 px (bar on a GPU: < 0.5 GB).

Runs the hospital's real DP-SGD round (``client.dp.train_private_round``: Opacus
GradSampleModule + BatchMemoryManager, CSPRNG noise) on synthetic 224 px scans with logical
batch 32, and reports peak GPU memory (``torch.cuda.max_memory_allocated``) on CUDA, or the
process's peak RSS on CPU, plus seconds per DP-SGD step.

    ./dev bench dp_memory [--device cuda] [--batch-size 32] [--image-size 224]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--physical-batch", type=int, default=32)
    ap.add_argument("--examples", type=int, default=640)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--input-pool", type=int, default=None,
                    help="XrayNet input pool (default: the project's default_model for --image-size)")
    ap.add_argument("--arch", default="xraynet")
    args = ap.parse_args()

    import torch

    from xrayfed.client.dp import plan_dp, train_private_round
    from xrayfed.common.config import HospitalConfig, load_config
    from xrayfed.common.data import XrayDataset
    from xrayfed.common.model import ModelSpec, build_model, count_parameters, default_model
    from xrayfed.common.prediction import TaskSpec
    from xrayfed.common.synthetic import make_synthetic
    from xrayfed.common.train import resolve_device

    device = resolve_device(args.device)
    task = TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA"))
    images, targets = make_synthetic(args.examples, args.image_size, "binary", seed=0)
    ds = XrayDataset(images, targets, task)
    cfg = load_config(HospitalConfig, None, {
        "training.batch_size": args.batch_size, "training.max_physical_batch_size": args.physical_batch,
        "training.local_epochs": 1.0, "privacy.epsilon": 8.0, "privacy.max_rounds": 5, "hospital.device": args.device})
    plan = plan_dp(cfg, len(ds))
    if args.arch == "xraynet":
        spec = default_model(args.image_size, 1).model_copy(update={"width": args.width})
        if args.input_pool is not None:
            spec = spec.model_copy(update={"input_pool": args.input_pool})
    else:
        spec = ModelSpec(arch=args.arch, num_outputs=1)
    model = build_model(spec)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    out = train_private_round(model, ds, cfg, plan, task, device, lr=0.5)
    secs = time.time() - t0
    res = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__, "arch": args.arch, "params": count_parameters(build_model(spec)), "image_size": args.image_size,
        "batch_size": args.batch_size, "steps": out["steps"], "seconds_per_step": round(secs / out["steps"], 4),
    }
    if device.type == "cuda":
        res["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    res["input_pool"] = spec.input_pool
    res["weight_standardization"] = spec.weight_standardization
    res["scattering"] = spec.scattering
    print(json.dumps(res, indent=2))
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    tag = (f"{args.arch}-{args.image_size}px-pool{spec.input_pool}{'-scatter' if spec.scattering else ''}"
           f"-b{args.batch_size}-{device.type}")
    (out_dir / f"dp-memory-{tag}.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
