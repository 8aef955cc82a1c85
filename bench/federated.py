"""Benchmark: federated DP training, 3 hospitals, non-IID (Dirichlet α over labels).

Runs the real thing (SuperLink + SuperNodes + ServerApp/ClientApp processes on 127.0.0.1 via
``xrayfed server``/``xrayfed client``), once per ε. The product has no DP-off switch, so the
run without DP (the DP overhead ratio) is ``bench/dp_overhead.py``.

Usage::

    ./dev bench federated --data ../shared/data/pneumoniamnist.npz --epsilons 8 1
    ./dev bench federated --data ../shared/data/kermany-cxr-224 --image-size 224 --split patient

Reports test AUC/accuracy (the official test split, touched once per figure), wall time and
peak memory (RSS of all processes, sampled), and writes JSON to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sample_peak_rss(stop: threading.Event, out: dict) -> None:
    me = psutil.Process()
    peak = 0
    while not stop.is_set():
        total = 0
        for p in [me] + me.children(recursive=True):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        peak = max(peak, total)
        time.sleep(0.5)
    out["peak_rss_mb"] = peak / 2**20


def run_once(args, eps: float, out_dir: Path) -> dict:
    import subprocess

    from xrayfed.common.config import FederationConfig, HospitalConfig, dump_toml
    from xrayfed.common.data import load_dataset
    from xrayfed.common.model import ModelSpec
    from xrayfed.common.procs import ProcessGroup, free_port, shared_cpu_env, spawn

    if out_dir.exists():  # a fresh federation: the server would resume an old run dir, hospitals reuse ledgers
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    probe = load_dataset(args.data, split="train", image_size=16)
    port = free_port()
    pool = args.input_pool or (max(1, args.image_size // 56) if args.image_size >= 112 else 1)
    fed = FederationConfig.model_validate({
        "federation": {"name": "bench", "run_dir": str(out_dir / "run"), "rounds": args.rounds,
                       "min_clients": args.hospitals, "lr": args.lr, "strategy": args.strategy},
        "model": ModelSpec(num_outputs=probe.task.num_outputs, width=args.width, input_pool=pool).model_dump(),
        "task": probe.task.to_dict(),
        "image_size": args.image_size,
        "eval": {"path": str(args.data), "split": "test"},
        "network": {"listen": f"127.0.0.1:{port}", "tls": {"insecure": True}},
    })
    fp = out_dir / "federation.toml"
    fp.write_text(dump_toml(fed))
    cli = [sys.executable, "-m", "xrayfed.common.cli"]
    stop, mem = threading.Event(), {}
    sampler = threading.Thread(target=sample_peak_rss, args=(stop, mem), daemon=True)
    t0 = time.time()
    sampler.start()
    with ProcessGroup() as group:
        for i in range(args.hospitals):
            privacy = {"epsilon": eps, "delta": args.delta, "max_rounds": args.rounds,
                       "max_grad_norm": args.clip}
            h = HospitalConfig.model_validate({
                "hospital": {"name": f"hospital-{i}", "state_dir": str(out_dir / f"state-{i}"), "device": args.device},
                "data": {"path": str(args.data), "partition": f"{i}/{args.hospitals}",
                         "partition_scheme": args.split, "dirichlet_alpha": args.alpha, "seed": args.seed},
                "privacy": privacy,
                "training": {"local_epochs": args.local_epochs, "batch_size": args.batch_size,
                             "max_physical_batch_size": args.physical_batch},
            })
            hp = out_dir / f"hospital-{i}.toml"
            hp.write_text(dump_toml(h))
            group.add(spawn(cli + ["client", "--server", f"127.0.0.1:{port}", "--config", str(hp), "--insecure"],
                            log=open(out_dir / f"hospital-{i}.log", "w"), env=shared_cpu_env(args.hospitals)))
        r = subprocess.run(cli + ["server", "--config", str(fp)], capture_output=True, text=True)
    stop.set()
    sampler.join()
    wall = time.time() - t0
    print(r.stdout, file=sys.stderr)
    if r.returncode != 0:
        raise SystemExit(f"xrayfed server failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    rows = [json.loads(l) for l in (out_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    return {
        "epsilon_budget": eps,
        "rounds": len(rows),
        "test_auc": last["eval"]["auc"],
        "test_accuracy": last["eval"]["accuracy"],
        "test_sensitivity": last["eval"].get("sensitivity"),
        "test_specificity": last["eval"].get("specificity"),
        "max_epsilon_spent": last.get("max_epsilon"),
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(mem.get("peak_rss_mb", 0), 0),
        "auc_per_round": [row["eval"]["auc"] for row in rows],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 1.0])
    ap.add_argument("--hospitals", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--physical-batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2.0, help="chosen on validation (in-process FedAvg sweep)")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--input-pool", type=int, default=0,
                    help="XrayNet input average-pool factor (0: image_size // 56 from 112 px up, else 1)")
    ap.add_argument("--strategy", default="fedavg")
    ap.add_argument("--split", default="dirichlet")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    args.data = args.data.resolve()
    args.out = args.out.resolve()
    tag = f"{args.data.stem}-{args.image_size}px" + (f"-pool{args.input_pool}" if args.input_pool else "")
    results = {"data": str(args.data.name), "image_size": args.image_size, "settings": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("data", "out")}}
    base = args.out / f"work-{tag}"
    for eps in args.epsilons:
        res = run_once(args, eps, base / f"eps{eps:g}")
        print(json.dumps(res), flush=True)
        results[f"eps{eps:g}"] = res
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"federated-{tag}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
