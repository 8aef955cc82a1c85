"""A hospital's round handling: learning under DP, no privacy override, no double spend."""

from __future__ import annotations

import json

import pytest
import torch

from xrayfed.client.hospital import evaluate_round, train_round
from xrayfed.client.privacy import PrivacyLedger, plan_dp, request_key
from xrayfed.common.checkpoint import weights_version
from xrayfed.common.config import HospitalConfig, load_config
from xrayfed.common.ledger import read_ledger
from xrayfed.common.model import ModelSpec, build_model


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    from xrayfed.common.synthetic import write_npz

    p = tmp_path_factory.mktemp("d") / "syn.npz"
    write_npz(p, n_train=1600, n_val=100, n_test=400, size=28, task="binary", seed=3)
    return p


def cfg_for(tmp_path, npz, **over):
    o = {"hospital.name": "h", "hospital.state_dir": str(tmp_path / "state"), "hospital.device": "cpu",
         "data.path": str(npz), "privacy.epsilon": 8.0, "privacy.max_rounds": 5, "training.batch_size": 128,
         "training.local_epochs": 2.0}
    o.update(over)
    return load_config(HospitalConfig, None, o)


def request(round_: int, spec: ModelSpec, **extra):
    c = {"federation": "fed", "round": round_, "model": json.dumps(spec.model_dump()),
         "task": json.dumps({"kind": "binary", "class_names": ["NORMAL", "PNEUMONIA"]}), "image-size": 28,
         "lr": 1.0}
    c.update(extra)
    return c


def test_dp_training_learns_synthetic_finding(tmp_path, npz):
    """Five DP rounds at ε = 8 on synthetic scans with a visible finding reach AUC ≥ 0.9."""
    from xrayfed.common.data import load_dataset
    from xrayfed.common.tasks import TaskSpec
    from xrayfed.common.train import evaluate

    torch.manual_seed(0)
    cfg = cfg_for(tmp_path, npz)
    spec = ModelSpec(num_outputs=1, width=16)
    state = build_model(spec).state_dict()
    for r in range(1, 6):
        out = train_round(cfg, request(r, spec), state)
        assert out["status"] == "trained"
        state = out["state_dict"]
    test = load_dataset(npz, split="test", image_size=28)
    model = build_model(spec)
    model.load_state_dict(state)
    auc = evaluate(model, test, TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")), torch.device("cpu"))["auc"]
    assert auc >= 0.9, auc
    ledger = PrivacyLedger(tmp_path / "state", cfg)
    assert len(ledger.train_records()) == 5 and ledger.spent() <= 8.0
    assert out["metrics"]["epsilon"] == pytest.approx(ledger.spent())
    # and a sixth round is refused by the hospital itself
    out6 = train_round(cfg, request(6, spec), state)
    assert out6["status"] == "refused" and "state_dict" not in out6 and "budget" in out6["reason"]
    m = evaluate_round(cfg, request(6, spec), state)
    assert m["num-examples"] > 0 and 0 <= m["auc"] <= 1


def test_server_cannot_override_privacy(tmp_path, npz):
    cfg = cfg_for(tmp_path, npz, **{"privacy.max_rounds": 2})
    spec = ModelSpec(num_outputs=1, width=8)
    sneaky = request(1, spec, epsilon=1000.0, noise_multiplier=1e-6, max_grad_norm=1e6, max_rounds=100,
                     **{"local-epochs": 50, "batch-size": 1})
    out = train_round(cfg, sneaky, build_model(spec).state_dict())
    plan = plan_dp(cfg, out["metrics"]["num-examples"])
    assert out["metrics"]["noise_multiplier"] == pytest.approx(plan.noise_multiplier)
    assert out["metrics"]["max_grad_norm"] == 1.0 and out["metrics"]["epsilon_budget"] == 8.0
    rec = [r for r in read_ledger(tmp_path / "state" / PrivacyLedger.FILE) if r["event"] == "train"][0]
    assert rec["noise_multiplier"] == pytest.approx(plan.noise_multiplier) and rec["steps"] == plan.steps


def test_repeated_request_is_resent_without_new_spend(tmp_path, npz):
    cfg = cfg_for(tmp_path, npz)
    spec = ModelSpec(num_outputs=1, width=8)
    state = build_model(spec).state_dict()
    first = train_round(cfg, request(1, spec), state)
    eps = PrivacyLedger(tmp_path / "state", cfg).spent()
    again = train_round(cfg, request(1, spec), state)  # e.g. the server crashed and resumed
    assert again["status"] == "resent"
    assert all(torch.equal(first["state_dict"][k], again["state_dict"][k]) for k in first["state_dict"])
    ledger = PrivacyLedger(tmp_path / "state", cfg)
    assert ledger.spent() == pytest.approx(eps) and len(ledger.train_records()) == 1
    assert ledger.records[-1]["event"] == "resend"


def test_crash_before_release_retrains_under_recorded_spend(tmp_path, npz):
    cfg = cfg_for(tmp_path, npz)
    spec = ModelSpec(num_outputs=1, width=8)
    state = build_model(spec).state_dict()
    # Simulate: spend recorded, then the process died before the update was released.
    from xrayfed.client.hospital import load_local_data, RoundRequest

    req = RoundRequest.from_config(request(1, spec))
    data = load_local_data(cfg, req.image_size, req.task)
    plan = plan_dp(cfg, len(data.train))
    ledger = PrivacyLedger(tmp_path / "state", cfg)
    ledger.ensure_header(plan)
    ledger.charge(plan, federation="fed", server_round=1, key=request_key("fed", 1, weights_version(state)))
    eps = ledger.spent()
    out = train_round(cfg, request(1, spec), state)
    assert out["status"] == "trained"
    ledger = PrivacyLedger(tmp_path / "state", cfg)
    assert len(ledger.train_records()) == 1 and ledger.spent() == pytest.approx(eps)
    assert [r["event"] for r in ledger.records][-1] == "retry"
