"""Benchmark: what a real federation round costs beyond its training.

The same federation (3 hospitals, ε = 8, the default plans) run back to back by the in-process
engine (``bench/federated.py --engine inprocess``: the same hospital code in one fresh process, no
network, no further process starts) and by real processes (``--engine processes``: ``xrayfed
server`` + 3 × ``xrayfed client`` on 127.0.0.1), ``--runs`` times each, alternating, with the load
average noted before each run (the cores may be shared). Both are timed from the start of their
processes to the last one's exit (:func:`run_inprocess_fresh`). Its figure is the ratio processes / in-process
of the mean wall times; the per-round breakdown of each process run (``timing`` in its
``metrics.jsonl``: waiting for hospitals, the slowest hospital's start-up, data, DP training and
local hand-over, transfer, aggregation, evaluation) is averaged over rounds and runs.

Usage::

    ./dev bench round_overhead --runs 3                              # PneumoniaMNIST 28 px, 5 rounds
    ./dev bench round_overhead --which kermany-224 --runs 3          # Kermany 224 px, 2 rounds
        (needs the held-out folders of ``./dev bench heldout``: bench/results/work-kermany-heldout)
    ./dev bench round_overhead --which kermany-224 --trace-cpu       # one process run: CPU per process

Writes ``bench/results/round-overhead.json``: per federation ``inprocess_wall_s``,
``processes_wall_s``, ``ratio``, ``runs`` (each run's wall time and load average),
``breakdown`` (seconds per round), ``phases`` (the process runs' seconds before round 1, in the
rounds and after them); other federations already in the file are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federated import run_inprocess, run_processes  # noqa: E402
from sweep import default_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: The federations measured: data, scan size, rounds, extra settings.
FEDERATIONS = {
    "pneumoniamnist-28": {"data": ROOT.parent / "shared" / "data" / "pneumoniamnist.npz", "image_size": 28,
                          "rounds": 5},
    "kermany-224": {"data": ROOT / "bench" / "results" / "work-kermany-heldout", "image_size": 224, "rounds": 2,
                    "split": "patient"},
}


def settings(which: str, seed: int) -> dict:
    """The benchmark's defaults (bench/sweep.py's flags unset) for federation ``which``."""
    fed = {k: v for k, v in FEDERATIONS[which].items() if k != "data"}
    return default_settings(**fed, epsilon=8.0, seed=seed, dp=1)


def breakdown(run_dir: Path) -> dict[str, float]:
    """The mean of each ``timing`` figure over the rounds of one process run."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r["timing"] for r in rows if r.get("timing")]
    keys = sorted({k for t in timed for k, v in t.items() if isinstance(v, (int, float))})
    return {k: round(statistics.fmean(float(t.get(k, 0.0)) for t in timed), 3) for k in keys}


#: ``--cold``: how hospitals ran before the warm worker (a process per message that imports torch,
#: Flower's 3 s idle pull, Flower's own ``flwr-clientapp`` start).
COLD = {"warm_worker": False, "poll_interval_s": 3.0, "fork_clientapps": False}


def phases(run_dir: Path, t0: float, wall: float) -> dict[str, float]:
    """Where a process run's wall time went outside its rounds: ``before_round1_s`` (every
    process started, the hospitals checked their data and joined, the ServerApp loaded its
    evaluation sets), ``rounds_s`` (rounds 1..last, each in the breakdown) and ``after_rounds_s``
    (the hospitals told the run is over, every process stopped). From the rows of
    ``metrics.jsonl``: a row's ``time`` (second resolution) is when its round's evaluation began,
    its ``timing`` says how long the round took before and after that."""
    from datetime import datetime

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]

    def start(r: dict) -> float:
        t = r["timing"]
        return datetime.fromisoformat(r["time"]).timestamp() - (t["wait_s"] + t["exchange_s"] + t["aggregate_s"])

    first, last = start(rows[0]), start(rows[-1]) + float(rows[-1]["duration_s"])
    return {"before_round1_s": round(first - t0, 1), "rounds_s": round(last - first, 1),
            "after_rounds_s": round(t0 + wall - last, 1)}


