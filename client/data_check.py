"""``xrayfed data check PATH [--config hospital.toml] [--json]``: what a hospital's data holds and,
with its config, the DP plan its budget buys — before it joins a federation.

Exit status 0 when the data can train, 1 when it cannot (the reasons are printed); bad input is
the usual one line (exit 2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xrayfed.common.data.inventory import DataReport, inventory
from xrayfed.common.errors import UserError
from xrayfed.common.privacy.accounting import compute_epsilon

SHOWN_ROUNDS = 12  # ε after each planned round: at most this many rows (evenly spaced, last included)


def plan_summary(cfg, ds=None) -> dict:
    """The DP plan of ``cfg``'s budget on this hospital's part of the data (as `xrayfed client`
    computes it): N, validation scans, σ, q, steps per round, ε after planned rounds, warnings.
    ``ds``: the ``data.split`` scans when already decoded (else they are loaded)."""
    import numpy as np

    from xrayfed.client.hospital import hospital_split
    from xrayfed.client.dp import plan_for

    d = cfg.data
    _, train, val = hospital_split(cfg, ds)
    out: dict = {"hospital": cfg.hospital.name, "train_scans": len(train), "validation_scans": 0 if val is None
                 else len(val), "epsilon_budget": cfg.privacy.epsilon, "delta": cfg.privacy.delta,
                 "accountant": cfg.privacy.accountant, "warnings": []}
    out.update(patient_figures(train, cfg.privacy.max_scans_per_patient))
    try:
        with np.errstate(divide="ignore"):  # Opacus's PRV accountant takes log(0) at q = 1: a stray warning line
            plan, _ = plan_for(cfg, train)
    except UserError as e:
        out["refused"] = str(e)
        return out
    out.update(unit=plan.unit, train_units=plan.num_examples, batch_size=plan.expected_batch_size)
    if plan.unit == "scan" and out.get("most_scans_of_one_patient", 1) > 1:
        k = out["most_scans_of_one_patient"]
        out["warnings"].append(f"the privacy unit is the scan: a patient with k scans is protected at about k·ε "
                               f"(group privacy); this hospital's most-scanned patient has {k} scans "
                               f"(ε ≈ {k * plan.epsilon_budget:g} for them)")
    r = plan.max_rounds
    rounds = sorted({max(1, round(r * k / SHOWN_ROUNDS)) for k in range(1, SHOWN_ROUNDS + 1)} | {r})
    step = (plan.noise_multiplier, plan.sample_rate, plan.steps)
    with np.errstate(divide="ignore"):
        eps = {k: compute_epsilon([step] * k, plan.delta, plan.accountant) for k in rounds}
    out.update(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps_per_round=plan.steps,
               max_rounds=r, epsilon_after_round=eps)
    if plan.sample_rate >= 1.0:
        units = "patients" if plan.unit == "patient" else "scans"
        out["warnings"].append(f"batch size {plan.expected_batch_size} ≥ N = {plan.num_examples} {units}: every step "
                               f"uses every one of them (q = 1), so DP-SGD gets no privacy amplification from sampling"
                               + ("; lower batch_size" if cfg.training.batch_size else " (automatic for small N)"))
    if plan.noise_multiplier > 5.0:
        out["warnings"].append(f"σ = {plan.noise_multiplier:.2f}: the noise is large for this data size and budget; "
                               "expect a weak model (more scans, fewer rounds or a larger ε help)")
    if val is None:
        out["warnings"].append(f"no validation scans (data.val_fraction = {d.val_fraction:g}): this hospital will "
                               "send no evaluation metrics")
    return out


def patient_figures(train, bound: int) -> dict:
    """Scans per training patient (median, max, how many patients have more than ``bound``, the
    scans averaged into a patient's contribution), when the data knows its patients."""
    import numpy as np

    if not getattr(train, "patient_ids_known", False):
        return {"patient_ids": False}
    counts: dict[str, int] = {}
    for p in train.patient_ids:
        counts[p] = counts.get(p, 0) + 1
    c = np.asarray(list(counts.values()))
    return {"patient_ids": True, "train_patients": int(len(c)), "median_scans_per_patient": float(np.median(c)),
            "most_scans_of_one_patient": int(c.max()), "patients_above_bound": int((c > bound).sum()),
            "scans_per_patient_bound": int(bound)}


def split_summary(cfg, ds, report: DataReport, source: str) -> dict:
    """How this hospital's scans divide (as `xrayfed client` divides them): ``train`` (DP
    training), ``validation`` (``data.val_fraction``), ``local_test`` (the data's own test split, or
    ``data.local_test_fraction`` of its patients when it has none), and ``set_in``: the config
    that sets them (``source``)."""
    from xrayfed.client.hospital import hospital_split

    d = cfg.data
    _, train, val = hospital_split(cfg, ds)
    test = next((s.images for s in report.splits if s.split == "test"), 0)
    return {"train": len(train), "validation": 0 if val is None else len(val), "local_test": test,
            "val_fraction": d.val_fraction, "local_test_fraction": d.local_test_fraction,
            "own_test_split": test > 0 and not _carves_test(report), "set_in": source}


def _carves_test(report: DataReport) -> bool:
    from xrayfed.common.data import carves_test

    return carves_test(report.path)


def _split_line(s: dict) -> str:
    test = (f"{s['local_test']} in the data's own test split (never trained on)" if s["own_test_split"]
            else f"{s['local_test']} held out as a local test split (local_test_fraction = {s['local_test_fraction']:g})"
            if s["local_test"] else f"none held out as a local test split (local_test_fraction = "
            f"{s['local_test_fraction']:g}: the federation's test set is the server's)")
    return (f"scans this hospital uses: {s['train']} for training, {s['validation']} for validation (val_fraction = "
            f"{s['val_fraction']:g}), {test}; set in {s['set_in']}")


def _print(report: DataReport, plan: dict | None, split: dict | None = None) -> None:
    print(f"{report.path}: {report.layout} layout, {report.task} task, classes {report.class_names}")
    for s in report.splits:
        pat = f", {s.patients} patients" if s.patients is not None else ""
        print(f"  {s.split}: {s.images} usable scans{pat}; sizes {_top(s.sizes)}; bit depth {_top(s.bit_depths)}")
        total = max(1, s.images)  # shares of the scans (a multi-label scan counts under each of its labels)
        for c in s.classes:
            cp = f", {c.patients} patients" if c.patients is not None else ""
            print(f"    {c.name:<20} {c.images:>7} scans ({100 * c.images / total:.1f} %){cp}")
        if s.unreadable:
            print(f"    {len(s.unreadable)} file(s) skipped:")
            for f, why in s.unreadable[:10]:
                print(f"      {f}: {why}")
            if len(s.unreadable) > 10:
                print(f"      ... and {len(s.unreadable) - 10} more")
        if s.links_skipped:
            print(f"    {_links_line(s.links_skipped)}")
    if split is not None:
        print(_split_line(split))
    if plan is not None:
        print(f"DP plan of {plan['hospital']} (ε = {plan['epsilon_budget']:g}, δ = {plan['delta']:g}, "
              f"{plan['accountant'].upper()}): {plan['train_scans']} training scans, {plan['validation_scans']} "
              "for validation")
        if plan.get("patient_ids"):
            print(f"  {plan['train_patients']} training patients: {plan['median_scans_per_patient']:g} scans per "
                  f"patient (median), {plan['most_scans_of_one_patient']} at most; {plan['patients_above_bound']} "
                  f"patient(s) have more than the {plan['scans_per_patient_bound']} scan(s) averaged per step")
        if plan.get("unit"):
            who = ("each patient (all of their scans together)" if plan["unit"] == "patient"
                   else "each scan (not each patient)")
            print(f"  privacy unit: {plan['unit']} — the guarantee protects {who}; N = {plan['train_units']} "
                  f"{plan['unit']}s, batch {plan['batch_size']} {plan['unit']}s")
        if "refused" in plan:
            print(f"  REFUSED: {plan['refused']}")
        else:
            print(f"  σ = {plan['noise_multiplier']:.3f}, q = {plan['sample_rate']:.4g}, {plan['steps_per_round']} "
                  f"DP-SGD steps per round, {plan['max_rounds']} rounds planned")
            print("  ε after round: " + ", ".join(f"{k}: {e:.2f}" for k, e in plan["epsilon_after_round"].items()))
        for w in plan["warnings"]:
            print(f"  WARNING: {w}")
    for w in report.warnings:
        print(f"WARNING: {w}")
    for p in report.problems:
        print(f"CANNOT TRAIN: {p}")
    ok = not report.problems and not (plan and "refused" in plan)
    print("ready to join a federation" if ok else "not ready: fix the lines marked above")


def _links_line(links: list[tuple[str, str]]) -> str:
    """One line for the links a walk did not follow: how many, and the first with its reason."""
    f, why = links[0]
    return (f"{len(links)} link(s) skipped, each scan read once and only in its own class folder "
            f"(e.g. {Path(f).parent.name}/{Path(f).name}: {why})")


def _top(counts: dict[str, int], n: int = 3) -> str:
    items = list(counts.items())
    text = ", ".join(f"{k} ({v})" for k, v in items[:n])
    return text + (f", +{len(items) - n} more" if len(items) > n else "") if items else "—"


def run_data_check(args: argparse.Namespace) -> int:
    from xrayfed.common.config import HospitalConfig, load_config

    loaded: dict = {}
    cfg = load_config(HospitalConfig, args.config, {"data.path": str(Path(args.path).resolve())})
    d = cfg.data
    report = inventory(args.path, loaded, label_set=d.labels, seed=d.seed, test_fraction=d.local_test_fraction)
    plan = split = None
    ds = loaded.get(d.split)  # the split inventory decoded already
    if ds is not None:
        source = (f"{args.config} [data]" if args.config is not None
                  else "the defaults of hospital.toml [data] (no --config)")
        split = split_summary(cfg, ds, report, source)
    if args.config is not None and ds is not None:
        plan = plan_summary(cfg, ds)
    if args.json:
        print(json.dumps({"data": report.to_dict(), "split": split, "plan": plan}, indent=2, ensure_ascii=False))
    else:
        _print(report, plan, split)
    return 1 if report.problems or (plan is not None and "refused" in plan) else 0
