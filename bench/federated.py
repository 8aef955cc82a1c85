"""Benchmark: federated DP training, 3 hospitals — test AUC beside its non-private references.

For every ε it runs ``--runs`` fresh federations (seeds 0, 1, …) and reports the mean and
spread, each run listed. DP runs use ``--engine``:

* ``processes`` (default): the real thing — SuperLink + SuperNodes + ServerApp/ClientApp
  processes on 127.0.0.1 via ``xrayfed server``/``xrayfed client``;
* ``inprocess``: the same hospital code for every hospital in one process
  (:mod:`xrayfed.server.simulate`; what the sweeps use) — run both to see that they agree.

Beside the DP figures (``--references``, default on): the same federation without DP
(σ = 0, in process: the product has no DP-off switch) and a centralized non-private model
(one "hospital" holding every training scan), so the price of privacy and the price of
federation are each visible. The operating point (threshold) is chosen on the ``val`` split,
which no hospital trains on (``bench/heldout.py`` makes one for Kermany-style folders);
accuracy, sensitivity and specificity are reported there. The test split is read once per
figure, after the last round.

Usage::

    ./dev bench federated --data ../shared/data/pneumoniamnist.npz --epsilons 8 1
    ./dev bench heldout ../shared/data/kermany-cxr-224 --out bench/results/work-kermany-heldout
    ./dev bench federated --data bench/results/work-kermany-heldout --name kermany-cxr-224 \\
        --image-size 224 --split patient --epsilons 8 1

Writes ``bench/results/federated-NAME-SIZEpx.json``: ``epsN.test_auc`` etc. are means over the
runs (``epsN.runs`` lists each run, ``epsN.test_auc_std`` the spread), ``no_dp`` and
``central`` likewise, ``price_of_privacy_auc`` = no-DP AUC − DP AUC at each ε. The references
train with each ε's automatic settings (its local epochs, σ = 0): the largest ε's are ``no_dp``
and ``central``, a smaller one's (ε = 1: fewer local epochs) ``no_dp_at_eps1`` and
``central_at_eps1``, and the price of privacy at each ε is taken against the no-DP run with its
own settings. ``--reference-epsilons 8`` runs the largest ε's references only (the former
default, under which ε = 1 was priced against the ε = 8 settings' reference).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sweep import add_settings_arguments, configs, run_setting  # noqa: E402

KEYS = ("test_auc", "test_accuracy", "test_sensitivity", "test_specificity", "val_auc", "wall_s")


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


def run_processes(s: dict, data: Path, out_dir: Path, hospital_section: dict | None = None) -> dict:
    """One federation of real processes (``xrayfed server`` + one ``xrayfed client`` per hospital);
    ``hospital_section``: settings of each hospital's ``[hospital]`` to change (e.g. ``warm_worker``)."""
    import subprocess

    from xrayfed.common.config import dump_toml
    from xrayfed.common.data import load_dataset
    from xrayfed.common.procs import ProcessGroup, free_port, shared_cpu_env, spawn

    if out_dir.exists():  # a fresh federation: the server would resume an old run dir, hospitals reuse ledgers
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    probe = load_dataset(data, split="train", image_size=8)
    fed, hospitals = configs(s, data, out_dir, probe.task)
    if hospital_section:
        hospitals = [h.model_validate({**h.model_dump(mode="json"),
                                       "hospital": {**h.model_dump(mode="json")["hospital"], **hospital_section}})
                     for h in hospitals]
    port = free_port()
    fed = fed.model_validate({**fed.model_dump(mode="json"), "network": {"listen": f"127.0.0.1:{port}",
                                                                         "tls": {"insecure": True}}})
    fp = out_dir / "federation.toml"
    fp.write_text(dump_toml(fed))
    cli = [sys.executable, "-m", "xrayfed.common.cli"]
    stop, mem = threading.Event(), {}
    sampler = threading.Thread(target=sample_peak_rss, args=(stop, mem), daemon=True)
    t0 = time.time()
    sampler.start()
    cpu_env = shared_cpu_env(len(hospitals), share_dir=out_dir / "cores")  # the hospitals' and the server's
    with ProcessGroup() as group:
        for i, h in enumerate(hospitals):
            hp = out_dir / f"hospital-{i}.toml"
            hp.write_text(dump_toml(h))
            group.add(spawn(cli + ["client", "--server", f"127.0.0.1:{port}", "--config", str(hp), "--insecure"],
                            log=open(out_dir / f"hospital-{i}.log", "w"), env=cpu_env))
        r = subprocess.run(cli + ["server", "--config", str(fp)], capture_output=True, text=True,
                           env={**os.environ, **cpu_env})
    stop.set()
    sampler.join()
    wall = time.time() - t0
    print(r.stdout, file=sys.stderr)
    if r.returncode != 0:
        raise SystemExit(f"xrayfed server failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    rows = [json.loads(l) for l in (out_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    best = rows[-1].get("best_round", len(rows))  # the server's choice on the val split (checkpoints/best.pt)
    ev = rows[best - 1]["eval"]
    return {
        "seed": s["seed"], "engine": "processes", "best_round": best,
        "last_round_test_auc": rows[-1]["eval"]["auc"],
        "test_auc": ev["auc"], "test_accuracy": ev["accuracy"], "test_sensitivity": ev.get("sensitivity"),
        "test_specificity": ev.get("specificity"), "threshold": ev.get("threshold"), "val_auc": ev.get("val_auc"),
        "max_epsilon_spent": rows[-1].get("max_epsilon"), "rounds": len(rows),
        "wall_s": round(wall, 1), "started_at": t0, "peak_rss_mb": round(mem.get("peak_rss_mb", 0), 0),
        "auc_per_round": [row["eval"]["auc"] for row in rows],
    }


def run_inprocess(s: dict, data: Path, save: Path | None = None) -> dict:
    """One in-process federation; ``save``: write its selected model there (an xrayfed checkpoint
    with its threshold: what ``bench/encrypted_inference.py --checkpoint`` measures)."""
    t0 = time.time()
    r = run_setting(s, data, test=True)
    if save is not None:
        from xrayfed.common.checkpoint import Checkpoint, save_checkpoint
        from xrayfed.common.data import load_dataset

        task = load_dataset(data, split="train", image_size=8).task
        save.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(save, Checkpoint(model=r["_model"], task=task, image_size=s["image_size"],
                                         state_dict=r["_state_dict"], round=r["best_round"],
                                         threshold=r["threshold"]))
    return {"seed": s["seed"], "engine": "inprocess", "dp": bool(s["dp"]), "central": bool(s.get("central")),
            **{k: r.get(k) for k in ("test_auc", "test_accuracy", "test_sensitivity", "test_specificity",
                                     "threshold", "val_auc", "best_round", "val_auc_per_round",
                                     "epsilon_spent", "noise_multipliers",
                                     "steps_per_round", "sample_rates", "params")},
            "wall_s": round(time.time() - t0, 1)}


def summarise(runs: list[dict], **extra) -> dict:
    out: dict = dict(extra)
    for k in KEYS:
        vals = [r[k] for r in runs if r.get(k) is not None]
        if vals:
            out[k] = statistics.fmean(vals)
            if len(vals) > 1:
                out[f"{k}_std"] = statistics.stdev(vals)
    out["runs"] = runs
    return out


def code_rules(s: dict) -> dict[str, str]:
    """Digests of what the product's code decides for settings ``s`` (the flags leave it to
    the defaults): the resolved federation and hospital configs (model, learning rates,
    momentum, clipping, every default) and the hospitals' automatic batch/epochs rule. Stored
    in the settings, so ``--merge`` refuses to add runs to a row whose earlier runs were
    trained under other defaults (a change of ``AUTO_EPOCHS`` moves no flag)."""
    import hashlib

    from xrayfed.client import dp as privacy
    from xrayfed.common.data import BINARY_NAMES
    from xrayfed.common.prediction import TaskSpec

    task = TaskSpec(kind="binary", class_names=BINARY_NAMES)  # the rules, not the data's task
    fed, hospitals = configs({**s, "seed": 0}, Path("/data"), Path("/work"), task)
    parts = {"federation": fed.model_dump(mode="json"), "hospital": hospitals[0].model_dump(mode="json"),
             "auto_training": [privacy.AUTO_BATCH, privacy.AUTO_EPOCHS, privacy.AUTO_MIN_ROUNDS]}

    def digest(v) -> str:
        return hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:12]

    return {f"rules_{k}": digest(v) for k, v in parts.items()}


