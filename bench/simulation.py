"""Benchmark: how a federation grows with the number of hospitals (``xrayfed simulate``).

For each N in ``--hospitals`` (default 3 10 30 100) one fresh ``xrayfed simulate`` process runs
N hospitals on Flower's Simulation Engine (Ray, one worker per core) on PneumoniaMNIST 28 px,
split IID (``--size-skew`` for unequal sizes), ε = 8 per hospital, every hospital sampled every
round. Recorded per N: final test AUC (server-side, the official test split), the hospitals'
ε, wall time per round (from metrics.jsonl; round 1 includes Ray's worker start-up), the whole
run's wall time, and peak memory of the process tree (the simulate process, Ray's GCS, raylet
and workers: RSS summed, sampled every 0.5 s).

    ./dev bench simulation [--hospitals 3 10 30 100] [--rounds 5] [--data ../shared/data/pneumoniamnist.npz]
"""

from __future__ import annotations

import argparse
import json
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


def run_one(n: int, args, work: Path) -> dict:
    from xrayfed.common.procs import venv_bin

    out = work / f"n{n}"
    cmd = [str(venv_bin("xrayfed")), "simulate", "--hospitals", str(n), "--rounds", str(args.rounds),
           "--data", str(args.data), "--epsilon", str(args.epsilon), "--out", str(out)]
    if args.size_skew:
        cmd += ["--size-skew", str(args.size_skew)]
    from sweep import has_patient_ids  # bench/ is this script's folder

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
    return {
        "hospitals": n, "rounds": len(rows), "wall_s": wall, "peak_rss_mb": peak[0] / 2**20,
        "round_s": per_round, "round_s_median_after_first": statistics.median(per_round[1:]) if len(per_round) > 1
        else per_round[0],
        "test_auc": rows[-1]["eval"]["auc"], "test_accuracy": rows[-1]["eval"]["accuracy"],
        "test_auc_per_round": [r["eval"]["auc"] for r in rows],
        "epsilon_max": max(h["epsilon"] for h in rows[-1]["hospitals"]),
        "participants_last_round": len(rows[-1]["participants"]),
        "scans_per_hospital": {"min": min(sizes), "max": max(sizes), "median": statistics.median(sizes)},
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["hospitals"] for r in results]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.4))
    ax[0].plot(ns, [r["test_auc"] for r in results], "o-")
    ax[0].set(xscale="log", xlabel="hospitals N", ylabel="test AUC after the last round", title="accuracy")
    ax[1].plot(ns, [r["round_s_median_after_first"] for r in results], "o-")
    ax[1].set(xscale="log", xlabel="hospitals N", ylabel="s per round (median, rounds ≥ 2)", title="round time")
    ax[1].set_ylim(bottom=0)
    ax[2].plot(ns, [r["peak_rss_mb"] for r in results], "o-")
    ax[2].set(xscale="log", xlabel="hospitals N", ylabel="peak RSS of the process tree (MB)", title="memory")
    ax[2].set_ylim(bottom=0)
    ax[0].set_ylim(0, 1)
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plot-only", action="store_true", help="redraw --plot from --out without running")
    ap.add_argument("--hospitals", type=int, nargs="+", default=[3, 10, 30, 100])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--size-skew", type=float, default=0.0)
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "pneumoniamnist.npz")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "simulation-pneumoniamnist-28px.json")
    ap.add_argument("--plot", type=Path, default=HERE.parent / "docs" / "img" / "simulation-scaling.png")
    args = ap.parse_args()

    if args.plot_only:
        plot(json.loads(args.out.read_text())["runs"], args.plot)
        return
    report: dict = {"cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg(), "data": str(args.data),
                    "rounds": args.rounds, "epsilon": args.epsilon, "size_skew": args.size_skew, "runs": []}
    with tempfile.TemporaryDirectory(prefix="xrayfed-bench-sim-") as tmp:
        for n in args.hospitals:
            r = run_one(n, args, Path(tmp))
            report["runs"].append(r)
            print(f"N={n}: test AUC {r['test_auc']:.3f}, ε {r['epsilon_max']:.2f}, {r['wall_s']:.0f} s total, "
                  f"{r['round_s_median_after_first']:.1f} s/round, peak {r['peak_rss_mb']:.0f} MB, "
                  f"{r['scans_per_hospital']['median']:.0f} scans/hospital", flush=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")  # partial results survive an interruption
    report["load_avg_end"] = os.getloadavg()
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report["runs"], args.plot)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
