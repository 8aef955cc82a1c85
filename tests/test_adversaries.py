"""Attacks on the privacy budget and on the global model, by a hostile server, a hospital that
lies, and an insider with disk access. Each test runs the attack against the real hospital code
(`train_round`, its ledger) and the real server strategy, and checks what the attacker gets."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from xrayfed.client.hospital import train_round
from xrayfed.client.dp import PrivacyLedger, plan_for, request_key
from xrayfed.common.checkpoint import weights_version
from xrayfed.common.config import FederationConfig, HospitalConfig, load_config
from xrayfed.common.model import ModelSpec, build_model
from xrayfed.common.privacy.ledger import anchor_id
from xrayfed.common.protocol.rounds import TrainReply

SPEC = ModelSpec(num_outputs=1, width=4)
LR = 0.5


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    from xrayfed.common.synthetic import write_npz

    p = tmp_path_factory.mktemp("d") / "small.npz"
    write_npz(p, n_train=900, n_val=20, n_test=200, size=16, task="binary", seed=5)
    return p


def hospital(tmp_path, npz, name="h", **over) -> HospitalConfig:
    o = {"hospital.name": name, "hospital.state_dir": str(tmp_path / name), "hospital.device": "cpu",
         "data.path": str(npz), "privacy.epsilon": 8.0, "privacy.max_rounds": 8, "training.batch_size": 64,
         "training.local_epochs": 0.5}
    o.update(over)
    return load_config(HospitalConfig, None, o)


def request(round_: int, spec: ModelSpec = SPEC, **extra) -> dict:
    c = {"federation": "fed", "round": round_, "model": json.dumps(spec.model_dump()),
         "task": json.dumps({"kind": "binary", "class_names": ["NORMAL", "PNEUMONIA"]}), "image-size": 16, "lr": LR}
    c.update(extra)
    return c


def charges(cfg: HospitalConfig) -> list[dict]:
    return PrivacyLedger(cfg.hospital.state_dir, cfg).train_records()


# --------------------------------------------------------------------------- ledger rollback
def _row(name: str, out: dict) -> dict:
    """The metrics row the server keeps of a reply (what `reply_row` reads from it)."""
    return {"hospital": name, "status": out["status"], "ledger_seq": out["ledger"]["seq"],
            "ledger_head": out["ledger"]["head"]}


def _anchors(anchors: dict) -> str:
    return json.dumps({anchor_id("fed", h): [seq, head] for h, (seq, head) in anchors.items()})


def test_rolled_back_ledger_stays_refused_because_the_anchor_never_moves_back(tmp_path, npz):
    """An insider copies the state folder after round 1, lets rounds 2 and 3 train, then puts the
    copy back. The next round is refused; the refusal reports the rolled-back head, which must
    not become the server's anchor, or the hospital trains on the rolled-back budget from then on."""
    from xrayfed.server.strategy import ledger_anchors

    cfg = hospital(tmp_path, npz)
    state = build_model(SPEC).state_dict()
    anchors: dict = {}
    out = train_round(cfg, request(1, **{"ledger-anchors": _anchors(anchors)}), state)
    ledger_anchors([_row("h", out)], anchors)
    st = tmp_path / "h"
    shutil.copytree(st, tmp_path / "copy")
    for r in (2, 3):
        out = train_round(cfg, request(r, **{"ledger-anchors": _anchors(anchors)}), state)
        assert out["status"] == "trained"
        ledger_anchors([_row("h", out)], anchors)
    true_eps = out["metrics"]["epsilon"]
    shutil.move(st, tmp_path / "real")
    shutil.copytree(tmp_path / "copy", st)  # rolled back: one round spent, by the local files
    before = anchors["h"]
    for r in (4, 5):
        out = train_round(cfg, request(r, **{"ledger-anchors": _anchors(anchors)}), state)
        assert out["status"] == "refused" and "state_dict" not in out, (r, out.get("reason"))
        assert "ledger check failed" in out["reason"]
        findings: list[str] = []
        ledger_anchors([_row("h", out)], anchors, findings)
        assert anchors["h"] == before and out["ledger"]["seq"] < before[0]  # never moved back
        assert len(findings) == 1 and "rolled back" in findings[0]
    assert len(charges(cfg)) == 1  # nothing was trained on the rolled-back budget
    shutil.rmtree(st)
    shutil.move(tmp_path / "real", st)  # the ledger restored: the hospital trains again, ε counts on
    out = train_round(cfg, request(6, **{"ledger-anchors": _anchors(anchors)}), state)
    assert out["status"] == "trained" and out["metrics"]["epsilon"] > true_eps


