"""Benchmark: encrypted prediction (two computing parties + the patient as dealer) on loopback.

Measures, for each image size (default 28, 64, 224 px):

* **MPC latency**: one encrypted prediction with the hospital's and the crypto provider's
  parties as separate processes forked from a warm zygote, linked by TLS, and this process as
  the patient (:func:`xrayfed.common.mpc.run_local_session`): wall time from forking the parties
  to the logits, the MPC part alone, and the patient's dealing time;
* **plaintext latency** of the same model on one scan (1 thread) and the ratio;
* **communication**: CrypTen's counters per party, the bytes on the party link, and the bytes
  the patient sends and receives;
* **end to end**: the real product path — ``xrayfed serve-crypto-provider`` + ``xrayfed serve-inference``
  (TLS, tokens, warm workers) and the wall time of a fresh ``xrayfed predict`` process on a
  full-size 2,500 × 1,900 px PNG (Python start, imports, preprocessing, dealing, gRPC to both
  services, MPC, output);
* **load**: 8 patients at once (8 tokens, fresh ``xrayfed predict`` processes), several waves:
  failures, throughput (predictions per minute) and p50/p95 latency.

And on a test split (``--data``): the share of encrypted predictions whose class equals the
plaintext model's (bar ≥ 99.5 %).

Usage::

    ./dev bench encrypted_inference --data ../shared/data/pneumoniamnist.npz
    ./dev bench encrypted_inference --sizes 224 --repeats 6 --skip-agreement --load-waves 3

Writes JSON to ``bench/results/encrypted_inference.json`` (``end_to_end.224px.cli_wall_s``:
median seconds; ``end_to_end.224px.patient_bytes``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def spec_for(size: int, num_outputs: int = 1, full_res: bool = False, old_pool: bool = False,
             scattering: bool = False):
    """The default model at ``size`` px (``default_model``: weight-standardised, pooled to ~28 px);
    ``full_res``: no input pool; ``old_pool``: the pre-issue-11 pool (size // 56, 4 at 224 px);
    ``scattering``: the ScatterNet design (front end + 2 stages) at this size."""
    from xrayfed.common.model import default_model

    spec = default_model(size, num_outputs)
    if scattering:
        spec = spec.model_copy(update={"scattering": True, "depth": 2})
    if full_res:
        spec = spec.model_copy(update={"input_pool": 1})
    elif old_pool:
        spec = spec.model_copy(update={"input_pool": 1 if size < 112 else max(1, size // 56)})
    return spec


def random_checkpoint(size: int, full_res: bool = False, seed: int = 0, scattering: bool = False):
    from xrayfed.common.checkpoint import Checkpoint
    from xrayfed.common.model import build_model
    from xrayfed.common.prediction import TaskSpec

    torch.manual_seed(seed)
    spec = spec_for(size, full_res=full_res, scattering=scattering)
    return Checkpoint(model=spec, task=TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")),
                      image_size=size, state_dict=build_model(spec).state_dict())


def plaintext_latency(ckpt, n: int = 30) -> float:
    torch.set_num_threads(1)
    model = ckpt.build()
    x = torch.rand(1, ckpt.model.in_channels, ckpt.image_size, ckpt.image_size)
    with torch.no_grad():
        for _ in range(3):
            model(x)
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            model(x)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def mpc_latency(pool, ckpt, repeats: int, work: Path) -> dict:
    from xrayfed.common import mpc
    from xrayfed.server.pki import init_pki

    pki = work / "pki"
    if not (pki / "ca.pem").exists():
        init_pki(pki)
    tls = (str(pki / "crypto-provider" / "tls.pem"), str(pki / "crypto-provider" / "tls.key"), str(pki / "ca.pem"))
    tape = mpc.record_tape(ckpt.model, ckpt.image_size)
    runs = []
    for _ in range(repeats):
        x = torch.rand(1, ckpt.model.in_channels, ckpt.image_size, ckpt.image_size)
        res = mpc.run_local_session(pool, ckpt, x, timeout_s=300, tape=tape, tls=tls)
        ref = ckpt.build()(x).detach().numpy()
        runs.append({"wall_s": res["wall_s"], "hospital_mpc_s": res["hospital"]["mpc_s"],
                     "provider_mpc_s": res["provider"]["mpc_s"], "patient_deal_s": res["patient"]["deal_s"],
                     "patient_bytes": res["patient"]["bytes_sent"] + res["patient"]["bytes_received"],
                     "link_bytes": res["hospital"]["link_bytes_sent"] + res["hospital"]["link_bytes_received"],
                     "rounds": res["hospital"]["rounds"],
                     "max_abs_logit_err": float(np.abs(res["logits"] - ref).max())})
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    med["max_abs_logit_err"] = max(r["max_abs_logit_err"] for r in runs)
    med["runs"] = runs
    return med


# --------------------------------------------------------------------------- end to end
class Services:
    """serve-crypto-provider + serve-inference as real processes (TLS, tokens) for one checkpoint."""

    def __init__(self, work: Path, ckpt_path: Path) -> None:
        from xrayfed.common.procs import free_port, spawn, venv_bin, wait_for_port
        from xrayfed.client.inference import tokens
        from xrayfed.server.pki import init_pki

        self.work = work
        pki = work / "pki"
        if not (pki / "ca.pem").exists():
            init_pki(pki)
        key = work / "token.key"
        if not key.exists():
            tokens.generate_key(key)
        self.token = work / "patient.tok"
        tok = tokens.issue_token(tokens.load_private_key(key), "BENCH-1", tokens.parse_expires("2h"))
        self.token.write_text(tok + "\n")
        self.load_tokens = []
        for i in range(8):  # one per concurrent patient (one session per token at a time)
            t = work / f"patient-{i}.tok"
            t.write_text(tokens.issue_token(tokens.load_private_key(key), f"BENCH-{i + 2}", tokens.parse_expires("2h"))
                         + "\n")
            self.load_tokens.append(t)
        secret = work / "crypto-provider.secret"
        secret.write_text(os.urandom(32).hex())
        xr = venv_bin("xrayfed")
        self.provider_port, self.svc_port = free_port(), free_port()
        self.logs = [open(work / "crypto-provider.log", "ab"), open(work / "svc.log", "ab")]
        self.procs = [
            spawn([xr, "serve-crypto-provider", "--listen", f"127.0.0.1:{self.provider_port}",
                   "--cert", str(pki / "crypto-provider" / "tls.pem"),
                   "--key", str(pki / "crypto-provider" / "tls.key"),
                   "--secret", str(secret), "--max-sessions", "16"],
                  log=self.logs[0]),
        ]
        wait_for_port("127.0.0.1", self.provider_port, timeout=120, proc=self.procs[0], what="serve-crypto-provider")
        self.procs.append(spawn([
            xr, "serve-inference", "--model", str(ckpt_path), "--listen", f"127.0.0.1:{self.svc_port}",
            "--token-key", str(key.with_suffix(".pub")), "--cert", str(pki / "inference" / "tls.pem"),
            "--key", str(pki / "inference" / "tls.key"), "--crypto-provider", f"127.0.0.1:{self.provider_port}",
            "--ca-cert", str(pki / "ca.pem"), "--crypto-provider-secret", str(secret),
            "--audit-log", str(work / "audit.jsonl"),
            "--session-timeout", "300", "--allow-scans-without-patient-id", "--rate-per-hour", "100000",
            "--budget-per-token", "100000", "--max-sessions", "12", "--max-sessions-per-peer", "12"],
            log=self.logs[1]))
        wait_for_port("127.0.0.1", self.svc_port, timeout=180, proc=self.procs[1], what="serve-inference")
        self.ca = pki / "inference" / "ca.pem"

    def predict(self, scan: Path, token: Path | None = None) -> dict:
        import resource

        from xrayfed.common.procs import venv_bin

        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        r = subprocess.run([venv_bin("xrayfed"), "predict", "--scan", str(scan), "--service",
                            f"127.0.0.1:{self.svc_port}", "--token", str(token or self.token), "--ca-cert",
                            str(self.ca), "--json"], capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        if r.returncode != 0:
            raise RuntimeError(f"predict failed: {r.stderr.strip()[-500:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        com = res["communication"]
        return {"cli_wall_s": wall, "cli_cpu_s": cpu, "in_process_s": res["timing"]["total_s"],
                "session_s": res["timing"]["session_s"], "deal_s": res["timing"]["deal_s"],
                "patient_bytes": com["bytes_sent"] + com["bytes_received"]}

    def close(self) -> None:
        from xrayfed.common.procs import kill_tree

        for p in reversed(self.procs):
            kill_tree(p)
        for f in self.logs:
            f.close()


def write_png(path: Path, size: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    img = 0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy) + 0.1 * rng.standard_normal((size, size))
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


def write_fullsize_png(path: Path, width: int = 2500, height: int = 1900, seed: int = 0) -> Path:
    """A full-size 8-bit chest-X-ray-sized PNG (synthetic texture): what a patient exports."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = 0.5 + 0.3 * np.sin(xx / 200.0) * np.cos(yy / 150.0) + 0.05 * rng.standard_normal((height, width))
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


def load_test(svc: Services, scan: Path, waves: int) -> dict:
    """8 patients at once (fresh processes, one token each), ``waves`` times."""
    from concurrent.futures import ThreadPoolExecutor

    lat, failures = [], []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as ex:
        for _ in range(waves):
            futs = [ex.submit(svc.predict, scan, tok) for tok in svc.load_tokens]
            for f in futs:
                try:
                    lat.append(f.result()["cli_wall_s"])
                except Exception as e:  # noqa: BLE001 - counted and reported
                    failures.append(str(e)[-200:])
    elapsed = time.perf_counter() - t0
    lat.sort()
    return {"concurrent_patients": 8, "waves": waves, "predictions": len(lat), "failures": len(failures),
            "failure_messages": failures[:5], "elapsed_s": elapsed,
            "throughput_per_min": 60.0 * len(lat) / elapsed if elapsed else None,
            "p50_s": statistics.median(lat) if lat else None,
            "p95_s": lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))] if lat else None}


