"""Benchmark: a long federation with faults: hospitals and the server SIGKILLed and
restarted at random points, with the process count, open file descriptors and memory sampled.

One real federation on 127.0.0.1 — `xrayfed server` with TLS and registered hospital keys, 3 ×
`xrayfed client` — on synthetic 28 px scans (a small, weight-standardised XrayNet), ``--rounds``
rounds (default 50), ``min_clients`` 2. During it, at rounds drawn at random (``--seed``), a
random hospital's whole process tree is SIGKILLed at a random moment of the round and started
again at once (``--hospital-kills``), and the server's whole tree likewise
(``--server-kills``). Every 5 s the tree under this script is sampled: processes, open file
descriptors, RSS. At the end:

* every round is in metrics.jsonl exactly once;
* every hospital's ledger verifies (keyed hash chain), no round is charged twice, every release
  is paid for, no update was released twice;
* resources: the maxima over the last third of the run against the first third (after round 3).

``--baseline`` first runs the same federation (same data, configs and model start) with no
fault, so that the faulty run's final test AUC can be set beside an uninterrupted one.

    ./dev bench soak [--rounds 50] [--hospital-kills 4] [--server-kills 2] [--baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
NAMES = ("h0", "h1", "h2")


def _sample() -> dict:
    import psutil

    procs = psutil.Process().children(recursive=True)
    fds = rss = 0
    for p in procs:
        try:
            fds += p.num_fds()
            rss += p.memory_info().rss
        except psutil.Error:
            pass
    return {"t": time.time(), "processes": len(procs), "fds": fds, "rss_mb": rss / 2**20}


class Federation:
    """The configs and processes of one federation under ``work``."""

    def __init__(self, work: Path, args) -> None:
        from xrayfed.common.config import FederationConfig, HospitalConfig, dump_toml
        from xrayfed.common.procs import free_port
        from xrayfed.server.pki import init_pki
        from xrayfed.common.synthetic import write_npz

        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.pki = work / "pki"
        init_pki(self.pki, hospitals=list(NAMES))
        self.data = write_npz(work / "data.npz", n_train=args.scans, n_val=200, n_test=400, size=28, task="binary",
                              seed=args.seed)
        self.port = free_port()
        self.run_dir = work / "run"
        fed = FederationConfig.model_validate({
            "federation": {"name": "soak", "run_dir": str(self.run_dir), "rounds": args.rounds, "min_clients": 2,
                           "round_timeout_s": 600, "join_timeout_s": 600, "seed": args.seed},
            "model": {"num_outputs": 1, "width": 16, "weight_standardization": True},
            "task": {"kind": "binary", "class_names": ["NORMAL", "PNEUMONIA"]},
            "image_size": 28,
            "eval": {"path": str(self.data), "split": "test", "val_split": "val"},
            "network": {"listen": f"127.0.0.1:{self.port}",
                        "hospital_keys": [str(self.pki / "hospitals" / h / "auth.pub") for h in NAMES],
                        "tls": {"ca_cert": str(self.pki / "ca.pem"), "cert": str(self.pki / "server.pem"),
                                "key": str(self.pki / "server.key")}},
        })
        self.fp = work / "federation.toml"
        self.fp.write_text(dump_toml(fed))
        self.hcfg: dict[str, Path] = {}
        self.ledgers: dict[str, Path] = {}
        for i, name in enumerate(NAMES):
            h = HospitalConfig.model_validate({
                "hospital": {"name": name, "state_dir": str(work / f"state-{name}"), "device": "cpu"},
                "data": {"path": str(self.data), "partition": f"{i}/{len(NAMES)}"},
                "privacy": {"epsilon": args.epsilon, "max_rounds": args.rounds},
            })
            self.hcfg[name] = work / f"{name}.toml"
            self.hcfg[name].write_text(dump_toml(h))
            self.ledgers[name] = work / f"state-{name}" / "privacy-ledger.jsonl"
        self.procs: dict[str, subprocess.Popen] = {}
        self.starts: dict[str, int] = {}

    def start(self, tag: str) -> None:
        from xrayfed.common.procs import spawn, venv_bin

        n = self.starts[tag] = self.starts.get(tag, 0) + 1
        log = (self.work / f"{tag}-{n}.log").open("wb")
        cli = [str(venv_bin("xrayfed"))]
        if tag == "server":
            cmd = cli + ["server", "--config", str(self.fp)]
        else:
            cmd = cli + ["client", "--server", f"127.0.0.1:{self.port}", "--config", str(self.hcfg[tag]),
                         "--ca-cert", str(self.pki / "hospitals" / tag / "ca.pem"),
                         "--auth-key", str(self.pki / "hospitals" / tag / "auth.key")]
        self.procs[tag] = spawn(cmd, log=log)

    def metrics(self) -> list[dict]:
        p = self.run_dir / "metrics.jsonl"
        return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []

    def stop(self) -> None:
        from xrayfed.common.procs import kill_tree

        for p in self.procs.values():
            kill_tree(p)


def run(work: Path, args, faults: bool) -> dict:
    from xrayfed.common.privacy.ledger import read_ledger, unpaid_releases
    from xrayfed.common.procs import sigkill_tree

    fed = Federation(work, args)
    rng = random.Random(args.seed)
    events: list[tuple[int, str]] = []
    if faults:
        rounds = list(range(3, args.rounds - 1))
        picks = rng.sample(rounds, args.hospital_kills + args.server_kills)
        events = sorted([(r, rng.choice(NAMES)) for r in picks[:args.hospital_kills]]
                        + [(r, "server") for r in picks[args.hospital_kills:]])
    samples: list[dict] = []
    done = threading.Event()

    def sampler():
        while not done.is_set():
            s = _sample()
            s["round"] = len(fed.metrics())
            samples.append(s)
            done.wait(5.0)

    log: list[dict] = []
    t0 = time.time()
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    try:
        fed.start("server")
        for n in NAMES:
            fed.start(n)
        pending = list(events)
        while True:
            rc = fed.procs["server"].poll()
            if rc is not None:
                if rc != 0:
                    raise RuntimeError(f"the server exited with {rc}: see {fed.work}/server-*.log")
                break
            if pending and len(fed.metrics()) >= pending[0][0] - 1:
                r, who = pending.pop(0)
                time.sleep(rng.uniform(1.0, 8.0))  # a random moment of round r
                at = len(fed.metrics()) + 1
                sigkill_tree(fed.procs[who])
                fed.start(who)
                log.append({"round": at, "killed": who, "t": round(time.time() - t0, 1)})
                print(f"[soak] round {at}: SIGKILLed {who} and started it again", flush=True)
            time.sleep(0.5)
    finally:
        done.set()
        th.join(timeout=10)
        fed.stop()
    wall = time.time() - t0

    rows = fed.metrics()
    assert [r["round"] for r in rows] == list(range(1, args.rounds + 1)), [r["round"] for r in rows]
    ledgers = {}
    for name in NAMES:
        recs = read_ledger(fed.ledgers[name])  # verifies the whole chain and its head anchor
        charged = [int(r["round"]) for r in recs if r["event"] == "train"]
        digests = [r["digest"] for r in recs if r["event"] == "release"]
        assert len(charged) == len(set(charged)), (name, charged)
        assert not unpaid_releases(recs), name
        assert len(digests) == len(set(digests)), name
        ledgers[name] = {"verified": True, "charges": len(charged), "releases": len(digests),
                         "resends": sum(r["event"] == "resend" for r in recs),
                         "retries": sum(r["event"] == "retry" for r in recs),
                         "epsilon": max((float(r["epsilon"]) for r in recs if "epsilon" in r), default=0.0)}
    third = max(1, args.rounds // 3)
    early = [s for s in samples if 3 <= s["round"] < 3 + third]
    late = [s for s in samples if s["round"] >= args.rounds - third]

    def peak(ss, k):
        return max((s[k] for s in ss), default=None)

    status = [[h["status"] for h in r["hospitals"]] for r in rows]
    import torch

    from xrayfed.common.security.atrest import load_checkpoint
    from xrayfed.common.data import load_dataset
    from xrayfed.common.prediction import TaskSpec
    from xrayfed.common.train import evaluate

    best = load_checkpoint(fed.run_dir / "checkpoints" / "best.pt")
    task = TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA"))
    best_auc = evaluate(best.build(), load_dataset(fed.data, split="test", image_size=28, task=task), task,
                        torch.device("cpu"))["auc"]
    return {
        "faults": log, "wall_s": round(wall, 1), "rounds": len(rows),
        "round_s_median": statistics.median(r["duration_s"] for r in rows),
        "round_s_max": max(r["duration_s"] for r in rows),
        "test_auc_last": rows[-1]["eval"]["auc"], "best_round": best.round, "test_auc_best": best_auc,
        "test_auc_per_round": [r["eval"]["auc"] for r in rows],
        "test_auc_mean_last_10": statistics.mean(r["eval"]["auc"] for r in rows[-10:]),
        "failed_rows": sum(s.count("failed") for s in status), "resent_rows": sum(s.count("resent") for s in status),
        "server_starts": fed.starts.get("server", 0), "ledgers": ledgers,
        "resources": {k: {"early_max": peak(early, k), "late_max": peak(late, k), "overall_max": peak(samples, k)}
                      for k in ("processes", "fds", "rss_mb")},
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--hospital-kills", type=int, default=4)
    ap.add_argument("--server-kills", type=int, default=2)
    ap.add_argument("--scans", type=int, default=600, help="synthetic training scans, split over 3 hospitals")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", action="store_true", help="also run the same federation without faults")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "soak-50-rounds.json")
    args = ap.parse_args()

    report: dict = {"cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg(), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="xrayfed-soak-") as tmp:
        if args.baseline:
            report["baseline"] = run(Path(tmp) / "baseline", args, faults=False)
            b = report["baseline"]
            print(f"[soak] baseline: {b['rounds']} rounds in {b['wall_s']:.0f} s, test AUC last {b['test_auc_last']:.3f}"
                  f" best {b['test_auc_best']:.3f}", flush=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
        report["faulty"] = run(Path(tmp) / "faulty", args, faults=True)
    report["load_avg_end"] = os.getloadavg()
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    f = report["faulty"]
    print(f"[soak] with faults: {f['rounds']} rounds in {f['wall_s']:.0f} s, test AUC last {f['test_auc_last']:.3f} "
          f"best {f['test_auc_best']:.3f}; {len(f['faults'])} kills; resources {json.dumps(f['resources'])}; "
          f"ledgers verified: {sorted(f['ledgers'])}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