def test_refusals_never_move_an_anchor():
    from xrayfed.server.strategy import ledger_anchors

    anchors = {"h": (7, "a" * 64)}
    ledger_anchors([{"hospital": "h", "status": "refused", "ledger_seq": 9, "ledger_head": "b" * 64}], anchors)
    assert anchors["h"] == (7, "a" * 64)
    ledger_anchors([{"hospital": "h", "status": "trained", "ledger_seq": 9, "ledger_head": "b" * 64}], anchors)
    assert anchors["h"] == (9, "b" * 64)
    findings: list[str] = []  # the same line with another hash: the ledger was replaced
    ledger_anchors([{"hospital": "h", "status": "trained", "ledger_seq": 9, "ledger_head": "c" * 64}], anchors,
                   findings)
    assert anchors["h"] == (9, "b" * 64) and findings


# --------------------------------------------------------------------------- a changed plan after a crash
def test_retry_after_a_crash_trains_the_charged_plan_not_a_new_config(tmp_path, npz, monkeypatch):
    """Round 1 is charged under 5 rounds × 1 epoch, then the hospital dies before training and is
    restarted with max_rounds = 1 and 8 local epochs: the retry must train the charged σ, q, steps
    and C (before: 8× the steps at a smaller σ under the small charge, the true ε about twice the
    ledger's)."""
    from xrayfed.client import hospital as H

    charged_cfg = hospital(tmp_path, npz, **{"privacy.max_rounds": 5, "training.local_epochs": 1.0})
    state = build_model(SPEC).state_dict()
    data = H.load_local_data(charged_cfg, 16, H.RoundRequest.from_config(request(1)).task)
    plan, _ = plan_for(charged_cfg, data.train)
    ledger = PrivacyLedger(tmp_path / "h", charged_cfg)
    ledger.ensure_header(plan)
    charge = ledger.charge(plan, federation="fed", server_round=1, key=request_key("fed", 1, weights_version(state)))
    eps = ledger.spent()

    trained: list = []
    real = H.train_private_round
    monkeypatch.setattr(H, "train_private_round", lambda model, ds, cfg, p, *a, **k: trained.append(p) or
                        real(model, ds, cfg, p, *a, **k))
    new_cfg = hospital(tmp_path, npz, **{"privacy.max_rounds": 1, "training.local_epochs": 8.0})
    assert plan_for(new_cfg, data.train)[0].steps > plan.steps  # the new config would train longer
    out = train_round(new_cfg, request(1), state)
    assert out["status"] == "trained" and len(trained) == 1
    used = trained[0]
    assert (used.steps, used.sample_rate, used.max_grad_norm) == (charge["steps"], charge["sample_rate"],
                                                                   charge["max_grad_norm"])
    assert used.noise_multiplier == pytest.approx(charge["noise_multiplier"])
    assert out["metrics"]["steps"] == charge["steps"]  # what the reply reports is what trained
    assert out["metrics"]["noise_multiplier"] == pytest.approx(charge["noise_multiplier"])
    after = PrivacyLedger(tmp_path / "h", new_cfg)
    assert len(after.train_records()) == 1 and after.spent() == pytest.approx(eps)


# --------------------------------------------------------------------------- requests that would drain
def _wrong_shape(state):
    return {k: (torch.zeros(v.shape[0] + 1, *v.shape[1:]) if v.dim() else v) for k, v in state.items()}


HOSTILE = {
    "wrong shape": (lambda s, i: {**_wrong_shape(s), "nonce": torch.tensor(float(i))}, {}),
    "NaN weights": (lambda s, i: {k: torch.full_like(v, float("nan")) for k, v in s.items()}, {}),
    "float64 weights": (lambda s, i: {k: v.double() for k, v in s.items()}, {}),
    "lr 1e30": (lambda s, i: s, {"lr": 1e30}),
    "lr NaN": (lambda s, i: s, {"lr": float("nan")}),
    "proximal mu -1e30": (lambda s, i: s, {"proximal-mu": -1e30}),
    "scan size 10^6": (lambda s, i: s, {"image-size": 10**6}),
    "a file to open": (lambda s, i: s, {"model": json.dumps(SPEC.model_copy(
        update={"pretrained_path": "/nonexistent/secret.pt"}).model_dump())}),
}