def end_to_end(work: Path, ckpt, repeats: int, load_waves: int = 0) -> dict:
    from xrayfed.common.checkpoint import save_checkpoint

    ckpt_path = work / f"model-{ckpt.image_size}.pt"
    save_checkpoint(ckpt_path, ckpt)
    scan = write_fullsize_png(work / "scan-fullsize.png")
    svc = Services(work, ckpt_path)
    try:
        svc.predict(scan)  # warm-up (first fork of each service's zygote, page cache)
        runs = [svc.predict(scan) for _ in range(repeats)]
        load = load_test(svc, scan, load_waves) if load_waves else None
    finally:
        svc.close()
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    med["scan"] = "2500x1900 8-bit PNG"
    med["runs"] = runs
    if load is not None:
        med["load"] = load
    return med


# --------------------------------------------------------------------------- agreement
def train_quick(data: str, epochs: int, seed: int = 0):
    from xrayfed.common.checkpoint import Checkpoint
    from xrayfed.common.data import load_dataset
    from xrayfed.common.model import ModelSpec, build_model
    from xrayfed.common.prediction import TaskSpec
    from xrayfed.common.train import evaluate, make_optimizer, train_epoch

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    train = load_dataset(data, split="train", image_size=28)
    task = getattr(train, "task", None) or TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA"))
    spec = ModelSpec(num_outputs=task.num_outputs)
    model = build_model(spec)
    opt = make_optimizer(model, "adam", 2e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    for ep in range(epochs):
        st = train_epoch(model, loader, opt, task, torch.device("cpu"))
        print(f"  epoch {ep + 1}/{epochs}: loss {st['loss']:.4f}", flush=True)
    model.eval()
    val = evaluate(model, load_dataset(data, split="val", image_size=28), task, torch.device("cpu"))
    print(f"  val AUC {val['auc']:.4f} acc {val['accuracy']:.4f}", flush=True)
    return Checkpoint(model=spec, task=task, image_size=28, state_dict=model.state_dict(), run_id="bench-quick")


def agreement(pool, ckpt, data: str, batch: int, limit: int | None) -> dict:
    from xrayfed.common import mpc
    from xrayfed.common.data import load_dataset
    from xrayfed.common.prediction import compute_metrics, probabilities

    test = load_dataset(data, split="test", image_size=ckpt.image_size)
    n = len(test) if limit is None else min(limit, len(test))
    xs = torch.stack([test[i][0] for i in range(n)]).float()
    ys = np.stack([np.asarray(test[i][1]) for i in range(n)])
    model = ckpt.build()
    with torch.no_grad():
        plain = model(xs).numpy()
    enc = np.zeros_like(plain)
    tapes: dict = {}
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        b = len(xs[i:i + batch])
        if b not in tapes:
            tapes[b] = mpc.record_tape(ckpt.model, ckpt.image_size, b)
        res = mpc.run_local_session(pool, ckpt, xs[i:i + batch], timeout_s=300, tape=tapes[b])
        enc[i:i + batch] = res["logits"]
        if (i // batch) % max(1, 50 // batch) == 0:
            print(f"  {min(i + batch, n)}/{n} scans", flush=True)
    elapsed = time.perf_counter() - t0
    from xrayfed.common.prediction import decide

    p_plain, p_enc = probabilities(ckpt.task, plain), probabilities(ckpt.task, enc)
    # the class each side would report, at the model's operating point (0.5 / argmax without one)
    same = np.array([decide(ckpt.task, a, ckpt.threshold) == decide(ckpt.task, b, ckpt.threshold)
                     for a, b in zip(p_plain, p_enc)])
    return {
        "scans": int(n), "batch_per_session": int(batch), "agreement": float(same.mean()),
        "disagreements": int((~same).sum()),
        "disagreeing": [{"index": int(i), "plaintext_p": p_plain[i].round(6).tolist(),
                         "encrypted_p": p_enc[i].round(6).tolist()} for i in np.flatnonzero(~same)[:20]],
        "max_abs_prob_diff": float(np.abs(p_plain - p_enc).max()),
        "max_abs_logit_diff": float(np.abs(plain - enc).max()),
        "plaintext_metrics": {k: v for k, v in compute_metrics(ckpt.task, plain, ys, threshold=ckpt.threshold).items()
                              if "/" not in k},
        "encrypted_metrics": {k: v for k, v in compute_metrics(ckpt.task, enc, ys, threshold=ckpt.threshold).items()
                              if "/" not in k},
        "seconds": elapsed,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pneumoniamnist.npz"),
                    help="default: ../shared/data/pneumoniamnist.npz beside the repository")
    ap.add_argument("--sizes", type=int, nargs="+", default=[28, 64, 224])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full-res-224", action="store_true", help="also time 224 px without the input pool")
    ap.add_argument("--scattering-224", action="store_true", help="also time 224 px with the ScatterNet design")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--load-waves", type=int, default=3, help="waves of 8 concurrent patients (224 px only; 0: none)")
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument("--checkpoint", type=Path, help="model for the agreement run (default: train one quickly)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1, help="scans per MPC session in the agreement run")
    ap.add_argument("--limit", type=int, help="only the first N test scans")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "encrypted_inference.json")
    args = ap.parse_args()

    from xrayfed.common import mpc

    report: dict = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "load_avg_start": os.getloadavg(),
                    "latency": {}, "end_to_end": {}}
    pool = mpc.WorkerPool()
    report["zygote_warm_s"] = pool.warm()
    variants = ([(s, "") for s in args.sizes] + ([(224, "fullres")] if args.full_res_224 else [])
                + ([(224, "scatternet")] if args.scattering_224 else []))
    for size, variant in variants:
        name, full = f"{size}px" + (f"-{variant}" if variant else ""), variant == "fullres"
        ckpt = random_checkpoint(size, full_res=full, scattering=variant == "scatternet")
        print(f"[{name}] model {ckpt.model.model_dump(exclude={'pretrained_path'})}", flush=True)
        plain = plaintext_latency(ckpt)
        with tempfile.TemporaryDirectory(prefix="xrayfed-bench-") as d:
            lat = mpc_latency(pool, ckpt, args.repeats, Path(d))
        lat["plaintext_s"] = plain
        lat["ratio_mpc_to_plaintext"] = lat["hospital_mpc_s"] / plain
        lat["input_pool"] = ckpt.model.input_pool
        report["latency"][name] = lat
        print(f"[{name}] MPC {lat['hospital_mpc_s']:.3f}s (session wall {lat['wall_s']:.3f}s, dealing "
              f"{lat['patient_deal_s']:.3f}s), plaintext {plain * 1e3:.2f}ms (×{lat['ratio_mpc_to_plaintext']:.0f}), "
              f"patient {lat['patient_bytes'] / 2**20:.1f} MiB, link {lat['link_bytes'] / 2**20:.1f} MiB, "
              f"{lat['rounds']} rounds", flush=True)
        if not args.skip_e2e and not variant:
            with tempfile.TemporaryDirectory(prefix="xrayfed-bench-") as d:
                e2e = end_to_end(Path(d), ckpt, args.repeats, args.load_waves if size == 224 else 0)
            report["end_to_end"][name] = e2e
            print(f"[{name}] end to end: `xrayfed predict` {e2e['cli_wall_s']:.2f}s wall, {e2e['cli_cpu_s']:.2f}s CPU "
                  f"({e2e['in_process_s']:.2f}s in process, session {e2e['session_s']:.2f}s), patient "
                  f"{e2e['patient_bytes'] / 2**20:.1f} MiB", flush=True)
            if e2e.get("load"):
                ld = e2e["load"]
                print(f"[{name}] load: {ld['predictions']} predictions, {ld['failures']} failures, "
                      f"{ld['throughput_per_min']:.0f}/min, p50 {ld['p50_s']:.2f}s p95 {ld['p95_s']:.2f}s", flush=True)

    if not args.skip_agreement:
        from xrayfed.common.security.atrest import load_checkpoint

        if args.checkpoint:
            ckpt = load_checkpoint(args.checkpoint)
        else:
            print(f"[agreement] training a plaintext model on {args.data} ({args.epochs} epochs)", flush=True)
            ckpt = train_quick(args.data, args.epochs)
        agr = agreement(pool, ckpt, args.data, args.batch, args.limit)
        report["agreement"] = agr
        print(f"[agreement] {agr['agreement'] * 100:.2f}% of {agr['scans']} test scans same class "
              f"({agr['disagreements']} differ), max |Δp| {agr['max_abs_prob_diff']:.2e}; plaintext AUC "
              f"{agr['plaintext_metrics']['auc']:.4f}, encrypted AUC {agr['encrypted_metrics']['auc']:.4f}", flush=True)

    pool.close()
    report["load_avg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
