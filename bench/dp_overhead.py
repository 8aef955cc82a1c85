"""Benchmark: the cost of DP — the same federated training with and without DP-SGD.

The product has no "DP off" switch (a hospital client always trains with DP-SGD), so the
non-private reference runs in one process: the same data partition per hospital (the
hospital client's own partition/validation code), the same model, rounds, local epochs and
logical batch size, FedAvg weighted by example counts, and the same training loop
(``common/train.py``). Only the local step differs:

* DP: ``client.dp.train_private_round`` (Opacus per-sample gradients, clipping to C,
  Gaussian noise from the secure generator, Poisson sampling, BatchMemoryManager), σ derived
  from the hospital's (ε, δ) budget over the planned rounds;
* no DP: plain mini-batch SGD over shuffled batches (no clipping, no noise).

Reported: local-training seconds of each (summed over hospitals and rounds) and their ratio
(the DP overhead), and the final global model's test AUC/accuracy for both (the test split is
read once per figure, after the last round). Learning rates differ on purpose: DP-SGD's
clipped, averaged gradient has norm ≤ C, so it uses a much larger step than plain SGD; the
plain-SGD rate is chosen on the hospitals' validation splits among ``--lr-nodp``.

Usage::

    ./dev bench dp_overhead --data ../shared/data/pneumoniamnist.npz
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Data with no test split of its own (flat class folders, NIH without its lists): the share of its
#: patients held out as this benchmark's test split (asked for explicitly, as a hospital would).
TEST_FRACTION = 0.2


def fedavg(states: list[dict], weights: list[int]) -> dict:
    total = float(sum(weights))
    return {k: sum(s[k].float() * (w / total) for s, w in zip(states, weights)) for k in states[0]}


def run(args, dp: bool, lr: float) -> dict:
    from xrayfed.client.hospital import load_local_data
    from xrayfed.client.dp import plan_dp, train_private_round
    from xrayfed.common.config import HospitalConfig
    from xrayfed.common.data import load_dataset
    from xrayfed.common.model import ModelSpec, build_model
    from xrayfed.common.train import evaluate, make_optimizer, train_epoch

    torch.manual_seed(args.seed)
    probe = load_dataset(args.data, split="train", image_size=16)
    task = probe.task
    spec = ModelSpec(num_outputs=task.num_outputs, width=args.width)
    hospitals, vals = [], []
    for i in range(args.hospitals):
        cfg = HospitalConfig.model_validate({
            "hospital": {"name": f"hospital-{i}", "state_dir": "unused", "device": "cpu"},
            "data": {"path": str(args.data), "partition": f"{i}/{args.hospitals}",
                     "local_test_fraction": TEST_FRACTION,
                     "partition_scheme": args.split, "dirichlet_alpha": args.alpha, "seed": args.seed},
            "privacy": {"epsilon": args.epsilon, "delta": args.delta, "max_rounds": args.rounds,
                        "max_grad_norm": args.clip},
            "training": {"local_epochs": args.local_epochs, "batch_size": args.batch_size,
                         "max_physical_batch_size": args.physical_batch},
        })
        local = load_local_data(cfg, args.image_size, task)
        hospitals.append((cfg, local.train, plan_dp(cfg, len(local.train)) if dp else None))
        vals.append(local.val)
    device = torch.device("cpu")
    global_state = build_model(spec).state_dict()
    seconds = 0.0
    for r in range(args.rounds):
        states, weights = [], []
        for cfg, train, plan in hospitals:
            model = build_model(spec)
            model.load_state_dict(global_state)
            t0 = time.perf_counter()
            if dp:
                train_private_round(model, train, cfg, plan, task, device, lr=lr)
            else:
                opt = make_optimizer(model, cfg.training.optimizer, lr, cfg.training.momentum)
                for _ in range(int(round(args.local_epochs))):
                    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True)
                    train_epoch(model, loader, opt, task, device)
            seconds += time.perf_counter() - t0
            states.append(model.state_dict())
            weights.append(len(train))
        global_state = fedavg(states, weights)
        print(f"{'DP' if dp else 'no DP'} round {r + 1}/{args.rounds}: {seconds:.1f}s of local training so far",
              file=sys.stderr, flush=True)
    model = build_model(spec)
    model.load_state_dict(global_state)
    val = evaluate(model, torch.utils.data.ConcatDataset(vals), task, device)
    out = {"lr": lr, "local_training_s": round(seconds, 1), "val_auc": val["auc"], "_model": model, "_task": task}
    if dp:
        out["noise_multipliers"] = [round(p.noise_multiplier, 3) for _, _, p in hospitals]
    return out


def with_test_metrics(res: dict, test) -> dict:
    """``res`` plus the test metrics of its final global model (test is read once per figure)."""
    from xrayfed.common.train import evaluate

    m = evaluate(res["_model"], test, res["_task"], torch.device("cpu"))
    out = {k: v for k, v in res.items() if not k.startswith("_")}
    out.update(test_auc=m["auc"], test_accuracy=m["accuracy"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--hospitals", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--physical-batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2.0, help="DP-SGD learning rate (as in bench/federated.py)")
    ap.add_argument("--lr-nodp", type=float, nargs="+", default=[0.05, 0.2, 0.5],
                    help="plain SGD learning rates tried; the best on the hospitals' validation splits is reported")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--split", default="dirichlet")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    args.data = args.data.resolve()
    res = {"data": args.data.name, "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                 for k, v in vars(args).items()}}
    from xrayfed.common.data import load_dataset

    dp = run(args, dp=True, lr=args.lr)
    tried = [run(args, dp=False, lr=lr) for lr in args.lr_nodp]
    best = max(tried, key=lambda r: r["val_auc"])
    test = load_dataset(args.data, split="test", image_size=args.image_size, task=dp["_task"],
                        test_fraction=TEST_FRACTION)
    res["dp"] = with_test_metrics(dp, test)
    res["no_dp"] = with_test_metrics(best, test)
    res["no_dp"]["val_auc_per_lr"] = {str(r["lr"]): round(r["val_auc"], 4) for r in tried}
    res["dp_overhead_time_ratio"] = round(res["dp"]["local_training_s"] / max(res["no_dp"]["local_training_s"], 1e-9), 2)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"dp-overhead-{args.data.stem}-{args.image_size}px.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