def test_requests_that_fail_a_check_are_refused_before_any_charge(tmp_path, npz):
    """A server (or a broken request) sends a wrong-shaped, NaN or wrongly typed model, an absurd
    learning rate, FedProx μ or scan size, or a model that names a file on the hospital's machine:
    each is refused, nothing is charged, the reply names no local path, and an honest round
    afterwards still has the whole budget (before: five wrong-shaped requests spent ε 3.99 of 4)."""
    cfg = hospital(tmp_path, npz, **{"privacy.epsilon": 4.0})
    state = build_model(SPEC).state_dict()
    for name, (weights, over) in HOSTILE.items():
        for i in range(2 if name == "wrong shape" else 1):
            out = train_round(cfg, request(1 + i, **over), weights(state, i))
            assert out["status"] == "refused" and "state_dict" not in out, name
            assert "nothing was charged" in out["reason"], (name, out["reason"])
            assert "/nonexistent" not in out["reason"] and str(tmp_path) not in out["reason"], name
    assert charges(cfg) == [] and PrivacyLedger(tmp_path / "h", cfg).spent() == 0.0
    out = train_round(cfg, request(1), state)
    assert out["status"] == "trained" and len(charges(cfg)) == 1


def test_a_hospital_can_tighten_what_it_accepts(tmp_path, npz):
    cfg = hospital(tmp_path, npz, **{"hospital.max_server_lr": 0.1})
    out = train_round(cfg, request(1), build_model(SPEC).state_dict())
    assert out["status"] == "refused" and "hospital.max_server_lr" in out["reason"] and charges(cfg) == []
    with pytest.raises(Exception, match="max_server_lr"):  # and cannot loosen the project's limit
        hospital(tmp_path, npz, **{"hospital.max_server_lr": 1e6})


def test_the_server_never_sends_the_operators_pretrained_path(tmp_path):
    from xrayfed.common.protocol.rounds import RoundRequest
    from xrayfed.server.strategy import make_strategy

    cfg = FederationConfig.model_validate({"image_size": 16, "model": {**SPEC.model_dump(),
                                                                      "pretrained_path": str(tmp_path / "w.pt")}})
    from flwr.app import ConfigRecord

    c = make_strategy(cfg)._with_info(1, ConfigRecord({}))
    assert RoundRequest.from_config(dict(c)).model.pretrained_path is None


def test_hospital_errors_reach_the_server_without_local_paths(tmp_path, npz):
    """A request that breaks inside the hospital (here: classes its data does not have) is
    answered with the kind of error only; the details stay in the hospital's log."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

    from xrayfed.client import client_app as C
    from xrayfed.common.config import dump_toml

    cfg = hospital(tmp_path, npz)
    path = tmp_path / "hospital.toml"
    path.write_text(dump_toml(cfg))
    bad = request(1, task=json.dumps({"kind": "binary", "class_names": ["A", "B"]}))
    md = Metadata(run_id=1, message_id="m1", src_node_id=1, dst_node_id=2, reply_to_message_id="", group_id="1",
                  created_at=0.0, ttl=3600, message_type="train")
    msg = Message(content=RecordDict({"config": ConfigRecord(bad),
                                      "arrays": ArrayRecord(build_model(SPEC).state_dict())}), metadata=md)
    ctx = Context(run_id=1, node_id=2, node_config={"config": str(path)}, state=RecordDict(), run_config={})
    reply = C.train(msg, ctx)
    info = reply.content["hospital"]
    assert info["status"] == "refused" and "hospital's own log" in info["reason"]
    assert str(npz) not in info["reason"] and str(tmp_path) not in info["reason"]
    assert charges(cfg) == []


# --------------------------------------------------------------------------- lying hospitals
def _reply(node_id: int, name: str, out: dict, *, state=None, **metrics):
    from flwr.app import Message, Metadata

    content = TrainReply(hospital=name, status=out["status"], accountant="prv",
                         metrics={**out["metrics"], **metrics}, reason=out.get("reason", ""),
                         ledger_head=out["ledger"]["head"],
                         state_dict=state if state is not None else out.get("state_dict")).to_content()
    md = Metadata(run_id=1, message_id="", src_node_id=node_id, dst_node_id=1, reply_to_message_id="", group_id="1",
                  created_at=0.0, ttl=3600, message_type="train")
    return Message(content=content, metadata=md)


class _Node:
    def __init__(self, node_id: int, name: str) -> None:
        self.node_id, self.name = node_id, name


class _Registry:
    """What the strategy reads of the SuperLink's registry: which node id is which hospital's key."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names

    def get_nodes(self):
        return [_Node(i, n) for i, n in self.names.items()]


