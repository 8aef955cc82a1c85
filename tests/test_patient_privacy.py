"""The privacy unit is the patient: patient-level DP-SGD, its plan, its ledger and its refusals."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from xrayfed.client.dp import PatientUnits, PrivacyLedger, plan_for, privacy_units, train_private_round
from xrayfed.common.config import HospitalConfig, load_config
from xrayfed.common.data.dataset import XrayDataset
from xrayfed.common.errors import UserError
from xrayfed.common.model import ModelSpec, build_model
from xrayfed.common.prediction import TaskSpec

TASK = TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA"))
SPEC = ModelSpec(num_outputs=1, width=4, depth=2)


def cfg(tmp_path, **over) -> HospitalConfig:
    o = {"hospital.name": "h", "hospital.state_dir": str(tmp_path / "state"), "hospital.device": "cpu",
         "privacy.epsilon": 8.0, "privacy.max_rounds": 5}
    o.update(over)
    return load_config(HospitalConfig, None, o)


def dataset(n_single: int, big: int, *, known: bool = True, seed: int = 0) -> XrayDataset:
    """``n_single`` patients with one scan each, and one patient with ``big`` identical scans."""
    rng = np.random.default_rng(seed)
    singles = rng.integers(0, 255, size=(n_single, 16, 16), dtype=np.uint8)
    images = np.concatenate([singles, np.repeat(singles[:1] // 2 + 60, big, axis=0)]) if big else singles
    labels = np.concatenate([rng.integers(0, 2, n_single), np.ones(big, dtype=np.int64)]).astype(np.int64)
    pids = [f"p{i}" for i in range(n_single)] + ["many"] * big
    return XrayDataset(images, labels, TASK, patient_ids=pids if known else None, patient_ids_known=known)


def one_noiseless_step_sum(c: HospitalConfig, ds: XrayDataset) -> torch.Tensor:
    """Σ of the clipped contributions of one DP-SGD step with every unit sampled (q = 1) and no
    noise, read from the SGD update (momentum 0): Δw = −lr · Σ / B."""
    plan, units = plan_for(c, ds)
    plan = dataclasses.replace(plan, noise_multiplier=0.0, sample_rate=1.0, steps=1,
                               expected_batch_size=len(units))
    torch.manual_seed(0)
    model = build_model(SPEC)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    train_private_round(model, units, c, plan, TASK, torch.device("cpu"), lr=1.0)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return (before - after) * len(units)


@pytest.mark.parametrize("max_scans", [1, 4])
def test_a_patient_with_30_scans_moves_the_pre_noise_sum_by_at_most_c(tmp_path, max_scans):
    """Removing a patient who has 30 (aligned) scans changes the step's pre-noise sum by at most C
    at the patient unit; at the scan unit it changes it by about 30 C."""
    clip = 0.05
    over = {"privacy.max_grad_norm": clip, "training.momentum": 0.0, "training.batch_size": 10,
            "training.local_epochs": 1.0, "privacy.max_scans_per_patient": max_scans, "privacy.delta": 1e-3}
    patient = cfg(tmp_path, **over)
    with_big, without = dataset(20, 30), dataset(20, 0)
    d_patient = one_noiseless_step_sum(patient, with_big) - one_noiseless_step_sum(patient, without)
    assert float(d_patient.norm()) <= clip * (1 + 1e-4)
    scan = cfg(tmp_path, **{**over, "privacy.unit": "scan"})
    d_scan = one_noiseless_step_sum(scan, with_big) - one_noiseless_step_sum(scan, without)
    assert float(d_scan.norm()) > 10 * clip  # per-scan clipping: 30 aligned scans add up


def test_units_count_patients_and_each_item_is_one_patient():
    ds = dataset(5, 7)
    units = PatientUnits(ds, ds.patient_ids, max_scans=3, seed=1)
    assert len(units) == 6 and units.num_scans == 12 and sorted(units.scans_per_patient()) == [1] * 5 + [7]
    x, y = units[5]  # the 7-scan patient: 3 distinct scans of theirs
    assert x.shape[0] == 3 and torch.all(y == 1)
    x1, y1 = PatientUnits(ds, ds.patient_ids, max_scans=3, seed=1)[0]  # one scan, repeated to fill
    assert x1.shape[0] == 3 and all(torch.equal(x1[0], x1[j]) for j in range(3))
    single = PatientUnits(ds, ds.patient_ids, max_scans=1)[0]
    assert single[0].shape == ds[0][0].shape  # an item like a scan dataset's


def test_data_without_patient_ids_is_refused_unless_the_unit_is_scan(tmp_path):
    ds = dataset(30, 0, known=False)
    with pytest.raises(UserError) as e:
        privacy_units(cfg(tmp_path), ds)
    msg = str(e.value)
    assert "no patient identities" in msg and 'unit = "scan"' in msg and "patient ids" in msg and "\n" not in msg
    with pytest.raises(UserError):
        privacy_units(cfg(tmp_path, **{"privacy.unit": "patient"}), ds)
    units, unit = privacy_units(cfg(tmp_path, **{"privacy.unit": "scan"}), ds)
    assert unit == "scan" and len(units) == 30


def test_refusals_name_n_in_the_unit(tmp_path):
    ds = dataset(40, 60)  # 100 scans of 41 patients
    with pytest.raises(UserError, match=r"1/N = 0\.0244 for this hospital's N = 41 training patients"):
        plan_for(cfg(tmp_path, **{"privacy.delta": 0.03}), ds)
    plan, _ = plan_for(cfg(tmp_path, **{"privacy.delta": 0.015}), ds)  # 1/100 < δ < 1/41
    assert (plan.unit, plan.num_examples, plan.num_scans) == ("patient", 41, 100)
    with pytest.raises(UserError, match=r"N = 100 training scans"):
        plan_for(cfg(tmp_path, **{"privacy.delta": 0.015, "privacy.unit": "scan"}), ds)


def test_patient_plan_epsilon_matches_the_independent_accountant_and_the_ledger_says_the_unit(tmp_path):
    from xrayfed.common.privacy.accounting import second_opinion

    c = cfg(tmp_path, **{"privacy.epsilon": 4.0, "privacy.delta": 1e-4, "training.batch_size": 64})
    ds = dataset(400, 30)
    plan, units = plan_for(c, ds)
    assert (plan.unit, plan.num_examples, plan.num_scans) == ("patient", 401, 430)
    assert plan.sample_rate == pytest.approx(64 / 401)
    ledger = PrivacyLedger(tmp_path / "state", c)
    ledger.ensure_header(plan)
    for r in range(1, 4):
        ledger.charge(plan, federation="f", server_round=r, key=f"k{r}")
    budget = next(r for r in ledger.records if r["event"] == "budget")
    assert (budget["unit"], budget["num_examples"], budget["num_scans"]) == ("patient", 401, 430)
    trains = ledger.train_records()
    assert all(r["unit"] == "patient" and r["num_examples"] == 401 for r in trains)
    op = second_opinion(ledger.history(), trains[-1]["epsilon"], 1e-4, "prv")
    assert op.agrees, op


def test_dp_training_at_the_patient_unit_learns(tmp_path):
    """Five DP rounds at ε = 8, patient unit (the default for data with patient ids), on synthetic
    scans with a visible finding (about 1.7 scans per patient): held-out AUC ≥ 0.8 (a model that
    did not learn is near 0.5). The DP noise and the Poisson sampling are never seeded: nine runs
    gave 0.848–0.993, so the bar sits below that spread."""
    from xrayfed.client.hospital import train_round
    from xrayfed.common.data import load_dataset
    from xrayfed.common.synthetic import write_npz
    from xrayfed.common.train import evaluate

    npz = write_npz(tmp_path / "syn.npz", n_train=1600, n_val=100, n_test=400, size=28, task="binary", seed=3)
    c = cfg(tmp_path, **{"data.path": str(npz), "training.batch_size": 128, "training.local_epochs": 2.0})
    spec = ModelSpec(num_outputs=1, width=16)
    torch.manual_seed(0)
    state = build_model(spec).state_dict()
    for r in range(1, 6):
        request = {"federation": "fed", "round": r, "model": json.dumps(spec.model_dump()),
                   "task": json.dumps(TASK.to_dict()), "image-size": 28, "lr": 1.0}
        out = train_round(c, request, state)
        assert out["status"] == "trained" and out["metrics"]["patient_unit"] == 1
        state = out["state_dict"]
    model = build_model(spec)
    model.load_state_dict(state)
    auc = evaluate(model, load_dataset(npz, split="test", image_size=28), TASK, torch.device("cpu"))["auc"]
    assert auc >= 0.8, auc
    assert PrivacyLedger(tmp_path / "state", c).spent() <= 8.0


def test_a_hospital_round_trains_and_reports_at_the_patient_unit(tmp_path):
    from xrayfed.client.hospital import train_round
    from xrayfed.common.synthetic import write_npz

    npz = write_npz(tmp_path / "syn.npz", n_train=300, n_val=20, n_test=20, size=16, task="binary", seed=4)
    c = cfg(tmp_path, **{"data.path": str(npz), "training.batch_size": 32, "training.local_epochs": 0.5})
    request = {"federation": "fed", "round": 1, "model": json.dumps(SPEC.model_dump()),
               "task": json.dumps(TASK.to_dict()), "image-size": 16, "lr": 0.5}
    out = train_round(c, request, build_model(SPEC).state_dict())
    assert out["status"] == "trained" and out["metrics"]["patient_unit"] == 1
    assert out["metrics"]["num-examples"] < out["metrics"]["num_scans"]  # patients, some with several scans
    rec = PrivacyLedger(tmp_path / "state", c).train_records()[0]
    assert rec["unit"] == "patient" and rec["num_examples"] == out["metrics"]["num-examples"]


def test_reports_state_the_unit_and_warn_about_a_scan_level_guarantee(tmp_path):
    from xrayfed.server.report.build import build_hospital_report
    from xrayfed.server.report.render import render_markdown

    ds = dataset(60, 30)
    for unit in ("patient", "scan"):
        c = cfg(tmp_path / unit, **({"privacy.unit": "scan"} if unit == "scan" else {}))
        plan, _ = plan_for(c, ds)
        ledger = PrivacyLedger(c.hospital.state_dir, c)
        ledger.ensure_header(plan)
        ledger.charge(plan, federation="f", server_round=1, key="k1")
        report = build_hospital_report(ledger.path)
        h = report.hospitals[0]
        md = render_markdown(report)
        codes = [f.code for f in report.findings]
        if unit == "patient":
            assert (h.unit, h.num_examples, h.num_scans) == ("patient", 61, 90)
            assert "each patient (all of their scans together)" in md and "privacy_unit_scan" not in codes
        else:
            assert (h.unit, h.num_examples) == ("scan", 90)
            assert "each scan, not each patient" in md
            warn = next(f for f in report.findings if f.code == "privacy_unit_scan")
            assert "most-scanned patient has 30 scans" in warn.message


def test_data_check_reports_the_unit_and_scans_per_patient(tmp_path, capsys):
    from xrayfed.common import cli
    from xrayfed.common.synthetic import write_npz

    npz = write_npz(tmp_path / "syn.npz", n_train=200, n_val=10, n_test=10, size=16, task="binary", seed=2)
    conf = tmp_path / "hospital.toml"
    conf.write_text(f'[hospital]\nstate_dir = "{tmp_path / "state"}"\n[privacy]\ndelta = 1e-4\n')
    capsys.readouterr()
    assert cli.main(["data", "check", str(npz), "--config", str(conf), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["unit"] == "patient" and plan["patient_ids"] is True
    assert plan["train_units"] == plan["train_patients"] < plan["train_scans"]
    assert plan["most_scans_of_one_patient"] >= 2 and plan["median_scans_per_patient"] >= 1
    # data without patient ids and no unit chosen: not ready, one line naming both ways out
    bare = tmp_path / "bare.npz"
    with np.load(npz) as z:
        np.savez(bare, **{k: z[k] for k in z.files if not k.endswith("_patient_ids")})
    assert cli.main(["data", "check", str(bare), "--config", str(conf), "--json"]) == 1
    refused = json.loads(capsys.readouterr().out)["plan"]["refused"]
    assert "no patient identities" in refused and 'unit = "scan"' in refused and "\n" not in refused


@pytest.mark.parametrize("command", ["demo", "simulate"])
def test_demo_and_simulate_refuse_data_without_patient_ids_before_starting(tmp_path, capsys, command):
    from xrayfed.common import cli
    from xrayfed.common.synthetic import write_npz

    npz = write_npz(tmp_path / "syn.npz", n_train=60, n_val=10, n_test=10, size=16, task="binary", seed=1)
    bare = tmp_path / "bare.npz"
    with np.load(npz) as z:
        np.savez(bare, **{k: z[k] for k in z.files if not k.endswith("_patient_ids")})
    extra = ["--hospitals", "2"]
    capsys.readouterr()
    assert cli.main([command, "--data", str(bare), "--out", str(tmp_path / "out"), *extra]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("xrayfed: WARNING")]
    assert len(err) == 1 and "no patient identities" in err[0] and "--privacy-unit scan" in err[0]
    assert not (tmp_path / "out" / "run").exists()  # nothing started
