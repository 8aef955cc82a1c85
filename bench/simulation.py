"""Benchmark: how a federation grows with the number of hospitals, and how steady it is.

For each N in ``--hospitals`` (default 3 10 30 100) it runs ``--runs`` fresh federations
(seeds 0, 1, …) of N hospitals on PneumoniaMNIST 28 px (``--data``), split ``--split``
(``iid``, ``dirichlet`` with ``--alpha``, ``patient``), ε = 8 per hospital, every hospital
sampled every round, under ``--strategy`` (default: the product's, ``auto``). Recorded per run:
the test AUC after every round (server-side, the official test split at the threshold chosen
on ``val``, as the ServerApp evaluates each round), the validation AUC after every round, the
round-to-round stability (:func:`xrayfed.server.stability.round_stability`: the lowest AUC and
the largest fall after the first quarter of the run, at most round 5), the server steps
``auto`` took, the hospitals' ε, the model width, and the wall time. Per N (one ``rows`` entry):
the mean and spread over the runs.

The model is the one ``xrayfed simulate`` plans for the N hospitals
(:func:`xrayfed.server.model_plan.recommend_model`: the default XrayNet, narrowed when the DP noise
in the mean update of its ScatterNet head would exceed its largest signal), unless ``--width``
fixes it (``--engine inprocess``); each run records its ``width`` and, when planned, the noise
ratio at both widths (null when unknown).

Engines (``--engine``):

* ``inprocess`` (default): every hospital runs the real hospital code
  (:func:`xrayfed.client.hospital.train_round`: its partition, DP plan, privacy ledger, Opacus
  DP-SGD) in one process, and the server's step is the strategy's
  (:mod:`xrayfed.server.simulate`); no transport. On 2 shared cores it is the only engine that
  affords 3 × 20 rounds × 100 hospitals.
* ``flower``: one fresh ``xrayfed simulate`` process per run (Flower's Simulation Engine, Ray,
  one worker per core, the product's federation defaults), peak memory of the process tree
  sampled every 0.5 s.

One result file per setting: ``bench/results/simulation-DATA-SIZEpx-SPLIT-STRATEGY-ROUNDSr.json``
with top-level ``rounds``, ``split`` and ``rows`` (``hospitals``, ``test_auc``, …, ``runs``).

    ./dev bench simulation --hospitals 100 --rounds 20 --runs 3 --split iid
    ./dev bench simulation --hospitals 100 --rounds 20 --runs 3 --split dirichlet --alpha 0.5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_flower(n: int, seed: int, args, work: Path) -> dict:
    """One ``xrayfed simulate`` process (Flower's Simulation Engine)."""
    from xrayfed.common.procs import venv_bin
    from sweep import has_patient_ids

    out = work / f"n{n}-seed{seed}"
    cmd = [str(venv_bin("xrayfed")), "simulate", "--hospitals", str(n), "--rounds", str(args.rounds),
           "--data", str(args.data), "--epsilon", str(args.epsilon), "--out", str(out), "--split", args.split,
           "--alpha", str(args.alpha)]
    if args.size_skew:
        cmd += ["--size-skew", str(args.size_skew)]
    if not has_patient_ids(Path(args.data)):
        cmd += ["--privacy-unit", "scan"]  # PneumoniaMNIST has no patient ids: figures per scan
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    log = proc.stdout.read()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    th.join(timeout=2)
    if rc != 0:
        raise RuntimeError(f"simulate N={n} failed:\n{log[-3000:]}")
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    per_round = [r["duration_s"] for r in rows]
    sizes = [h["num_examples"] for h in rows[-1]["hospitals"]]
    from xrayfed.common.config import FederationConfig, load_config

    width = load_config(FederationConfig, out / "federation.toml").model.width  # the model simulate planned
    return {"seed": seed, "engine": "flower", "width": width, "wall_s": round(wall, 1),
            "peak_rss_mb": round(peak[0] / 2**20),
            "round_s": per_round, "test_auc_per_round": [r["eval"]["auc"] for r in rows],
            "val_auc_per_round": [r["eval"].get("val_auc") for r in rows],
            "test_accuracy": rows[-1]["eval"]["accuracy"],
            "epsilon_max": max(h["epsilon"] for h in rows[-1]["hospitals"]),
            "units_per_hospital": {"min": min(sizes), "max": max(sizes), "median": statistics.median(sizes)}}


def run_inprocess(n: int, seed: int, args) -> dict:
    """One federation through :func:`xrayfed.server.simulate.simulate` (the real hospital code),
    scored after every round on ``val`` (threshold) and ``test`` as the ServerApp does."""
    import torch

    from xrayfed.common.data import load_dataset
    from xrayfed.common.model import build_model
    from xrayfed.server.federation import evaluate_global
    from xrayfed.server.simulate import planned_model, simulate
    from sweep import configs, default_settings

    s = default_settings(hospitals=n, rounds=args.rounds, image_size=args.image_size, epsilon=args.epsilon,
                         split=args.split, alpha=args.alpha, seed=seed, strategy=args.strategy,
                         privacy_unit=args.privacy_unit, server_momentum=args.server_momentum,
                         server_lr=args.server_lr, width=args.width)
    data = Path(args.data).resolve()
    probe = load_dataset(data, split="train", image_size=8)
    val = test = None
    curve: dict[str, list] = {"test": [], "val": [], "step": []}
    with tempfile.TemporaryDirectory(prefix="xrayfed-bench-sim-") as tmp:
        fed, hospitals = configs(s, data, Path(tmp), probe.task)
        planned: dict = {}
        if args.width is None:  # the model `xrayfed simulate` plans for these hospitals (the product's rule)
            advice = planned_model(fed, hospitals)
            fed = fed.model_copy(update={"model": advice.spec})
            finite = lambda x: x if math.isfinite(x) else None  # noqa: E731 - JSON has no NaN
            planned = {"noise_ratio": finite(advice.ratio), "default_width": advice.given.width,
                       "noise_ratio_at_default_width": finite(advice.given_ratio)}
            print(f"  N={n} seed {seed}: model {advice.describe()}", flush=True)
        val = load_dataset(data, split="val", image_size=fed.image_size, task=probe.task)
        test = load_dataset(data, split="test", image_size=fed.image_size, task=probe.task)
        last: dict = {}

        def on_round(r, state, replies):
            m = build_model(fed.model)
            m.load_state_dict(state)
            ev = evaluate_global(m, fed, test, val, torch.device("cpu"))["metrics"]
            curve["test"].append(round(ev["auc"], 4))
            curve["val"].append(round(ev["val_auc"], 4))
            last.update(accuracy=ev["accuracy"], replies=replies)
            print(f"  N={n} seed {seed} round {r}: val AUC {ev['val_auc']:.3f}, test AUC {ev['auc']:.3f}", flush=True)

        t0 = time.time()
        res = simulate(fed, hospitals, on_round=on_round)
        wall = time.time() - t0
    steps = [row.get("server_step") for row in res.rows]
    sizes = [h["num-examples"] for h in last["replies"]]
    return {"seed": seed, "engine": "inprocess", "width": fed.model.width, **planned, "wall_s": round(wall, 1),
            "test_auc_per_round": curve["test"],
            "val_auc_per_round": curve["val"], "test_accuracy": last["accuracy"],
            "server_steps": [st for st in steps if st][:1] + [st for i, st in enumerate(steps[1:], 1)
                                                               if st and st != steps[i - 1]],
            "epsilon_max": max(float(h.get("epsilon", 0)) for h in last["replies"]),
            "units_per_hospital": {"min": min(sizes), "max": max(sizes), "median": statistics.median(sizes)}}


def summarise(n: int, runs: list[dict]) -> dict:
    from xrayfed.server.stability import round_stability

    for r in runs:
        r["test_auc"] = r["test_auc_per_round"][-1]
        r["stability"] = round_stability(r["test_auc_per_round"]).to_dict()
    out: dict = {"hospitals": n}
    widths = sorted({r["width"] for r in runs if "width" in r})
    if widths:
        out["width"] = widths[0] if len(widths) == 1 else widths
    for k, vals in (("test_auc", [r["test_auc"] for r in runs]),
                    ("min_test_auc_after_settling", [r["stability"]["min_auc"] for r in runs]),
                    ("max_drop", [r["stability"]["max_drop"] for r in runs]),
                    ("std_last_rounds", [r["stability"]["std_last"] for r in runs]),
                    ("wall_s", [r["wall_s"] for r in runs])):
        out[k] = statistics.fmean(vals)
        if len(vals) > 1:
            out[f"{k}_std"] = statistics.stdev(vals)
    out["min_test_auc_after_settling_worst"] = min(r["stability"]["min_auc"] for r in runs)
    out["settling_rounds"] = runs[0]["stability"]["after_round"]
    out["runs"] = runs
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 1, figsize=(6, 3.6))
    for row in report["rows"]:
        for i, r in enumerate(row["runs"]):
            ax.plot(range(1, len(r["test_auc_per_round"]) + 1), r["test_auc_per_round"], f"C{report['rows'].index(row)}",
                    alpha=0.7, label=f"N = {row['hospitals']}" if i == 0 else None)
    ax.set(xlabel="round", ylabel="test AUC", ylim=(0, 1),
           title=f"{report['split']} split, strategy {report['strategy']}, {len(report['rows'][0]['runs'])} runs each")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plot-only", action="store_true", help="redraw --plot from the result file without running")
    ap.add_argument("--hospitals", type=int, nargs="+", default=[3, 10, 30, 100])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3, help="fresh federations per N (seeds 0..runs-1)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="run these seeds only (added to the file)")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--split", choices=("iid", "dirichlet", "patient"), default="iid")
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet α (--split dirichlet)")
    ap.add_argument("--strategy", default="auto", help="[federation] strategy (default: the product's)")
    ap.add_argument("--server-momentum", type=float, default=None)
    ap.add_argument("--server-lr", type=float, default=None)
    ap.add_argument("--privacy-unit", choices=("patient", "scan"), default=None)
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--width", type=int, default=None,
                    help="[model] width (default: the one `xrayfed simulate` plans for the N hospitals, "
                         "xrayfed.server.model_plan.recommend_model); --engine inprocess")
    ap.add_argument("--size-skew", type=float, default=0.0, help="--engine flower only")
    ap.add_argument("--engine", choices=("inprocess", "flower"), default="inprocess")
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "pneumoniamnist.npz")
    ap.add_argument("--name", default=None, help="data name in the result file (default: the data's file name)")
    ap.add_argument("--out", type=Path, default=None, help="result file (default: from the setting)")
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    if args.engine == "flower" and (args.strategy != "auto" or args.server_momentum is not None
                                    or args.server_lr is not None or args.width is not None):
        raise SystemExit("--engine flower runs `xrayfed simulate` with the product's federation defaults; "
                         "other server settings: --engine inprocess")
    name = args.name or args.data.stem
    split = args.split + (f"{args.alpha:g}" if args.split == "dirichlet" else "")
    strategy = args.strategy + (f"-m{args.server_momentum:g}" if args.server_momentum is not None else "") + (
        f"-lr{args.server_lr:g}" if args.server_lr is not None else "")
    tag = f"{name}-{args.image_size}px{'' if args.width is None else f'-width{args.width}'}-{split}-{strategy}-{args.rounds}r"
    out = args.out or HERE / "results" / f"simulation-{tag}.json"
    fig = args.plot or HERE.parent / "docs" / "img" / f"simulation-{tag}.png"
    if args.plot_only:
        plot(json.loads(out.read_text()), fig)
        return
    report: dict = {"data": name, "image_size": args.image_size, "rounds": args.rounds, "split": args.split,
                    "alpha": args.alpha if args.split == "dirichlet" else None, "epsilon": args.epsilon,
                    "strategy": args.strategy, "server_momentum": args.server_momentum,
                    "server_lr": args.server_lr, "width": args.width, "engine": args.engine,
                    "cpu_count": os.cpu_count(),
                    "load_avg_start": os.getloadavg(), "rows": []}
    if out.is_file():  # keep the runs of other seeds of the same setting
        old = json.loads(out.read_text())
        same = all(old.get(k) == report[k] for k in ("rounds", "split", "alpha", "epsilon", "strategy", "engine",
                                                     "server_momentum", "server_lr", "width"))
        if same:
            report["rows"] = old.get("rows", [])
    seeds = args.seeds if args.seeds is not None else list(range(args.runs))
    with tempfile.TemporaryDirectory(prefix="xrayfed-bench-sim-") as tmp:
        for n in args.hospitals:
            row = next((r for r in report["rows"] if r["hospitals"] == n), None)
            runs = [r for r in (row or {}).get("runs", []) if r["seed"] not in seeds]
            for seed in seeds:
                r = run_flower(n, seed, args, Path(tmp)) if args.engine == "flower" else run_inprocess(n, seed, args)
                runs.append(r)
                new = summarise(n, sorted(runs, key=lambda x: x["seed"]))
                report["rows"] = sorted([x for x in report["rows"] if x["hospitals"] != n] + [new],
                                        key=lambda x: x["hospitals"])
                print(f"N={n} seed {seed}: test AUC {r['test_auc']:.3f} (per round {r['test_auc_per_round']}), "
                      f"lowest after round {r['stability']['after_round']} {r['stability']['min_auc']:.3f}, "
                      f"{r['wall_s']:.0f} s", flush=True)
                report["load_avg_end"] = os.getloadavg()
                out.write_text(json.dumps(report, indent=1) + "\n")  # partial results survive an interruption
    plot(report, fig)
    print(f"wrote {out} and {fig}")


if __name__ == "__main__":
    main()
