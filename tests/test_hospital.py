"""A hospital's round handling: learning under DP, no privacy override, no double spend."""

from __future__ import annotations

import json
import re

import pytest
import torch

from xrayfed.client.hospital import evaluate_round, train_round
from xrayfed.client.dp import PrivacyLedger, plan_dp, plan_for, request_key
from xrayfed.common.checkpoint import weights_version
from xrayfed.common.config import HospitalConfig, load_config
from xrayfed.common.privacy.ledger import read_ledger
from xrayfed.common.model import ModelSpec, build_model


def _synthetic_npz(tmp_path_factory, name: str, n_train: int, n_val: int, n_test: int, size: int, seed: int):
    from xrayfed.common.synthetic import write_npz

    p = tmp_path_factory.mktemp("d") / name
    write_npz(p, n_train=n_train, n_val=n_val, n_test=n_test, size=size, task="binary", seed=seed)
    return p


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return _synthetic_npz(tmp_path_factory, "syn.npz", 1600, 100, 400, 28, seed=3)


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
    """Five DP rounds at ε = 8 on synthetic scans with a visible finding reach AUC ≥ 0.9 (scan
    unit; the patient unit's learning test is in test_patient_privacy.py)."""
    from xrayfed.common.data import load_dataset
    from xrayfed.common.prediction import TaskSpec
    from xrayfed.common.train import evaluate

    torch.manual_seed(0)
    cfg = cfg_for(tmp_path, npz, **{"privacy.unit": "scan"})
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
    assert again["ledger"]["seq"] == ledger.records[-1]["seq"] and again["ledger"]["head"] == ledger.records[-1]["hash"]


def test_crash_before_release_retrains_under_recorded_spend(tmp_path, npz):
    cfg = cfg_for(tmp_path, npz)
    spec = ModelSpec(num_outputs=1, width=8)
    state = build_model(spec).state_dict()
    # Simulate: spend recorded, then the process died before the update was released.
    from xrayfed.client.hospital import load_local_data
    from xrayfed.common.protocol.rounds import RoundRequest

    req = RoundRequest.from_config(request(1, spec))
    data = load_local_data(cfg, req.image_size, req.task)
    plan, _ = plan_for(cfg, data.train)
    ledger = PrivacyLedger(tmp_path / "state", cfg)
    ledger.ensure_header(plan)
    ledger.charge(plan, federation="fed", server_round=1, key=request_key("fed", 1, weights_version(state)))
    eps = ledger.spent()
    out = train_round(cfg, request(1, spec), state)
    assert out["status"] == "trained"
    ledger = PrivacyLedger(tmp_path / "state", cfg)
    assert len(ledger.train_records()) == 1 and ledger.spent() == pytest.approx(eps)
    assert [r["event"] for r in ledger.records][-2:] == ["retry", "release"]
    assert ledger.releases_without_charge() == []


# --------------------------------------------------------------------------- attacks
@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    return _synthetic_npz(tmp_path_factory, "small.npz", 300, 20, 20, 16, seed=5)


def small_cfg(tmp_path, npz, **over):
    o = {"privacy.max_rounds": 8, "training.batch_size": 64, "training.local_epochs": 0.5}
    o.update(over)
    return cfg_for(tmp_path, npz, **o)


def small_request(round_, spec, **extra):
    return request(round_, spec, **{"image-size": 16, **extra})


def _released(ledger) -> dict[str, str]:
    return {r["digest"]: r["request"] for r in ledger.records if r["event"] == "release"}


def test_replayed_old_requests_never_release_an_uncharged_update(tmp_path, small_npz):
    """A curious server re-sends rounds 1–4 three times each, after their cached updates were
    evicted: every update that leaves is a byte-identical copy of one charged release, or the
    request is refused. (Before: 16 releases for 4 charges, true ε 7.24 against a budget of 4.)"""
    from xrayfed.client.dp import update_digest

    cfg = small_cfg(tmp_path, small_npz, **{"privacy.epsilon": 4.0})
    spec = ModelSpec(num_outputs=1, width=4)
    state = build_model(spec).state_dict()
    sent: list[dict] = []
    for r in range(1, 5):
        sent.append(train_round(cfg, small_request(r, spec), state))
        assert sent[-1]["status"] == "trained"
    for _ in range(3):
        for r in range(1, 5):
            sent.append(train_round(cfg, small_request(r, spec), state))
    ledger = PrivacyLedger(tmp_path / "state", cfg)
    released = _released(ledger)
    charges = ledger.train_records()
    assert len(charges) == 4 and len(released) == 4 and ledger.releases_without_charge() == []
    statuses = [o["status"] for o in sent]
    assert statuses.count("trained") == 4
    for o in sent:
        if "state_dict" in o:
            assert update_digest(o["state_dict"]) in released  # nothing left that was not charged
    # rounds 1 and 2 were evicted from the cache (it keeps 3): refused with the reason, nothing sent
    refused = [o for o in sent if o["status"] == "refused"]
    assert refused and all("already released" in o["reason"] and "state_dict" not in o for o in refused)
    assert any(o["status"] == "resent" for o in sent)  # round 4 is still cached: sent again, no spend
    assert ledger.spent() <= 4.0 and ledger.spent() == pytest.approx(charges[-1]["epsilon"])