def same_settings(old: dict | None, new: dict) -> bool:
    """Whether two runs' settings are the same; an option added to the benchmark since the old
    run counts as the same while it is unset (None)."""
    if old is None:
        return False
    keys = set(old) | set(new)
    return all(old.get(k) == new.get(k) for k in keys)


def changed_settings(old: dict | None, new: dict) -> list[str]:
    """The training settings (not the list of ε or the run count) that differ between two
    runs, as ``name old → new``; the same rule as :func:`same_settings`."""
    old = old or {}
    return [f"{k} {old.get(k)} → {new.get(k)}" for k in sorted(set(old) | set(new))
            if k not in ("epsilons", "runs") and old.get(k) != new.get(k)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--name", default=None, help="name in the result file (default: the data's file name)")
    add_settings_arguments(ap)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 1.0])
    ap.add_argument("--runs", type=int, default=3, help="fresh federations per figure (seeds 0..runs-1)")
    ap.add_argument("--engine", choices=("processes", "inprocess"), default="processes")
    ap.add_argument("--references", type=int, default=1, help="also run the no-DP and centralized references")
    ap.add_argument("--reference-runs", type=int, default=None, help="runs per reference (default: --runs)")
    ap.add_argument("--reference-epsilons", type=float, nargs="+", default=None,
                    help="train the references with the automatic settings of these ε (default: every one of "
                         "--epsilons); the largest one's rows are no_dp and central, a smaller one's "
                         "no_dp_at_epsE and central_at_epsE")
    ap.add_argument("--merge", action="store_true", help="keep the other figures of an existing result file")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    data = args.data.resolve()
    out_dir = args.out.resolve()
    name = args.name or data.stem
    tag = f"{name}-{args.image_size}px"
    s0 = {k: v for k, v in vars(args).items() if k not in ("data", "name", "epsilons", "runs", "engine",
                                                           "references", "reference_runs", "reference_epsilons",
                                                           "out", "merge")}
    results: dict = {"data": name, "image_size": args.image_size, "engine": args.engine,
                     "settings": {**s0, **code_rules(s0), "epsilons": args.epsilons, "runs": args.runs}}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"federated-{tag}.json"
    changed: list[str] = []  # what the file's earlier runs did differently (only with --merge)
    if args.merge and path.is_file():  # add these figures to an earlier run's (other ε, references)
        old = json.loads(path.read_text())
        changed = changed_settings(old.get("settings"), results["settings"])
        results = {**{k: v for k, v in old.items() if k.startswith(("eps", "no_dp", "central", "price"))},
                   **results}
        if not same_settings(old.get("settings"), results["settings"]):  # say what the old runs used
            results["settings_before"] = old.get("settings")
        elif "settings_before" in old:
            results["settings_before"] = old["settings_before"]

    def save():
        path.write_text(json.dumps(results, indent=2))

    def kept_and_missing(key: str, n: int) -> tuple[list[dict], list[int]]:
        """The runs row ``key`` keeps (``results`` holds the file's earlier rows only with
        ``--merge``) and the seeds of 0..n-1 it still lacks."""
        runs = list(results.get(key, {}).get("runs", []))
        done = {r.get("seed") for r in runs}
        return runs, [x for x in range(n) if x not in done]

    top = max([*args.epsilons, *(float(k[3:]) for k in results if k.startswith("eps"))])
    ref_eps = args.reference_epsilons or sorted(set(args.epsilons), reverse=True)

    def ref_key(kind: str, eps: float) -> str:  # the largest ε's references keep the plain keys
        return kind if eps == top else f"{kind}_at_eps{eps:g}"

    rows = [(f"eps{eps:g}", args.runs) for eps in args.epsilons]
    rows += [(ref_key(k, e), args.reference_runs or args.runs) for e in ref_eps
             for k in ("no_dp", "central")] if args.references else []
    for key, n in rows:  # one row, one setting: refuse before anything runs or is written
        runs, missing = kept_and_missing(key, n)
        if runs and missing and changed:
            raise SystemExit(f"bench/federated.py: row {key} of {path} was run with other settings "
                             f"({', '.join(changed)}); adding seeds {missing} would mix them. "
                             "Run without --merge, or with another --out")

    for eps in args.epsilons:
        runs, seeds = kept_and_missing(f"eps{eps:g}", args.runs)
        for seed in seeds:
            s = dict(s0, epsilon=eps, seed=seed, dp=1)
            r = (run_processes(s, data, out_dir / f"work-{tag}" / f"eps{eps:g}-seed{seed}")
                 if args.engine == "processes" else
                 run_inprocess(s, data, save=out_dir / f"work-{tag}" / f"eps{eps:g}-seed{seed}-best.pt"))
            print(json.dumps(r), flush=True)
            runs.append(r)
        results[f"eps{eps:g}"] = summarise(runs, epsilon_budget=eps)
        save()
    for e in ref_eps if args.references else []:
        for kind, over in (("no_dp", {"dp": 0}), ("central", {"dp": 0, "central": 1})):
            key = ref_key(kind, e)
            runs, seeds = kept_and_missing(key, args.reference_runs or args.runs)
            for seed in seeds:
                r = run_inprocess(dict(s0, epsilon=e, seed=seed, **over), data)
                print(json.dumps(r), flush=True)
                runs.append(r)
            results[key] = summarise(runs, reference_epsilon=e)
            save()
    price = {}
    for k, v in results.items():  # each DP row against the no-DP run with its own ε's settings, if there is one
        ref = results.get(f"no_dp_at_{k}", results.get("no_dp")) if k.startswith("eps") else None
        if ref is not None and "test_auc" in v:
            price[k] = ref["test_auc"] - v["test_auc"]
    if price:
        results["price_of_privacy_auc"] = price
    if "central" in results and "no_dp" in results:
        results["price_of_federation_auc"] = results["central"]["test_auc"] - results["no_dp"]["test_auc"]
    save()
    print(json.dumps({k: v for k, v in results.items() if k != "settings"}, indent=1, default=str)[:4000])


if __name__ == "__main__":
    main()