def _strategy(**fed):
    from xrayfed.server.strategy import make_strategy

    cfg = FederationConfig.model_validate({"image_size": 16, "model": SPEC.model_dump(),
                                           "federation": {"name": "fed", "strategy": "fedavg", "lr": LR, **fed}})
    return make_strategy(cfg)


def _mean(states: list[dict], weights: list[float]) -> dict[str, np.ndarray]:
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    return {k: sum(wi * s[k].double().numpy() for wi, s in zip(w, states)) for k in states[0]}


@pytest.fixture(scope="module")
def federation(tmp_path_factory, npz):
    """Five hospitals (three parts of one data set; two copies of part 0 that will lie), two rounds
    of honest DP training: ``{round: {name: reply}}`` and the global states."""
    tmp = tmp_path_factory.mktemp("fed")
    names = {"a": "0/3", "b": "1/3", "c": "2/3", "mallory": "0/3", "greedy": "0/3"}
    cfgs = {n: hospital(tmp, npz, n, **{"data.partition": p}) for n, p in names.items()}
    g0 = build_model(SPEC).state_dict()
    r1 = {n: train_round(c, request(1), g0) for n, c in cfgs.items()}
    g1 = {k: torch.from_numpy(v) for k, v in _mean([r1[n]["state_dict"] for n in r1],
                                                   [r1[n]["metrics"]["num-examples"] for n in r1]).items()}
    g1 = {k: v.to(g0[k].dtype) for k, v in g1.items()}
    r2 = {n: train_round(c, request(2), g1) for n, c in cfgs.items()}
    return {"cfgs": cfgs, "g0": g0, "g1": g1, "r1": r1, "r2": r2}


def test_poisoned_updates_are_bounded_by_the_hospitals_own_plan(federation, caplog):
    """Round 2: mallory shifts the head's bias by 30 and claims 10⁹ examples (before: accepted,
    the global model said PNEUMONIA for every scan); greedy sends an honest update but claims 10⁹
    examples; liar claims 1000× the steps its plan has, to widen its bound. Mallory and liar are
    rejected; greedy's weight is capped at its N; the global model is the mean of the rest."""
    f = federation
    s = _strategy()
    ids = {n: i for i, n in enumerate(f["r1"], start=10)}
    s.reference = {k: v.numpy() for k, v in f["g0"].items()}
    s.aggregate_train(1, [_reply(ids[n], n, out) for n, out in f["r1"].items()])  # round 1 pins every plan
    r2 = f["r2"]
    head = [k for k in r2["mallory"]["state_dict"] if k.endswith("bias")][-1]
    poisoned = {k: v.clone() for k, v in r2["mallory"]["state_dict"].items()}
    poisoned[head] += 30.0
    s.reference = {k: v.numpy() for k, v in f["g1"].items()}
    replies = [_reply(ids[n], n, r2[n]) for n in ("a", "b", "c")]
    replies.append(_reply(ids["mallory"], "mallory", r2["mallory"], state=poisoned, **{"num-examples": 1e9}))
    replies.append(_reply(ids["greedy"], "greedy", r2["greedy"], **{"num-examples": 1e9}))
    replies.append(_reply(99, "liar", r2["a"], steps=r2["a"]["metrics"]["steps"] * 1000))
    s.plans["liar"] = s.plans["a"]  # liar's first round was a's honest one
    with caplog.at_level(logging.WARNING):
        arrays, _ = s.aggregate_train(2, replies)
    rows = {r["hospital"]: r for r in s.train_rows[2]}
    assert rows["mallory"]["status"] == "rejected" and "hospital's own plan" in rows["mallory"]["reason"]
    assert rows["liar"]["status"] == "rejected" and "steps" in rows["liar"]["reason"]
    n_greedy = f["r1"]["greedy"]["metrics"]["num-examples"]
    assert rows["greedy"]["status"] == "trained" and rows["greedy"]["weight"] == n_greedy
    want = _mean([r2[n]["state_dict"] for n in ("a", "b", "c", "greedy")],
                 [r2[n]["metrics"]["num-examples"] for n in ("a", "b", "c")] + [n_greedy])
    got = {k: v.numpy() for k, v in arrays.items()}
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5)
    for n in ("a", "b", "c", "greedy"):  # honest DP updates sit well inside their bounds
        assert rows[n]["status"] == "trained"


