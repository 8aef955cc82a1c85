"""Benchmark: the privacy audit (``xrayfed audit``) of one hospital's plan — the audited lower
bound on ε beside the claimed ε, for the correct code and for deliberately broken DP.

One hospital (part ``--partition`` of the data, as in ``bench/federated.py``) audits its whole
plan (``--rounds`` rounds at each ε) with ``--canaries`` canaries of ``--auditor`` (``white-box``
gradient canaries, the default, or ``black-box`` input-space canaries scored on the final model),
and runs the loss-based membership attack (``--attack lira``: also LiRA with ``--shadows``
shadow models) on its trained model beside a no-DP reference (training vs its held-out
validation units). ``--faults`` adds rows with a benchmark-only fault injected
(:mod:`xrayfed.client.dp.faults`; never reachable from a command or a config): ``noise_0.1``,
``no_clipping``, ``accountant_half_q``. Each must be caught (``caught``: the f-DP figure above the
claimed ε by more than the accountants' tolerance, or — white-box — the canary signal-to-noise
above what the accountant's inputs imply; :func:`xrayfed.client.audit.caught_by`), the correct
code must not be. The (ε, δ) lower bound is reported beside it, not tested.

Usage::

    nice -n 10 .venv/bin/python bench/privacy_audit.py --data ../shared/data/pneumoniamnist.npz \\
        --image-size 28 --rounds 5 --epsilons 8 1 --faults noise_0.1 no_clipping accountant_half_q
    nice -n 10 .venv/bin/python bench/privacy_audit.py --data ../shared/data/pneumoniamnist.npz \\
        --image-size 28 --rounds 5 --epsilons 8 1 --auditor black-box --attack lira --faults no_clipping
    nice -n 10 .venv/bin/python bench/privacy_audit.py --data bench/results/work-kermany-heldout \\
        --name kermany-cxr-224 --image-size 224 --rounds 20 --partition-scheme patient --epsilons 8 1
    nice -n 10 .venv/bin/python bench/privacy_audit.py --data bench/results/work-kermany-heldout \\
        --name kermany-cxr-224 --image-size 224 --rounds 20 --partition-scheme patient --epsilons 8 1 \\
        --no-correct --no-mia --faults noise_0.1 no_clipping accountant_half_q

``wall_s`` is the row's wall time on this machine at its load (``load_average_1m``); ``cpu_s`` the
CPU time it used (all threads), which the machine's load does not inflate. Rows are merged into
``bench/results/privacy-audit.json`` (``{"rows": [...]}``; a row with the same data, unit, ε,
fault, canary count and auditor is replaced; a row without ``auditor`` is a white-box one). The
canaries' seed is ``--seed``; the DP noise is the product's (cryptographically secure, never
seeded), so two runs differ by the noise.

``--rescore`` trains nothing: it adds the f-DP figure (:mod:`xrayfed.client.audit_fdp`,
against the DP-SGD family of each row's claimed σ, accountant's sample rate and step count) to
every row of ``--out`` whose figure did not come from a whole-grid audit, recomputes every row's
decision with the audit's rule (``exceeds_claim``, ``caught``, ``caught_by``; white-box: the f-DP
test or the stored signal check, black-box: the f-DP test) and prints the table. A row stores
the guess count (r, v) that gave its (ε, δ) bound, one of the grid's; judging that one candidate
at β / (grid size) is valid whatever picked it (the union bound over the grid), but it is no
sharper than the fresh audit, which scans the whole grid (``fdp_from``: ``stored counts`` or
``whole grid``)::

    .venv/bin/python bench/privacy_audit.py --rescore

``--table`` prints the white-box rows as the table in docs/benchmarks.md (f-DP figure, measured
ε, (ε, δ) bound, signal check, decision, attack AUC, time)::

    .venv/bin/python bench/privacy_audit.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def hospital(args, data: Path, epsilon: float, work: Path):
    from xrayfed.common.config import HospitalConfig

    d = {"path": str(data), "seed": args.seed}
    if args.partition:
        d.update(partition=args.partition, partition_scheme=args.partition_scheme)
    priv = {"epsilon": epsilon, "delta": args.delta, "max_rounds": args.rounds, "max_grad_norm": args.clip}
    if args.privacy_unit:
        priv["unit"] = args.privacy_unit
    return HospitalConfig.model_validate({
        "hospital": {"name": "hospital-0", "state_dir": str(work / "state"), "device": "auto"},
        "data": d, "privacy": priv, "training": {"max_physical_batch_size": args.physical_batch},
    })


def row_key(row: dict) -> tuple:
    """What a new row replaces: the row with the same data, unit, ε, fault, canary count and
    auditor (a row without ``auditor`` is white-box: the only auditor before there were two)."""
    return (*(row.get(k) for k in ("data", "unit", "claimed_epsilon", "broken", "canaries")),
            row.get("auditor") or "white-box")


def decide(row: dict) -> dict:
    """``row`` with the audit's decision recomputed from its figures (:func:`~xrayfed.client.audit.decision`):
    the f-DP test, and for a white-box row its stored signal check."""
    from xrayfed.client.audit import decision

    sc = row.get("signal_check") or {}
    white = (row.get("auditor") or "white-box") == "white-box"
    ratio = sc.get("ratio_lower") if white else None
    measured = row.get("audited_lower_bound_measured") if white else None
    return {**row, **decision(row["claimed_epsilon"], row["audited_lower_bound_fdp"], row["audited_lower_bound"],
                              ratio, measured)}


def rescore_row(row: dict) -> dict:
    """``row`` with ``audited_lower_bound_fdp`` and ``fdp`` (the f-DP figure of its stored counts,
    unless a whole-grid audit gave it) and its decision recomputed (:func:`decide`)."""
    from contextlib import nullcontext

    from xrayfed.client.dp import faults
    from xrayfed.common.privacy.audit import guess_counts
    from xrayfed.client.audit_fdp import FdpBound, search_dp_sgd

    if row.get("fdp_from") == "whole grid":
        return decide(row)
    p = row["plan"]
    with faults.injected(row["broken"]) if row.get("broken") else nullcontext():
        q = faults.accountant_rate(p["sample_rate"])  # the rate the accountant was told
    m, r, v, beta = row["canaries"], row["guesses"], row["correct_guesses"], 1.0 - row["confidence"]
    steps = p["steps_per_round"] * p["max_rounds"]
    t0 = time.process_time()
    if r and v:
        b = search_dp_sgd([(m, r, v)], p["noise_multiplier"], q, steps, row["delta"], beta,
                          tests=len(guess_counts(m)))
    else:
        b = FdpBound(0.0, 1.0 - beta, row["delta"], "dp-sgd", None, 0, 0)
    return decide({**row, "audited_lower_bound_fdp": round(b.epsilon_lower_bound, 4), "fdp_from": "stored counts",
                   "fdp": {**b.to_dict(), "cpu_s": round(time.process_time() - t0, 2)}})


def rescore(path: Path) -> None:
    """Add the f-DP figure and the decision to every row of ``path`` and print the table."""
    rows = [rescore_row(r) for r in json.loads(path.read_text())["rows"]]
    path.write_text(json.dumps({"rows": rows}, indent=2))
    print("| data | auditor | fault | canaries | claimed ε | (ε, δ) bound | f-DP figure | measured ε ≥ "
          "| guesses right | σ′ rejected | signal check ≥ / implied | caught by |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["fdp"]["curve"] or {}
        sc = r.get("signal_check") or {}
        signal = f"{sc['measured_lower']:.3g} / {sc['implied']:.3g}" if sc else "—"
        me = r.get("audited_lower_bound_measured")
        print(f"| {r['data']} | {r.get('auditor') or 'white-box'} | {r['broken'] or '—'} | {r['canaries']} | "
              f"{r['claimed_epsilon']:.2f} | {r['audited_lower_bound']:.2f} | {r['audited_lower_bound_fdp']:.2f} | "
              f"{'—' if me is None else f'{me:.2f}'} | "
              f"{r['correct_guesses']} of {r['guesses']} | {c.get('noise_multiplier', float('nan')):.3g} | "
              f"{signal} | {', '.join(r['caught_by']) or 'not caught'} |")


def table(path: Path) -> str:
    """The white-box rows of ``path`` as docs/benchmarks.md's table (between its
    ``privacy-audit-table`` markers)."""
    def num(x, fmt=".2f"):
        return "—" if x is None else format(x, fmt)

    out = ["| data | unit | fault | claimed ε | f-DP figure (95 %) | measured ε ≥ (99.9 %) | (ε, δ) lower bound (95 %; "
           "right of guesses) | signal check: measured ≥ / implied | caught by | attack AUC DP / no DP | canaries "
           "| wall time |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    faults = [None, "noise_0.1", "no_clipping", "accountant_half_q"]

    def order(r: dict) -> tuple:
        return (r["canaries"], r["data"] != "pneumoniamnist", -round(r["claimed_epsilon"]),
                faults.index(r["broken"]) if r["broken"] in faults else len(faults))

    rows = [r for r in json.loads(path.read_text())["rows"] if (r.get("auditor") or "white-box") == "white-box"]
    for r in sorted(rows, key=order):
        sc = r.get("signal_check") or {}
        mia = (f"{r['mia_auc_dp']:.3f} / {r['mia_auc_no_dp']:.3f}" if r.get("mia_auc_dp") is not None
               and r.get("mia_auc_no_dp") is not None else "—")
        caught = ", ".join(r["caught_by"])
        out.append(
            f"| {r['data']} {r['image_size']} px | {r['unit']} | {r['broken'] or '— (correct)'} | "
            f"{r['claimed_epsilon']:.2f} | {r['audited_lower_bound_fdp']:.2f} | "
            f"{num(r.get('audited_lower_bound_measured'))} | "
            f"{r['audited_lower_bound']:.2f} ({r['correct_guesses']} of {r['guesses']}) | "
            f"{num(sc.get('measured_lower'), '.3g')} / {num(sc.get('implied'), '.3g')} | "
            f"{f'**{caught}**' if caught else 'no'} | {mia} | {r['canaries']} | "
            f"{r['wall_s']:.0f} s (load {r['load_average_1m']:.0f}, CPU {r['cpu_s']:.0f} s) |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=False)
    ap.add_argument("--rescore", action="store_true",
                    help="add the f-DP figure and recompute the decision of the rows of --out; train nothing")
    ap.add_argument("--table", action="store_true",
                    help="print the white-box rows of --out as docs/benchmarks.md's table; train nothing")
    ap.add_argument("--name", default=None, help="name in the result file (default: the data's file name)")
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--rounds", type=int, default=5, help="[privacy] max_rounds: the plan that is audited")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 1.0])
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=0.125)
    ap.add_argument("--partition", default="0/3", help="this hospital's part of the data ('' = all of it)")
    ap.add_argument("--partition-scheme", default="iid", choices=("iid", "dirichlet", "patient"))
    ap.add_argument("--privacy-unit", choices=("patient", "scan"), default=None,
                    help="default: patient when the data has patient ids, else scan")
    ap.add_argument("--physical-batch", type=int, default=256)
    ap.add_argument("--auditor", choices=("white-box", "black-box"), default="white-box")
    ap.add_argument("--canaries", type=int, nargs="+", default=None,
                    help="default: 40000 (white-box; one per weight at most), min(1000, half the units) (black-box)")
    ap.add_argument("--attack", choices=("loss", "lira"), default="loss", help="membership attack of the correct rows")
    ap.add_argument("--shadows", type=int, default=8, help="LiRA's shadow models (--attack lira)")
    ap.add_argument("--faults", nargs="*", default=[], help="also audit with these faults injected")
    ap.add_argument("--no-correct", action="store_true",
                    help="only the --faults rows (the correct rows of --epsilons are already in the file)")
    ap.add_argument("--fault-epsilons", type=float, nargs="+", default=None,
                    help="ε of the broken rows (default: --epsilons)")
    ap.add_argument("--no-mia", action="store_true", help="skip the membership attack of the correct rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/privacy-audit.json"))
    args = ap.parse_args()
    if args.rescore:
        rescore(args.out)
        return
    if args.table:
        print(table(args.out))
        return
    if args.data is None:
        ap.error("--data is required (unless --rescore)")

    import tempfile

    from xrayfed.client.audit import run_audit, summary_lines
    from xrayfed.client.dp import faults
    from xrayfed.common.data import load_dataset
    from xrayfed.common.data.npz import npz_arrays

    data = args.data.resolve()
    name = args.name or data.stem
    if args.privacy_unit is None and data.suffix == ".npz" and "train_patient_ids" not in npz_arrays(data):
        args.privacy_unit = "scan"  # PneumoniaMNIST has no patient ids: its audit is per scan
    ds = load_dataset(data, split="train", image_size=args.image_size)
    rows_path = args.out
    canaries = args.canaries or [None]  # the audit's own default (xrayfed.client.audit.DEFAULT_CANARIES, or black-box's)
    jobs = [] if args.no_correct else [(eps, None, m) for eps in args.epsilons for m in canaries]
    jobs += [(eps, f, canaries[0]) for f in args.faults for eps in (args.fault_epsilons or args.epsilons)]
    common = dict(image_size=args.image_size, lr=args.lr, seed=args.seed, ds=ds, auditor=args.auditor)
    for eps, fault, m in jobs:
        with tempfile.TemporaryDirectory(prefix="xrayfed-audit-") as tmp:
            cfg = hospital(args, data, eps, Path(tmp))
            t0, c0 = time.time(), time.process_time()
            if fault:
                with faults.injected(fault):
                    res = run_audit(cfg, canaries=m, mia=False, **common)
            else:
                res = run_audit(cfg, canaries=m, mia=not args.no_mia, attack=args.attack, shadows=args.shadows,
                                **common)
        print("\n".join(summary_lines(res)), flush=True)
        mia = res.get("mia") or {}
        lira = mia.get("lira") or {}
        row = {
            "data": name, "image_size": args.image_size, "unit": res["unit"], "broken": fault,
            "auditor": args.auditor,
            "claimed_epsilon": round(res["claimed_epsilon"], 4), "delta": res["delta"],
            "audited_lower_bound": round(res["audited_lower_bound"], 4), "confidence": res["confidence"],
            "audited_lower_bound_fdp": round(res["audited_lower_bound_fdp"], 4), "fdp": res["fdp"],
            "fdp_from": "whole grid",
            "audited_lower_bound_measured": (None if res.get("audited_lower_bound_measured") is None
                                             else round(res["audited_lower_bound_measured"], 4)),
            "measured": res.get("measured"), "exceeds_claim": res["exceeds_claim"],
            "measured_exceeds_claim": res["measured_exceeds_claim"],
            "eps_delta_exceeds_claim": res["eps_delta_exceeds_claim"], "signal_check": res.get("signal_check"),
            "caught": res["caught"], "caught_by": res["caught_by"],
            "canaries": res["canaries"], "guesses": res["guesses"], "correct_guesses": res["correct_guesses"],
            "mia_auc_dp": mia.get("auc_dp"), "mia_auc_no_dp": mia.get("auc_no_dp"),
            "mia_lira_auc_dp": lira.get("auc_dp"), "mia_lira_auc_no_dp": lira.get("auc_no_dp"),
            "mia_lira_tpr_at_1pct_fpr_dp": lira.get("tpr_at_1pct_fpr_dp"),
            "mia_lira_tpr_at_1pct_fpr_no_dp": lira.get("tpr_at_1pct_fpr_no_dp"),
            "mia_lira_shadows": lira.get("shadows"), "mia_lira_wall_s": lira.get("wall_s"),
            "mia_members": mia.get("members"), "mia_non_members": mia.get("non_members"),
            "plan": res["plan"], "rounds": args.rounds, "partition": args.partition or None,
            "wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "cpus": os.cpu_count(), "seed": args.seed,
        }
        old = json.loads(rows_path.read_text()) if rows_path.is_file() else {"rows": []}
        kept = [r for r in old["rows"] if row_key(r) != row_key(row)]
        rows_path.parent.mkdir(parents=True, exist_ok=True)
        rows_path.write_text(json.dumps({"rows": kept + [row]}, indent=2))


if __name__ == "__main__":
    main()