@pytest.mark.parametrize("damage", ["delete", "corrupt", "swap"])
def test_damaged_release_cache_never_triggers_a_retrain(tmp_path, small_npz, damage):
    cfg = small_cfg(tmp_path, small_npz)
    spec = ModelSpec(num_outputs=1, width=4)
    state = build_model(spec).state_dict()
    first = train_round(cfg, small_request(1, spec), state)
    other = train_round(cfg, small_request(2, spec), state)
    key = request_key("fed", 1, weights_version(state))
    cached = tmp_path / "state" / "released" / f"{key}.pt"
    if damage == "delete":
        cached.unlink()
    elif damage == "corrupt":
        cached.write_bytes(b"not a torch file")
    else:  # an insider puts another (e.g. unnoised) update in its place
        torch.save({"state_dict": {k: v + 1 for k, v in first["state_dict"].items()}, "metrics": first["metrics"]},
                   cached)
    again = train_round(cfg, small_request(1, spec), state)
    assert again["status"] == "refused" and "state_dict" not in again and "already released" in again["reason"]
    ledger = PrivacyLedger(tmp_path / "state", cfg)
    assert len(ledger.train_records()) == 2 and len(_released(ledger)) == 2
    assert ledger.records[-1]["event"] == "refused_resend"
    assert other["status"] == "trained"


def test_truncated_ledger_is_caught_by_the_servers_anchor(tmp_path, small_npz):
    """An insider rolls the ledger and its local head anchor back to an older copy (ε goes down):
    the head the server recorded after the last reply is missing, so the next round is refused."""
    import shutil

    from xrayfed.common.privacy.ledger import anchor_id

    cfg = small_cfg(tmp_path, small_npz)
    spec = ModelSpec(num_outputs=1, width=4)
    state = build_model(spec).state_dict()
    st = tmp_path / "state"
    first = train_round(cfg, small_request(1, spec), state)
    backup = tmp_path / "backup"
    shutil.copytree(st, backup)
    second = train_round(cfg, small_request(2, spec), state)
    eps2 = second["metrics"]["epsilon"]
    shutil.rmtree(st)
    shutil.copytree(backup, st)  # rolled back: ε looks like one round only
    assert PrivacyLedger(st, cfg).spent() < eps2  # locally consistent: only an outside anchor can tell
    anchors = json.dumps({anchor_id("fed", "h"): [second["ledger"]["seq"], second["ledger"]["head"]]})
    out = train_round(cfg, small_request(3, spec, **{"ledger-anchors": anchors}), state)
    assert out["status"] == "refused" and "state_dict" not in out
    assert "ledger check failed" in out["reason"] and "truncated" in out["reason"]
    assert len(PrivacyLedger(st, cfg).train_records()) == 1  # nothing charged, nothing trained
    # an honest ledger passes the same check (the anchor of its own last reply)
    ok = json.dumps({anchor_id("fed", "h"): [first["ledger"]["seq"], first["ledger"]["head"]]})
    assert train_round(cfg, small_request(3, spec, **{"ledger-anchors": ok}), state)["status"] == "trained"


def test_no_validation_split_sends_no_metrics_of_training_scans(tmp_path, small_npz):
    cfg = small_cfg(tmp_path, small_npz, **{"data.val_fraction": 0.0})
    spec = ModelSpec(num_outputs=1, width=4)
    m = evaluate_round(cfg, small_request(1, spec), build_model(spec).state_dict())
    assert m == {"num-examples": 0}
    m = evaluate_round(small_cfg(tmp_path, small_npz), small_request(1, spec), build_model(spec).state_dict())
    assert 0 < m["num-examples"] < 100 and "auc" in m  # the validation split only (300 scans, 10 %)


def test_delta_at_or_above_one_over_n_is_refused_in_the_round(tmp_path, small_npz):
    cfg = small_cfg(tmp_path, small_npz, **{"privacy.delta": 0.5})
    spec = ModelSpec(num_outputs=1, width=4)
    out = train_round(cfg, small_request(1, spec), build_model(spec).state_dict())
    assert out["status"] == "refused" and "privacy.delta = 0.5" in out["reason"]
    assert re.search(r"1/N = \S+ for this hospital's N = \d+ training patients", out["reason"])
    assert not any(r["event"] == "train" for r in PrivacyLedger(tmp_path / "state", cfg).records)


def test_client_refuses_meaningless_budgets_before_joining(tmp_path, small_npz, capsys):
    """δ ≥ 1/N, an infeasible ε and an absurd plan are refused by `xrayfed client` with one line,
    before anything starts (they used to start and die in the round with a traceback)."""
    from xrayfed.common import cli

    cases = {"delta": ('[privacy]\ndelta = 0.5\n', r"privacy.delta = 0.5: must be below 1/N = \S+ for this "
                                                   r"hospital's N = \d+ training patients"),
             "epsilon": ('[privacy]\nepsilon = 1e-6\n', r"privacy.epsilon = 1e-06 .* cannot be met"),
             "rounds": ('[privacy]\nmax_rounds = 10000\n[training]\nlocal_epochs = 50.0\n',
                        r"max_rounds = 10000 × \d+ DP-SGD steps per round"),
             "too_many": ('[privacy]\nmax_rounds = 10000000\n', r"privacy.max_rounds: Input should be less than")}
    for name, (toml, pattern) in cases.items():
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(f'[hospital]\nstate_dir = "{tmp_path / name}"\n' + toml)
        capsys.readouterr()
        rc = cli.main(["client", "--server", "127.0.0.1:1", "--insecure", "--data", str(small_npz),
                       "--config", str(cfg)])
        err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("xrayfed: WARNING")]
        assert rc == 2 and len(err) == 1 and err[0].startswith("xrayfed: error: "), (name, err)
        assert re.search(pattern, err[0]), (name, err[0])
        assert not (tmp_path / name / "privacy-ledger.jsonl").exists()