def test_honest_updates_stay_inside_their_plan_bound(federation):
    from xrayfed.server.aggregation import HospitalPlan, dp_update_bound, num_parameters, update_distance

    f = federation
    ref = {k: v.numpy() for k, v in f["g1"].items()}
    for name, out in f["r2"].items():
        row = {("num_examples" if k == "num-examples" else k): v for k, v in out["metrics"].items()}
        plan = HospitalPlan.from_row(row)
        bound = dp_update_bound(plan, LR, num_parameters(ref.values()))
        dist = update_distance({k: v.numpy() for k, v in out["state_dict"].items()}, ref)
        assert 0 < dist < bound, (name, dist, bound)


def test_a_reply_that_names_another_hospital_is_rejected(federation):
    """mallory's key is registered as "mallory"; its reply says it is "victim" and reports a huge
    ledger head, which would have become victim's anchor and made victim refuse every round."""
    f = federation
    s = _strategy()
    s._learn_names(_Registry({10: "victim", 11: "mallory"}))
    s.reference = {k: v.numpy() for k, v in f["g0"].items()}
    honest = _reply(10, "victim", f["r1"]["a"])
    forged = _reply(11, "victim", f["r1"]["mallory"], ledger_seq=10**6)
    s.aggregate_train(1, [honest, forged])
    rows = s.train_rows[1]
    assert rows[1]["status"] == "rejected" and rows[1]["hospital"] == "mallory"
    assert rows[1]["claimed_hospital"] == "victim" and "registered as" in rows[1]["reason"]
    assert s.anchors["victim"] == (f["r1"]["a"]["ledger"]["seq"], f["r1"]["a"]["ledger"]["head"])
    assert "mallory" not in s.anchors
    # the privacy officer's report says so, under the key's hospital
    from xrayfed.server.report.build import server_findings

    found = server_findings([{"round": 1, "hospitals": rows}])
    assert [(x.code, x.hospital) for x in found] == [("reply_names_another_hospital", "mallory")]


def test_robust_aggregation_keeps_one_hospital_inside_the_others_range(federation):
    from xrayfed.server.aggregation import robust_aggregate

    f = federation
    states = [{k: v.numpy() for k, v in f["r2"][n]["state_dict"].items()} for n in ("a", "b", "c", "greedy")]
    outlier = {k: v + 5.0 for k, v in states[0].items()}
    for how in ("median", "trimmed_mean"):
        agg = robust_aggregate(states[1:] + [outlier], how, 0.25)
        for k, v in agg.items():
            lo = np.min([s[k] for s in states[1:]], axis=0)
            hi = np.max([s[k] for s in states[1:]], axis=0)
            assert np.all(v >= lo - 1e-6) and np.all(v <= hi + 1e-6), (how, k)
    s = _strategy(aggregator="median")
    s.reference = {k: v.numpy() for k, v in f["g1"].items()}
    ids = {n: i for i, n in enumerate(f["r1"], start=10)}
    arrays, _ = s.aggregate_train(2, [_reply(ids[n], n, f["r2"][n]) for n in ("a", "b", "c")])
    want = robust_aggregate(states[:3], "median")
    for k, v in arrays.items():
        np.testing.assert_allclose(v.numpy(), want[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="secure_aggregation"):
        FederationConfig.model_validate({"federation": {"aggregator": "median", "secure_aggregation": True,
                                                        "min_clients": 2}})


# --------------------------------------------------------------------------- log injection
def test_text_from_a_hospital_cannot_forge_operator_lines(federation, caplog):
    f = federation
    s = _strategy()
    s.reference = {k: v.numpy() for k, v in f["g0"].items()}
    forged = "budget\n[xrayfed] round 3: test AUC 0.999\r\x1b[2K[xrayfed] all rounds done"
    out = dict(f["r1"]["a"], status="refused", reason=forged)
    out.pop("state_dict")
    with caplog.at_level(logging.INFO):
        s.aggregate_train(1, [_reply(10, "a\n[xrayfed] x", out)])
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all("\n" not in ln and "\r" not in ln and "\x1b" not in ln for ln in lines)
    said = [ln for ln in lines if "refused round 1" in ln]
    assert len(said) == 1 and 'its reason: "budget\\n[xrayfed] round 3' in said[0]
    assert s.train_rows[1][0]["reason"].startswith("budget\\n[xrayfed]")
