"""Benchmark: a 4-class set (healthy / COVID-19 / bacterial / viral) end to end, every step a
real command.

1. ``xrayfed demo --data ROOT`` trains it federated (server, SuperLink, hospitals, SuperNodes as
   processes; ε per hospital as given) on class folders in the flat ``ROOT/CLASS/*`` layout —
   generated here with the project's synthetic scans (``--data`` for a real set);
2. ``xrayfed report`` gives macro and per-class AUROC of the final global model on the
   held-out scans carved from the flat layout;
3. ``xrayfed predict`` (fresh patient process, TLS, hospital service + crypto provider) answers
   encrypted; timed over ``--repeats`` scans, next to a plaintext prediction of the same model;
4. ``xrayfed export`` (ONNX) and ``xrayfed explain`` (HTML for 4 scans) are timed too.

    ./dev bench multiclass [--image-size 224] [--hospitals 3] [--rounds 5] [--epsilon 8]
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def _timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {r.stdout[-1500:]}{r.stderr[-1500:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, help="class folders of the 4 classes (default: generated)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--n-train", type=int, default=2400)
    ap.add_argument("--n-test", type=int, default=600)
    ap.add_argument("--hospitals", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "multiclass-4class.json")
    args = ap.parse_args()

    import torch
    from encrypted_inference import Services

    from xrayfed.common.preprocess import prepare_scan
    from xrayfed.common.procs import venv_bin
    from xrayfed.common.security.atrest import load_checkpoint
    from xrayfed.common.synthetic import FOUR_CLASS, write_class_folders

    xr = str(venv_bin("xrayfed"))
    report: dict = {"cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg(), "settings": vars(args) | {
        "data": str(args.data) if args.data else "generated", "out": str(args.out)}}
    with tempfile.TemporaryDirectory(prefix="xrayfed-bench-mc-") as tmp:
        tmp = Path(tmp)
        data = args.data or write_class_folders(tmp / "scans", n_train=args.n_train, n_test=args.n_test,
                                                size=args.image_size, task="multiclass", class_names=FOUR_CLASS,
                                                flat=True, seed=11)
        demo = tmp / "demo"
        report["train_s"] = _timed([xr, "demo", "--data", str(data), "--image-size", str(args.image_size), "--out",
                                    str(demo), "--hospitals", str(args.hospitals), "--rounds", str(args.rounds),
                                    "--epsilon", str(args.epsilon)])
        _timed([xr, "report", str(demo / "run"), "--format", "json"])
        rep = json.loads((demo / "run" / "report" / "report.json").read_text())
        report["final_round"], report["held_out"] = rep["final_round"], rep["final_eval"]
        report["epsilon_spent"] = {h["hospital"]: h["epsilon_spent"] for h in rep["hospitals"]}
        ckpt_path = sorted((demo / "run" / "checkpoints").glob("round-*.pt"))[-1]
        ckpt = load_checkpoint(ckpt_path, None)
        every = sorted(Path(data).rglob("test-*.png")) or sorted(Path(data).rglob("*.png"))
        scans = every[:: max(1, len(every) // 8)]
        model = ckpt.build().eval()
        plain = []
        for s in scans[:args.repeats]:
            t = time.perf_counter()
            with torch.no_grad():
                model(prepare_scan(s, ckpt.image_size))
            plain.append(time.perf_counter() - t)
        report["plaintext_predict_s"] = statistics.median(plain)
        (tmp / "svc").mkdir()
        svc = Services(tmp / "svc", ckpt_path)
        try:
            svc.predict(scans[0])  # warm-up
            runs = [svc.predict(s) for s in scans[:args.repeats]]
        finally:
            svc.close()
        report["encrypted_predict"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {"runs": runs}
        report["export_onnx_s"] = _timed([xr, "export", "--model", str(ckpt_path), "--format", "onnx",
                                          "--data", str(data), "--out", str(tmp / "m.onnx")])
        each = [a for s in scans[:4] for a in ("--scan", str(s))]
        report["explain_4_scans_s"] = _timed([xr, "explain", "--model", str(ckpt_path), *each, "--out",
                                              str(tmp / "page.html")])
    report["load_avg_end"] = os.getloadavg()
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    ev = report["held_out"]
    print(f"4-class, {args.hospitals} hospitals × {report['final_round']} rounds, ε = {args.epsilon:g}: macro AUROC "
          f"{ev['auc']:.3f} (" + ", ".join(f"{c} {ev[f'auc/{c}']:.3f}" for c in FOUR_CLASS) + f"), accuracy "
          f"{ev['accuracy']:.3f}; encrypted predict {report['encrypted_predict']['cli_wall_s']:.2f} s, plaintext "
          f"{report['plaintext_predict_s'] * 1e3:.1f} ms; export {report['export_onnx_s']:.1f} s, explain 4 scans "
          f"{report['explain_4_scans_s']:.1f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
