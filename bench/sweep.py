"""Tuning sweeps on 2 cores: the real hospital code for N hospitals in one process.

Each setting runs :func:`xrayfed.server.simulate.simulate` (every hospital runs
``client.hospital.train_round``: its partition, DP plan, ledger, Opacus DP-SGD) and is scored
on a **validation** set that no hospital trains on (``val`` split: the official one of a
MedMNIST .npz, or the held-out patients of ``bench/heldout.py``); the test split is never read.
The model scored is the round with the best validation AUC (what the server keeps as
``checkpoints/best.pt``). One JSON line per setting is appended to ``--out``.

Usage::

    ./dev bench sweep --data ../shared/data/pneumoniamnist.npz --epsilon 8 \\
        --grid batch_size=64,128,256 lr=0.5,1,2

Grid keys: any flag below with ``-`` written as ``_`` (``batch_size``, ``local_epochs``, ``lr``,
``batch_fraction``, ``rounds``, ``views``, ``ema``, ``augment``, ``zoom``, ``aspect``, ``rotate``, ``contrast``,
``width``, ``depth``, ``input_pool``, ``ws``, ``scatter``, ``momentum``, ``server_momentum``,
``lr_schedule``, ``clip``, ``seed``, ``dp``, ``tan_scale``, ...).

``--tan-scale k`` makes 224 px sweeps affordable (Sander et al. 2023, "TAN without a burn"): every
hospital plans its round from its own budget, then trains at batch B/k and noise σ/k for the same
number of steps, so the noise in each averaged step is the plan's at 1/k of the compute. Such a
run has no privacy guarantee of its own (nothing is charged); it only ranks settings. Confirm a
winner at k = 1 before it becomes a default (docs/accuracy.md compares the two).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def add_settings_arguments(ap: argparse.ArgumentParser) -> None:
    """The federation settings shared by ``sweep.py`` and ``federated.py``."""
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--hospitals", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=float, default=None, help="default: the hospital's automatic choice")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the hospital's automatic choice")
    ap.add_argument("--batch-fraction", type=float, default=None,
                    help="automatic batch as this fraction of each hospital's N (q; default: the product's rule)")
    ap.add_argument("--physical-batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=None, help="client lr (default: the federation default)")
    ap.add_argument("--lr-schedule", default="constant")
    ap.add_argument("--momentum", type=float, default=None, help="client SGD momentum (default 0.9)")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--views", type=int, default=None, help="augmentation multiplicity K")
    ap.add_argument("--ema", type=float, default=None, help="EMA decay of the released iterate")
    ap.add_argument("--augment", type=int, default=None, help="1: one random view of each sampled scan")
    ap.add_argument("--shift", type=float, default=None, help="augmentation: translation, fraction of the side")
    ap.add_argument("--zoom", type=float, default=None, help="augmentation: zoom range ±z")
    ap.add_argument("--aspect", type=float, default=None, help="augmentation: aspect change range (width × s, "
                                                                 "s in [1/(1+a), 1+a])")
    ap.add_argument("--rotate", type=float, default=None, help="augmentation: rotation range ± degrees")
    ap.add_argument("--contrast", type=float, default=None, help="augmentation: contrast/brightness range ±c")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--input-pool", type=int, default=None)
    ap.add_argument("--scatter", type=int, default=None, help="1: the ScatterNet front end (Tramèr & Boneh 2021)")
    ap.add_argument("--ws", type=int, default=None, help="1: weight-standardised convolutions")
    ap.add_argument("--strategy", default="fedavgm")
    ap.add_argument("--server-momentum", type=float, default=None, help="default: the federation default")
    ap.add_argument("--server-lr", type=float, default=None)
    ap.add_argument("--privacy-unit", choices=("patient", "scan"), default=None,
                    help="[privacy] unit (default: patient when the data has patient ids; PneumoniaMNIST has none: "
                         "scan)")
    ap.add_argument("--aggregator", default="mean", help="mean | median | trimmed_mean ([federation] aggregator)")
    ap.add_argument("--trim-fraction", type=float, default=0.1)
    ap.add_argument("--split", default="dirichlet")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--global-ema", type=float, default=None,
                    help="also score an exponential moving average of the global models over rounds "
                         "(decay d; post-processing at the server, the federation itself is unchanged)")
    ap.add_argument("--head-bias", type=float, default=None,
                    help="probe: the round-0 model's output bias set to this value (e.g. the log-odds of the "
                         "positive class's prevalence), every other weight as the seed draws it")
    ap.add_argument("--zero-head", type=int, default=None,
                    help="probe: 1 = the round-0 model's output layer (weights and bias) set to zero, so the initial "
                         "model ranks no scan above another; every other weight as the seed draws it")
    ap.add_argument("--dp", type=int, default=1, help="1: DP-SGD (the product); 0: σ = 0 (benchmark only)")
    ap.add_argument("--central", type=int, default=0, help="1: one hospital holding every training scan")


def default_settings(**overrides) -> dict:
    """A setting with every flag of :func:`add_settings_arguments` at its default (the product's
    own choices), then ``overrides``."""
    ap = argparse.ArgumentParser()
    add_settings_arguments(ap)
    return {**vars(ap.parse_args([])), **overrides}


def moving_average(prev: dict | None, state: dict, decay: float) -> dict:
    """One step of a moving average of global models: ``decay · prev + (1 − decay) · state`` per
    tensor (float32); ``state`` itself (a copy) when there is no ``prev``."""
    return {k: v.detach().clone().float() if prev is None else prev[k] * decay + v.float() * (1 - decay)
            for k, v in state.items()}


def has_patient_ids(data: Path) -> bool:
    """Whether the data can train at the patient unit: a .npz with ``train_patient_ids``, or a
    folder layout (its loader decides from the file names / DICOM headers)."""
    if Path(data).suffix != ".npz":
        return True
    from xrayfed.common.data.npz import npz_arrays

    return "train_patient_ids" in npz_arrays(Path(data))


def configs(s: dict, data: Path, work: Path, task, eval_path: Path | None = None):
    """``(FederationConfig, [HospitalConfig])`` for settings ``s`` (a dict of the flags above)."""
    from xrayfed.common.config import FederationConfig, HospitalConfig
    from xrayfed.common.model import ModelSpec, default_model

    n = 1 if s.get("central") else s["hospitals"]
    if not s.get("privacy_unit") and not has_patient_ids(data):
        s = dict(s, privacy_unit="scan")  # PneumoniaMNIST has no patient ids: its figures are per scan
    model = default_model(s["image_size"], num_outputs=task.num_outputs).model_dump()
    for k in ("width", "depth", "input_pool"):
        if s.get(k) is not None:
            model[k] = s[k]
    if s.get("ws") is not None:
        model["weight_standardization"] = bool(s["ws"])
    if s.get("scatter") is not None:
        model["scattering"] = bool(s["scatter"])
    fed_section = {"name": "bench", "run_dir": str(work / "run"), "rounds": s["rounds"], "min_clients": n,
                   "strategy": s["strategy"], "lr_schedule": s["lr_schedule"], "seed": s["seed"],
                   "aggregator": s["aggregator"], "trim_fraction": s["trim_fraction"]}
    if s.get("lr") is not None:
        fed_section["lr"] = s["lr"]
    for k in ("server_momentum", "server_lr"):
        if s.get(k) is not None:
            fed_section[k] = s[k]
    fed = FederationConfig.model_validate({
        "federation": fed_section, "model": ModelSpec(**model).model_dump(), "task": task.to_dict(),
        "image_size": s["image_size"],
        "eval": {"path": str(eval_path or data), "split": "test", "val_split": "val"},
        "network": {"tls": {"insecure": True}},
    })
    training = {"max_physical_batch_size": s["physical_batch"]}
    if s.get("momentum") is not None:
        training["momentum"] = s["momentum"]
    for k, key in (("local_epochs", "local_epochs"), ("batch_size", "batch_size"), ("views", "augment_multiplicity"),
                   ("ema", "ema_decay"), ("augment", "augment"), ("shift", "augment_shift"),
                   ("zoom", "augment_zoom"), ("aspect", "augment_aspect"), ("rotate", "augment_rotate"),
                   ("contrast", "augment_contrast")):
        if s.get(k) is not None:
            training[key] = s[k]
    hospitals = []
    for i in range(n):
        data_section = {"path": str(data), "seed": s["seed"]}
        if n > 1:
            data_section.update(partition=f"{i}/{n}", partition_scheme=s["split"], dirichlet_alpha=s["alpha"])
        hospitals.append(HospitalConfig.model_validate({
            "hospital": {"name": f"hospital-{i}", "state_dir": str(work / f"state-{i}"), "device": "auto"},
            "data": data_section,
            "privacy": {"epsilon": s["epsilon"], "delta": s["delta"], "max_rounds": s["rounds"],
                        "max_grad_norm": s["clip"],
                        **({"unit": s["privacy_unit"]} if s.get("privacy_unit") else {})},
            "training": training,
        }))
    return fed, hospitals


def run_setting(s: dict, data: Path, *, eval_path: Path | None = None, test: bool = False) -> dict:
    """Simulate one setting; score the round with the best ``val`` AUC (and, when asked, its
    ``test`` metrics at the threshold chosen on ``val``), as the server would."""
    import torch

    from xrayfed.common.data import load_dataset
    from xrayfed.common.model import build_model
    from xrayfed.common.train import evaluate
    from xrayfed.server.federation import evaluate_global
    from xrayfed.server.simulate import simulate

    probe = load_dataset(data, split="train", image_size=8)
    with tempfile.TemporaryDirectory(prefix="xrayfed-sweep-") as tmp:
        fed, hospitals = configs(s, data, Path(tmp), probe.task, eval_path)
        val = load_dataset(fed.eval.path, split="val", image_size=fed.image_size, task=probe.task)
        t0 = time.time()
        curve: list[float] = []
        best: dict = {}
        d = s.get("global_ema")
        ema: dict = {"state": None, "curve": [], "best": {}}

        def score(state):
            m = build_model(fed.model)
            m.load_state_dict(state)
            return evaluate_global(m, fed, None, val, torch.device("cpu"))

        def on_round(r, state, replies):  # what the server does: threshold and model selection on val
            ev = score(state)
            auc = ev["metrics"]["val_auc"]
            curve.append(round(auc, 4))
            if not best or auc > best["auc"]:
                best.update(auc=auc, round=r, threshold=ev["threshold"], state={k: v.clone() for k, v in state.items()})
            if d is not None:  # a probe: the average of the global models so far, scored beside them
                ema["state"] = moving_average(ema["state"], state, d)
                e_auc = score(ema["state"])["metrics"]["val_auc"]
                ema["curve"].append(round(e_auc, 4))
                if not ema["best"] or e_auc > ema["best"]["auc"]:
                    ema["best"].update(auc=e_auc, round=r)

        initial = None
        if s.get("head_bias") is not None or s.get("zero_head"):  # the draw simulate() makes from the seed, then:
            torch.manual_seed(fed.federation.seed)
            initial = build_model(fed.model).state_dict()
            weight, bias = list(initial)[-2:]  # the last layer's (XrayNet's linear head)
            if s.get("zero_head"):
                initial[weight].zero_()
                initial[bias].zero_()
            if s.get("head_bias") is not None:
                initial[bias].fill_(s["head_bias"])
        with _auto_batch_fraction(s.get("batch_fraction")):
            res = simulate(fed, hospitals, dp=bool(s["dp"]), tan_scale=s.get("tan_scale", 1), on_round=on_round,
                           initial=initial)
        model = build_model(fed.model)
        model.load_state_dict(best["state"])
        out = {"val_auc": round(best["auc"], 4), "best_round": best["round"], "last_val_auc": curve[-1],
               "seconds": round(time.time() - t0, 1),
               "epsilon_spent": max((h.get("epsilon", 0) for h in res.rows[-1]["hospitals"]), default=None),
               "noise_multipliers": [round(h.get("noise_multiplier", 0), 3) for h in res.rows[-1]["hospitals"]],
               "steps_per_round": [h.get("steps") for h in res.rows[-1]["hospitals"]],
               "sample_rates": [round(h.get("sample_rate", 0), 4) for h in res.rows[-1]["hospitals"]],
               "params": sum(p.numel() for p in model.parameters()), "val_auc_per_round": curve}
        if d is not None:
            out.update(ema_val_auc=round(ema["best"]["auc"], 4), ema_best_round=ema["best"]["round"],
                       ema_val_auc_per_round=ema["curve"])
        if test:
            threshold = best["threshold"]
            ts = load_dataset(fed.eval.path, split="test", image_size=fed.image_size, task=probe.task)
            tm = evaluate(model, ts, fed.task, torch.device("cpu"), threshold=threshold)
            out.update(threshold=threshold, test_auc=tm["auc"], test_accuracy=tm["accuracy"],
                       test_sensitivity=tm.get("sensitivity"), test_specificity=tm.get("specificity"))
            out["_state_dict"] = best["state"]
            out["_model"] = fed.model
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--eval-data", type=Path, default=None, help="where the val split is (default: --data)")
    add_settings_arguments(ap)
    ap.add_argument("--tan-scale", type=float, default=1,
                    help="k > 1: train each hospital's plan at batch B/k and σ/k, same steps (TAN, Sander et al. "
                         "2023): about 1/k of the compute, accuracy close to the real plan's; no privacy guarantee, "
                         "for choosing settings only")
    ap.add_argument("--grid", nargs="*", default=[], help="key=v1,v2,... (the product of all keys is run)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/sweeps.jsonl"))
    args = ap.parse_args()
    base = {k: v for k, v in vars(args).items() if k not in ("data", "eval_data", "grid", "out")}
    keys, values = [], []
    for g in args.grid:
        k, _, vs = g.partition("=")
        if k not in base:
            raise SystemExit(f"--grid {g}: unknown key {k!r}; allowed: {', '.join(sorted(base))}")
        keys.append(k)
        values.append([_parse(v) for v in vs.split(",")])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for combo in itertools.product(*values):
        s = dict(base, **dict(zip(keys, combo)))
        res = run_setting(s, args.data.resolve(), eval_path=args.eval_data)
        line = {"data": args.data.name, "settings": s, **res}
        print(json.dumps({**dict(zip(keys, combo)), **{k: res[k] for k in ("val_auc", "best_round", "seconds")},
                          "sigma": res["noise_multipliers"], "steps": res["steps_per_round"],
                          "curve": res["val_auc_per_round"],
                          **({"ema_val_auc": res["ema_val_auc"], "ema_curve": res["ema_val_auc_per_round"]}
                             if "ema_val_auc" in res else {})}), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(line) + "\n")


@contextlib.contextmanager
def _auto_batch_fraction(fraction: float | None):
    """Within the block, the hospitals' automatic batch is ``fraction`` of their N (a sweep knob
    for the rule in ``client.dp.AUTO_BATCH``; the hospitals still derive B from their own N)."""
    from xrayfed.client import dp as privacy

    before = dict(privacy.AUTO_BATCH)
    if fraction is not None:
        privacy.AUTO_BATCH["fraction_of_n"] = fraction
    try:
        yield
    finally:
        privacy.AUTO_BATCH.clear()
        privacy.AUTO_BATCH.update(before)


def _parse(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


if __name__ == "__main__":
    main()
