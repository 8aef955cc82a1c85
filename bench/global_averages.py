"""Probe: averages of the global models over rounds, scored beside the global model of the same run.

A federation (the in-process engine, :func:`xrayfed.server.simulate.simulate`: the real hospital
code, ``auto`` server step) of ``--hospitals`` hospitals on PneumoniaMNIST 28 px, ε = 8 each, is
run for ``--rounds`` rounds; after every round the validation AUC of its global model and of
five averages of the global models so far is recorded (post-processing at the server, no
privacy cost): a constant decay 0.5 (``const0.5``), the warmed-up decay min(0.8, (1+t)/(10+t))
(``warm0.8``), min(0.9, t/(t+3)), and the uniform mean of the last half and of the last quarter
of the rounds (``tail_half``, ``tail_quarter``). One JSON line per seed. Validation only: this
chose nothing on the test split.

    ./dev bench global_averages --seeds 0 1 2     # 100 hospitals, 20 rounds, IID (about 2 min per seed)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def averages(rounds: int) -> dict:
    """Decay ``d(t)`` of each average after round ``t`` (1-based): avg ← d·avg + (1 − d)·model."""
    half, quarter = rounds // 2, 3 * rounds // 4
    return {
        "const0.5": lambda t: 0.5,
        "warm0.8": lambda t: min(0.8, (1 + t) / (10 + t)),
        "t/(t+3)": lambda t: min(0.9, t / (t + 3)),
        "tail_half": lambda t: 0.0 if t <= half else (t - half - 1) / (t - half),
        "tail_quarter": lambda t: 0.0 if t <= quarter else (t - quarter - 1) / (t - quarter),
    }


def run(seed: int, args) -> dict:
    import torch

    import sweep
    from xrayfed.common.data import load_dataset
    from xrayfed.common.model import build_model
    from xrayfed.server.federation import evaluate_global
    from xrayfed.server.simulate import simulate

    s = sweep.default_settings(hospitals=args.hospitals, rounds=args.rounds, split=args.split, alpha=args.alpha,
                               seed=seed, strategy="auto", epsilon=8.0)
    decays = averages(args.rounds)
    probe = load_dataset(args.data, split="train", image_size=8)
    with tempfile.TemporaryDirectory(prefix="xrayfed-averages-") as tmp:
        fed, hospitals = sweep.configs(s, args.data, Path(tmp), probe.task)
        val = load_dataset(fed.eval.path, split="val", image_size=fed.image_size, task=probe.task)

        def score(state) -> float:
            m = build_model(fed.model)
            m.load_state_dict(state)
            return round(evaluate_global(m, fed, None, val, torch.device("cpu"))["metrics"]["val_auc"], 4)

        out: dict = {"raw": [], **{k: [] for k in decays}}
        kept: dict = {k: None for k in decays}

        def on_round(r, state, replies) -> None:
            out["raw"].append(score(state))
            for k, d in decays.items():
                kept[k] = sweep.moving_average(kept[k], state, d(r))
                out[k].append(score(kept[k]))

        t0 = time.time()
        simulate(fed, hospitals, dp=True, on_round=on_round)
    return {"seed": seed, "hospitals": args.hospitals, "rounds": args.rounds, "split": args.split,
            "seconds": round(time.time() - t0, 1), "val_auc_per_round": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "pneumoniamnist.npz")
    ap.add_argument("--hospitals", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--split", default="iid")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "sweeps" / "global-model-averages.jsonl")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        row = run(seed, args)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({"seed": seed, **{k: v[-1] for k, v in row["val_auc_per_round"].items()}}), flush=True)


if __name__ == "__main__":
    main()