def run_inprocess_fresh(s: dict, data: Path) -> dict:
    """The in-process federation in a fresh Python process, timed from its start to its exit as the
    processes engine is timed: the interpreter, the imports and every cache a process builds for
    itself (the scans' scattering features, the allocator's pages, the accountant's tables) are
    paid in every run, as a federation of fresh processes pays them. A second federation in the
    same process reuses them: seed 1 here took 48.1 s first and 28.1 s second. ``wall_s`` is that
    clock; ``federation_wall_s`` the engine's own (from its first hospital to its test score)."""
    import subprocess

    t0 = time.time()
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--inprocess-child",
                        json.dumps({"settings": s, "data": str(data)})], capture_output=True, text=True)
    wall = time.time() - t0
    try:
        if r.returncode != 0:
            raise ValueError(f"exit {r.returncode}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise SystemExit(f"the in-process federation failed ({e}):\n{r.stderr[-3000:]}") from None
    return dict(out, wall_s=round(wall, 1), federation_wall_s=out["wall_s"])


#: ``--trace-cpu``: a process's role, from the first of these found in its command line.
ROLES = (("flower_launch supernode", "SuperNode (its forked SuperExec and ClientApps included)"),
         ("xrayfed.client.worker", "hospital worker"), ("flwr-serverapp", "ServerApp"),
         ("flower-superexec", "operator's SuperExec"), ("flower-superlink", "SuperLink"), ("flwr run", "flwr run"),
         ("cli server", "xrayfed server"), ("cli client", "xrayfed client"))


def trace_cpu(which: str, data: Path, work: Path) -> dict:
    """One process run (seed 0) with every process's CPU time sampled every 0.2 s (user +
    system, psutil): seconds per role (:data:`ROLES`), how many processes, the run's wall time."""
    import threading

    import psutil

    seen: dict[int, tuple[str, float]] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for proc in psutil.Process().children(recursive=True):
                try:
                    with proc.oneshot():
                        cmd, cpu = " ".join(proc.cmdline()), sum(proc.cpu_times()[:2])
                except psutil.Error:
                    continue
                role = next((name for key, name in ROLES if key in cmd), None)
                if role is None and proc.pid in seen:
                    role = seen[proc.pid][0]  # a fork renamed nothing; its parent's command line
                if role is None:
                    parent = seen.get(proc.ppid())
                    role = parent[0] if parent else "other"
                seen[proc.pid] = (role, max(cpu, seen.get(proc.pid, ("", 0.0))[1]))
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        r = run_processes(settings(which, 0), data, work / f"{which}-trace")
    finally:
        stop.set()
        th.join()
    roles: dict[str, dict[str, float]] = {}
    for role, cpu in seen.values():
        e = roles.setdefault(role, {"cpu_s": 0.0, "processes": 0})
        e["cpu_s"] = round(e["cpu_s"] + cpu, 2)
        e["processes"] += 1
    return {"wall_s": r["wall_s"], "cpu_s": round(sum(e["cpu_s"] for e in roles.values()), 1),
            "by_role": dict(sorted(roles.items(), key=lambda kv: -kv[1]["cpu_s"])),
            "sampled_every_s": 0.2, "load_avg_1min": os.getloadavg()[0]}


def same_allocator() -> None:
    """Re-run this benchmark under the allocator settings xrayfed gives the processes it starts
    (:data:`xrayfed.common.procs.ALLOCATOR_TUNABLES`, read by glibc at a process's start), so the
    in-process engine trains as a hospital's worker does."""
    from xrayfed.common.procs import allocator_env

    env = allocator_env()
    if env:
        os.execve(sys.executable, list(sys.orig_argv), {**os.environ, **env})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--which", choices=sorted(FEDERATIONS), default="pneumoniamnist-28")
    ap.add_argument("--data", type=Path, default=None, help="default: the federation's usual place")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cold", action="store_true",
                    help="hospitals without their warm worker, with Flower's 3 s idle pull and its own "
                         "`flwr-clientapp` start per message (how rounds ran before), stored under WHICH-cold")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "round-overhead.json")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "work-round-overhead")
    ap.add_argument("--trace-cpu", action="store_true",
                    help="one process run with each process's CPU time sampled, stored under WHICH-cpu")
    ap.add_argument("--inprocess-child", default=None, help=argparse.SUPPRESS)  # run_inprocess_fresh's child
    args = ap.parse_args()
    same_allocator()  # after parsing: `--help` and a bad flag answer from this process
    if args.inprocess_child is not None:
        job = json.loads(args.inprocess_child)
        print(json.dumps(run_inprocess(job["settings"], Path(job["data"]))), flush=True)
        return
    data = (args.data or FEDERATIONS[args.which]["data"]).resolve()
    if not data.exists():
        raise SystemExit(f"bench/round_overhead.py: no data at {data}")
    if args.trace_cpu:
        out = json.loads(args.out.read_text()) if args.out.is_file() else {}
        out[f"{args.which}-cpu"] = trace_cpu(args.which, data, args.work)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps({f"{args.which}-cpu": out[f"{args.which}-cpu"]}, indent=1))
        return
    runs: list[dict] = []
    rounds: list[dict] = []
    for seed in range(args.runs):
        s = settings(args.which, seed)
        for engine in ("processes",) if args.cold else ("inprocess", "processes"):
            load = os.getloadavg()[0]
            if engine == "inprocess":
                r = run_inprocess_fresh(s, data)
            else:
                work = args.work / f"{args.which}{'-cold' if args.cold else ''}-seed{seed}"
                r = run_processes(s, data, work, COLD if args.cold else None)
                rounds.append(breakdown(work / "run"))
            # both engines on one clock: from the start of their fresh processes to the last one's exit
            run = {"engine": engine, "seed": seed, "wall_s": r["wall_s"], "load_avg_1min": load,
                   "test_auc": r.get("test_auc")}
            if engine == "inprocess":
                run["federation_wall_s"] = r["federation_wall_s"]
            if engine == "processes":
                run.update(phases(work / "run", r["started_at"], r["wall_s"]))
            print(json.dumps(run), flush=True)
            runs.append(run)

    def mean_wall(engine: str) -> float:
        return statistics.fmean(r["wall_s"] for r in runs if r["engine"] == engine)

    out = json.loads(args.out.read_text()) if args.out.is_file() else {}
    procs = mean_wall("processes")
    # --cold runs processes only: its ratio is against the warm entry's in-process figure
    inproc = out.get(args.which, {}).get("inprocess_wall_s") if args.cold else mean_wall("inprocess")
    result = {
        "federation": {"data": data.name, **{k: v for k, v in FEDERATIONS[args.which].items() if k != "data"},
                       "hospitals": 3, "epsilon": 8.0},
        "inprocess_wall_s": None if inproc is None else round(inproc, 1), "processes_wall_s": round(procs, 1),
        "ratio": None if inproc is None else round(procs / inproc, 3),
        "runs": runs,
        "breakdown": {k: round(statistics.fmean(b.get(k, 0.0) for b in rounds), 3)
                      for k in sorted({k for b in rounds for k in b})},
        "phases": {k: round(statistics.fmean(r[k] for r in runs if k in r), 1)
                   for k in ("before_round1_s", "rounds_s", "after_rounds_s")},
        "cpus": os.cpu_count(),
        "measured": "back to back, alternating engines; load_avg_1min noted before each run",
    }
    if args.cold:
        result["hospitals_without_warm_worker"] = True
    out[args.which + ("-cold" if args.cold else "")] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({args.which: {k: result[k] for k in ("inprocess_wall_s", "processes_wall_s", "ratio")}}))


if __name__ == "__main__":
    main()
