"""The privacy audit: the one-run lower bound's arithmetic, its teeth (deliberately broken DP is
caught, the correct code is not), the command, and that an audit charges nothing.

Seed policy: the canaries (inclusion, coordinates, sampling) and the initial model are seeded;
the teeth test trains with ``secure_rng = false`` so that the DP noise comes from torch's seeded
generator. The Poisson sampling of each step draws from the operating system (never seeded), so
two runs differ by which units each step samples: the settings leave wide margins (the correct
code's bound is below a third of the claimed ε, every fault's well above it; the black-box and
LiRA tests' margins were measured over repeated runs)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from xrayfed.common.privacy.audit import (
    attack_auc,
    audit,
    epsilon_lower_bound,
    guess_counts,
    p_value,
    signal_check,
)


def test_all_correct_guesses_without_delta_match_the_closed_form():
    # δ = 0 and v = r: P[Binomial(r, p) ≥ r] = p^r, so the bound solves (e^ε/(1+e^ε))^r = β.
    for r, beta in ((100, 0.05), (1000, 0.01), (20, 0.1)):
        p = beta ** (1 / r)
        assert epsilon_lower_bound(r, r, r, 0.0, beta) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)
    assert epsilon_lower_bound(100, 100, 100, 0.0, 0.05) == pytest.approx(3.4930, abs=1e-4)


def test_pure_dp_p_value_is_the_binomial_tail():
    for m, r, v, eps in ((1000, 200, 150, 1.0), (500, 500, 400, 2.0), (50, 10, 3, 0.5)):
        q = math.exp(eps) / (1 + math.exp(eps))
        assert p_value(m, r, v, eps, 0.0) == pytest.approx(stats.binom.sf(v - 1, r, q), rel=1e-9)
    # a coin's accuracy (half right) is no evidence: ε = 0 cannot be rejected
    assert epsilon_lower_bound(1000, 1000, 500, 1e-5) == 0.0


def test_delta_term_follows_the_papers_algorithm():
    """β + 2mδ·max_i P[v−i ≤ B < v]/i, recomputed here term by term (Steinke et al., Algorithm 3)."""
    m, r, v, eps, delta = 2000, 300, 260, 1.5, 1e-4
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, acc = 0.0, 0.0
    for i in range(1, v + 1):
        acc += stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, acc / i)
    assert p_value(m, r, v, eps, delta) == pytest.approx(min(1.0, beta + alpha * delta * 2 * m), rel=1e-9)
    assert p_value(m, r, v, eps, delta) > p_value(m, r, v, eps, 0.0)
    # the δ term caps the bound: more δ, a smaller bound from the same guesses
    assert epsilon_lower_bound(m, r, v, 1e-3) < epsilon_lower_bound(m, r, v, 1e-6)


def test_audit_of_separated_and_of_random_scores():
    rng = np.random.default_rng(0)
    inc = rng.random(2000) < 0.5
    perfect = audit(inc.astype(float) + rng.random(2000) * 0.1, inc, delta=0.0)
    grid = guess_counts(2000)
    n_in = int(inc.sum())  # separated: the top k are right up to n_in, the bottom k up to 2000 − n_in
    best = max(epsilon_lower_bound(2000, 2 * k, min(k, n_in) + min(k, 2000 - n_in), 0.0, 0.05 / len(grid))
               for k, _ in grid)
    assert perfect.epsilon_lower_bound == pytest.approx(best, abs=1e-5)
    assert perfect.guesses > 0 and perfect.correct >= perfect.guesses - abs(2 * n_in - 2000)
    coin = audit(rng.normal(size=2000), inc, delta=1e-5)
    assert coin.epsilon_lower_bound < 0.5


def test_attack_auc_and_signal_check():
    assert attack_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert attack_auc([0, 1], [2, 3]) == 0.0
    assert attack_auc([1, 1], [1, 1]) == 0.5
    rng = np.random.default_rng(1)
    inc = rng.random(4000) < 0.5
    sums = inc * 2.0 + rng.normal(size=4000)  # μ = 2
    check = signal_check(sums, inc, implied=1.0)
    assert check.measured == pytest.approx(2.0, abs=0.15) and check.ratio_lower > 1.5
    assert signal_check(sums, inc, implied=2.5).ratio_lower < 1.0


def test_the_decision_is_the_f_dp_test_and_the_eps_delta_bound_is_only_reported():
    from xrayfed.client.audit import FDP_TEST, MEASURED_TEST, SIGNAL_TEST, caught_by, verdict

    # ε = 8, every guess right of a broken run: the (ε, δ) bound is capped below the claim, the f-DP figure is not
    assert caught_by(7.99, 12.46) == [FDP_TEST]
    text = verdict(7.99, 12.46, 5.86, 0.95)
    assert text.startswith("the audit found evidence that ε is LARGER than claimed: the training is LESS private "
                           "than DP-SGD at ε = 12.46 would be (95 % confidence), against the claimed ε = 7.99")
    # the reverse disagreement: an (ε, δ) bound above the claim is not a catch on its own
    assert caught_by(1.0, 0.9) == [] and caught_by(1.0, 0.9, ratio_lower=0.95) == []
    text = verdict(1.0, 0.9, 1.2, 0.95)
    assert text.startswith("the audit found no evidence ε is larger than claimed: f-DP figure 0.90, (ε, δ) lower "
                           "bound 1.20 at 95 % confidence vs claimed 1.00")
    assert "not one of the audit's tests" in text and "never prove its absence" in text
    # the accountants' tolerance, max(0.05, 0.02·ε): PLD's ε of a correct σ may sit that far above PRV's claim
    assert caught_by(8.0, 8.15) == [] and caught_by(8.0, 8.17) == [FDP_TEST]
    assert caught_by(1.0, 1.04) == [] and caught_by(1.0, 1.06) == [FDP_TEST]
    assert "less than the accountants' tolerance 0.05" in verdict(1.0, 1.04, 0.7, 0.95)
    # the signal check (white-box) catches on its own; no f-DP figure (None) never catches
    assert caught_by(1.0, 0.96, ratio_lower=1.66) == [SIGNAL_TEST]
    assert caught_by(1.0, 6.3, ratio_lower=9.8) == [FDP_TEST, SIGNAL_TEST] and caught_by(1.0, None) == []
    assert "1.66× the weight" in verdict(1.0, 0.96, 0.79, 0.95, ratio_lower=1.66)
    # the measured figure (white-box) is a test by the same rule: a run told half its rate at ε = 8
    assert caught_by(8.0, 7.6, ratio_lower=2.0, measured_epsilon=15.7) == [MEASURED_TEST, SIGNAL_TEST]
    assert caught_by(8.0, 4.0, ratio_lower=0.97, measured_epsilon=8.15) == []
    assert caught_by(8.0, 4.0, measured_epsilon=8.17) == [MEASURED_TEST]
    text = verdict(8.0, 7.6, 4.3, 0.95, ratio_lower=2.0, measured_epsilon=15.7)
    assert text.startswith("the audit MEASURED the training spending more privacy than claimed: its canaries show "
                           "DP-SGD at ε ≥ 15.70 (at 99.9 % confidence) against the claimed ε = 8.00")
    assert "measured ε ≥ 7.30" in verdict(8.0, 4.0, 3.0, 0.95, ratio_lower=0.97, measured_epsilon=7.3)


def test_the_benchmarks_rescore_applies_the_same_decision_to_stored_rows():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "privacy_audit.py"
    spec = importlib.util.spec_from_file_location("privacy_audit_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def row(claimed, fdp, eps_delta, ratio=None, auditor="white-box", measured=None):
        sc = None if ratio is None else {"ratio_lower": ratio, "exceeds": ratio > 1.0}
        return {"claimed_epsilon": claimed, "audited_lower_bound_fdp": fdp, "audited_lower_bound": eps_delta,
                "signal_check": sc, "auditor": auditor, "caught": "stale", "exceeds_claim": "stale",
                "audited_lower_bound_measured": measured}

    broken = bench.decide(row(7.99, 12.46, 5.86, ratio=9.9))  # ε = 8: the (ε, δ) bound is capped below the claim
    assert broken["caught"] and broken["exceeds_claim"] and not broken["eps_delta_exceeds_claim"]
    assert broken["caught_by"] == ["f-DP figure", "signal check"]
    half_q = bench.decide(row(0.99, 0.96, 0.79, ratio=1.66))
    assert half_q["caught_by"] == ["signal check"] and not half_q["exceeds_claim"]
    half_q8 = bench.decide(row(8.0, 7.6, 4.3, ratio=2.0, measured=15.7))
    assert half_q8["caught_by"] == ["measured ε", "signal check"] and half_q8["measured_exceeds_claim"]
    assert not bench.decide(row(7.99, 4.04, 3.06, ratio=0.96, measured=7.3))["caught"]
    correct = bench.decide(row(7.99, 4.04, 3.06, ratio=0.96))
    assert correct["caught"] is False and correct["caught_by"] == []
    # a black-box row has no signal check: a stored one would not count
    assert bench.decide(row(0.99, 0.5, 0.2, ratio=3.0, auditor="black-box", measured=5.0))["caught"] is False
    assert bench.decide(row(0.99, 1.5, 0.9, auditor="black-box"))["caught_by"] == ["f-DP figure"]


def test_a_run_is_caught_by_its_f_dp_figure_whatever_its_eps_delta_bound(tmp_path, monkeypatch):
    import xrayfed.client.audit as A
    from xrayfed.client.audit_fdp import FdpBound

    # the correct code at ε = 8 (its f-DP figure stays below the claim: the teeth test); here the figure is
    # replaced by one above the claim, as if the guesses had rejected the claimed mechanism
    cfg = _hospital(tmp_path, epsilon=8.0, local_epochs=1.0)  # 2 rounds of 8 steps: seconds
    figure = 9.0
    monkeypatch.setattr(A, "fdp_bound", lambda *a: FdpBound(figure, 0.95, 1e-5, "dp-sgd", None, 1, 1))
    torch.manual_seed(0)
    res = A.run_audit(cfg, image_size=8, canaries=500, mia=False, seed=0)
    assert res["claimed_epsilon"] == pytest.approx(8.0, abs=0.05) and res["audited_lower_bound_fdp"] == figure
    assert res["audited_lower_bound"] < res["claimed_epsilon"] and not res["eps_delta_exceeds_claim"]
    assert res["signal_check"]["ratio_lower"] < 1.0
    assert res["caught"] and res["exceeds_claim"] and res["caught_by"] == [A.FDP_TEST]
    assert "LARGER than claimed" in res["verdict"] and f"DP-SGD at ε = {figure:.2f}" in res["verdict"]


def test_the_default_canary_count_is_one_per_weight_when_the_model_has_fewer(tmp_path, monkeypatch):
    import xrayfed.client.audit as A
    from xrayfed.common.model import build_model, default_model

    cfg = _hospital(tmp_path, epsilon=8.0, local_epochs=1.0)
    spec = default_model(8).model_copy(update={"width": 4})  # a model with fewer weights than the default count
    weights = sum(p.numel() for p in build_model(spec).parameters() if p.requires_grad)
    assert weights < A.DEFAULT_CANARIES
    assert A.run_audit(cfg, image_size=8, model_spec=spec, mia=False, seed=0)["canaries"] == weights
    monkeypatch.setattr(A, "DEFAULT_CANARIES", 300)
    assert A.run_audit(cfg, image_size=8, model_spec=spec, mia=False, seed=0)["canaries"] == 300


def _hospital(tmp_path, epsilon: float = 1.0, **training):
    from xrayfed.common.config import HospitalConfig
    from xrayfed.common.synthetic import write_npz

    data = write_npz(tmp_path / "scans.npz", n_train=1000, n_val=10, n_test=10, size=8)
    return HospitalConfig.model_validate({
        "hospital": {"state_dir": str(tmp_path / "state"), "device": "cpu"},
        "data": {"path": str(data), "val_fraction": 0.2},
        "privacy": {"epsilon": epsilon, "delta": 1e-5, "max_rounds": 2, "unit": "scan", "secure_rng": False},
        "training": {"batch_size": 100, "max_physical_batch_size": 512, **training},
    })


@pytest.mark.slow
def test_broken_dp_is_caught_and_the_correct_code_is_not(tmp_path):
    from xrayfed.client.audit import run_audit
    from xrayfed.client.dp import faults
    from xrayfed.common.modelspec import ModelSpec

    cfg = _hospital(tmp_path)
    spec = ModelSpec(width=16, depth=2)

    def run(fault=None):
        torch.manual_seed(0)
        kw = dict(image_size=8, model_spec=spec, canaries=4000, mia=False, seed=0)
        if fault is None:
            return run_audit(cfg, **kw)
        with faults.injected(fault):
            return run_audit(cfg, **kw)

    ok = run()
    assert ok["claimed_epsilon"] == pytest.approx(1.0, abs=0.02)
    assert ok["audited_lower_bound"] < ok["claimed_epsilon"] / 2
    # the f-DP figure (against DP-SGD with the claimed q and steps), the audit's test, stays below the claim
    assert ok["audited_lower_bound_fdp"] < ok["claimed_epsilon"] and ok["fdp"]["family"] == "dp-sgd"
    assert not ok["exceeds_claim"] and not ok["eps_delta_exceeds_claim"]
    assert ok["signal_check"]["ratio_lower"] < 1.0 and not ok["caught"] and ok["caught_by"] == []
    # the measured figure (the ε of the mechanism the canaries show) stays below the claim, and is not vacuous
    assert 0.3 * ok["claimed_epsilon"] < ok["audited_lower_bound_measured"] < ok["claimed_epsilon"]
    assert ok["measured"]["noise"] == pytest.approx(ok["plan"]["noise_multiplier"], rel=0.05)  # s = σ·C, C = 1
    assert "no evidence" in ok["verdict"]
    for fault in ("noise_0.1", "no_clipping"):
        bad = run(fault)
        assert bad["broken"] == fault
        assert bad["audited_lower_bound"] > 2 * bad["claimed_epsilon"], fault
        assert bad["audited_lower_bound_fdp"] > 2 * bad["claimed_epsilon"], fault
        assert bad["exceeds_claim"] and bad["caught"] and "f-DP figure" in bad["caught_by"], fault
        assert bad["audited_lower_bound_measured"] > 2 * bad["claimed_epsilon"] and "measured ε" in bad["caught_by"]
        assert "LARGER than claimed" in bad["verdict"] and "LESS private than DP-SGD" in bad["verdict"]
    half_q = run("accountant_half_q")
    assert half_q["claimed_epsilon"] == pytest.approx(1.0, abs=0.02)
    assert half_q["signal_check"]["ratio_lower"] > 1.2 and half_q["caught"] and "signal check" in half_q["caught_by"]
    # the measured figure shows the ε really spent (about twice the claim; its lower end, from 4 000 canaries,
    # above the claim: 1.13–1.32 in eight audits against 1.04)
    assert half_q["measured"]["epsilon_estimate"] > 1.5 * half_q["claimed_epsilon"]
    assert half_q["audited_lower_bound_measured"] > half_q["claimed_epsilon"] + 0.05
    assert "measured ε" in half_q["caught_by"] and half_q["measured_exceeds_claim"]
    assert faults.active() is None
    assert not (tmp_path / "state").exists()  # nothing charged: no ledger, no state folder


def test_the_command_audits_charges_nothing_and_reports_in_plain_words(tmp_path, capsys):
    from xrayfed.common.cli import main
    from xrayfed.common.config import dump_toml

    cfg = _hospital(tmp_path, epsilon=8.0, local_epochs=1.0)  # 2 rounds of 8 steps: seconds
    toml = tmp_path / "hospital.toml"
    toml.write_text(dump_toml(cfg))
    from xrayfed.common.checkpoint import Checkpoint
    from xrayfed.common.model import build_model
    from xrayfed.common.modelspec import default_model
    from xrayfed.common.prediction import TaskSpec

    from xrayfed.common.security.atrest import load_key, make_atrest_key, save_checkpoint

    spec = default_model(8, 1)  # a finished run's global model (encrypted at rest): the membership attack's target
    key_file = make_atrest_key(tmp_path / "atrest.key")
    save_checkpoint(tmp_path / "best.pt", Checkpoint(model=spec, task=TaskSpec(kind="binary", class_names=["normal",
                    "pneumonia"]), image_size=8, state_dict=build_model(spec).state_dict(), round=3),
                    load_key(key_file))
    out = tmp_path / "audit.json"
    args = ["audit", "--config", str(toml), "--model", str(tmp_path / "best.pt"), "--canaries", "500",
            "--out", str(out), "--seed", "1"]
    assert main(args) == 2  # the encrypted model without its key: the one line every command gives
    assert "the file is encrypted; pass --atrest-key-file" in capsys.readouterr().err
    rc = main([*args, "--atrest-key-file", str(key_file)])
    text = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["audited_lower_bound"] < res["claimed_epsilon"] and res["broken"] is None
    assert 0.0 <= res["mia"]["auc_dp"] <= 1.0 and 0.0 <= res["mia"]["auc_no_dp"] <= 1.0
    assert res["mia"]["model"] == "best.pt (round 3)" and res["image_size"] == 8
    claim = f"claimed ε = {res['claimed_epsilon']:.2f} (δ = 1e-05)"
    assert f"{claim}; f-DP figure {res['audited_lower_bound_fdp']:.2f}" in text
    assert f"(ε, δ) one-run lower bound {res['audited_lower_bound']:.2f} at δ = 1e-05, 95 % confidence" in text
    assert "the audit found no evidence ε is larger than claimed" in text
    assert "never prove its absence" in text and "membership inference (loss attack" in text
    assert "AUC" in text and "on the DP model best.pt (round 3)" in text
    assert not (tmp_path / "state").exists()  # no ledger was opened or written


def test_bad_input_is_one_line_and_the_faults_are_out_of_reach(tmp_path, capsys):
    from pathlib import Path

    import xrayfed.client.dp.faults as faults_mod
    from xrayfed.common.cli import build_parser, main
    from xrayfed.common.config import dump_toml

    toml = tmp_path / "hospital.toml"
    toml.write_text(dump_toml(_hospital(tmp_path)))
    assert main(["audit", "--config", str(toml), "--canaries", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["xrayfed: error: --canaries 1: the audit needs at least 2 canaries"]
    for bad, line in ((["--auditor", "grey-box"], "--auditor grey-box: choose white-box"),
                      (["--attack", "shadow"], "--attack shadow: choose loss or lira"),
                      (["--attack", "lira", "--shadows", "2"], "--shadows 2: LiRA needs 4..64 shadow models"),
                      (["--auditor", "black-box", "--canaries", "5000"],
                       "--canaries 5000: the black-box audit changes the labels of m of this hospital's 800 "
                       "training scans; use 2..800")):
        assert main(["audit", "--config", str(toml), "--image-size", "8", *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"xrayfed: error: {line}"), err
    # the fault switch is a Python context manager only: no option, no environment variable
    help_text = build_parser()._subparsers._group_actions[0].choices["audit"].format_help()
    assert not any(w in help_text for w in ("--fault", "--broken", "noise_0.1", "no_clipping", "half_q"))
    source = Path(faults_mod.__file__).read_text()
    assert "os.environ" not in source and "getenv" not in source and "import os" not in source
    with pytest.raises(ValueError):
        with faults_mod.injected("no_noise_at_all"):
            pass


def _audit_file(path, hospital: str, claimed: float, bound: float, broken=None, mia=None, auditor=None, fdp=None,
                measured=None):
    """An audit result; without ``fdp``, one from before the f-DP figure (the (ε, δ) bound decided);
    without ``measured``, one from before the measured figure."""
    from xrayfed.client.audit import caught_by, verdict

    figures = {"caught": bound > claimed, "verdict": "as it was"}
    if fdp is not None:
        figures = {"audited_lower_bound_fdp": fdp, "caught": bool(caught_by(claimed, fdp, 0.8, measured)),
                   "verdict": verdict(claimed, fdp, bound, 0.95, 0.8, measured_epsilon=measured)}
    if measured is not None:
        figures.update(audited_lower_bound_measured=measured, measured={"confidence": 0.999})
    path.write_text(json.dumps({**({"auditor": auditor} if auditor else {}),
        "hospital": hospital, "unit": "scan", "claimed_epsilon": claimed, "delta": 1e-5,
        "audited_lower_bound": bound, "confidence": 0.95, "canaries": 10000, **figures,
        "signal_check": {"ratio_lower": 0.8}, "mia": mia or {}, "broken": broken}))


def test_reports_show_the_empirical_check_when_an_audit_is_present(tmp_path):
    import xrayfed.server.report as R
    from report_synth import Site, make_run

    run = make_run(tmp_path / "run", [Site("north", 800, noise_multiplier=1.0)], rounds=2)
    plain = R.build_federation_report(run)
    assert plain.empirical_checks == [] and "Empirical check" not in R.render_markdown(plain)

    _audit_file(run / "hospitals" / "north" / "audit.json", "north", 8.0, 0.9,  # older files: no f-DP figure
                mia={"auc_dp": 0.512, "auc_no_dp": 0.634})
    _audit_file(run / "audit-south.json", "south", 1.0, 3.4, broken="noise_0.1")
    _audit_file(run / "audit-west.json", "west", 8.0, 0.4, auditor="black-box input-space canaries (final model only)",
                mia={"auc_dp": 0.51, "auc_no_dp": 0.6, "lira": {"shadows": 8, "auc_dp": 0.523, "auc_no_dp": 0.712}})
    # with the f-DP figure: caught by it where the (ε, δ) bound stays below the claim, and a correct run
    _audit_file(run / "audit-east.json", "east", 7.99, 5.86, broken="no_clipping", fdp=12.46)
    _audit_file(run / "audit-centre.json", "centre", 7.99, 3.06, fdp=4.04, measured=7.3)
    # told half its sample rate: the f-DP figure lands near the claim, the measured figure well above it
    _audit_file(run / "audit-lake.json", "lake", 8.0, 4.3, broken="accountant_half_q", fdp=7.6, measured=15.7)
    (run / "audit-garbled.json").write_text("{not json")
    rep = R.build_federation_report(run)
    assert sorted(c.hospital for c in rep.empirical_checks) == ["centre", "east", "lake", "north", "south", "west"]
    flagged = sorted(f.hospital for f in rep.findings if f.code == "audit_exceeds_claim")
    assert flagged == ["east", "lake", "south"]  # the finding follows each file's decision
    lake = next(f for f in rep.findings if f.code == "audit_exceeds_claim" and f.hospital == "lake")
    assert "MEASURED the training spending more privacy than claimed" in lake.message and "15.70" in lake.message
    east = next(f for f in rep.findings if f.code == "audit_exceeds_claim" and f.hospital == "east")
    assert "LESS private than DP-SGD at ε = 12.46" in east.message
    assert any(f.code == "audit_unreadable" and "audit-garbled.json" in f.message for f in rep.findings)
    md = R.render_markdown(rep)
    assert "## Empirical check" in md
    assert ("north (per scan): claimed ε = 8.00; audited lower bound 0.90 at 95 % confidence from 10000 canaries — "
            "no evidence that ε is larger than claimed (a lower bound can reveal a bug, never prove its absence). "
            "Membership attack on its model: AUC 0.512 with DP, 0.634 without (0.5 = a coin).") in md
    assert "south (per scan): claimed ε = 1.00; audited lower bound 3.40" in md
    assert "the training spends MORE privacy than it claims" in md
    assert ("west (per scan): claimed ε = 8.00; audited lower bound 0.40 at 95 % confidence from 10000 canaries "
            "(black-box: input-space canaries scored on the final model only) — no evidence") in md
    assert "LiRA (8 shadow models): AUC 0.523 with DP, 0.712 without." in md
    assert "LiRA" not in md.split("- north")[1].split("\n")[0]  # an older audit file: no auditor, no LiRA
    assert "| west | scan | black-box | 8.00 | — | — | 0.40 |" in md  # older files: no f-DP or measured figure
    assert "| north | scan | white-box | 8.00 | — | — | 0.90 |" in md
    assert "| east | scan | white-box | 7.99 | 12.46 | — | 5.86 |" in md
    assert "| centre | scan | white-box | 7.99 | 4.04 | 7.30 | 3.06 |" in md
    assert "| lake | scan | white-box | 8.00 | 7.60 | 15.70 | 4.30 |" in md
    assert ("centre (per scan): claimed ε = 7.99; f-DP figure 4.04 (the audit's test: the training is less "
            "private than DP-SGD at that ε would be) and (ε, δ) lower bound 3.06 (its ε is at least that) at 95 % "
            "confidence; measured ε ≥ 7.30 at 99.9 % (the noise, clipping and sample rate the canaries met, as "
            "DP-SGD's ε) from 10000 canaries — no evidence that ε is larger than claimed") in md
    assert "east (per scan): claimed ε = 7.99; f-DP figure 12.46" in md
    assert "the training spends MORE privacy than it claims" in md.split("- east")[1].split("\n")[0]
    explanation = md.split("## Empirical check")[1].split("- ")[0]
    assert "f-DP figure" in explanation and "measured ε" in explanation  # the explanation names every figure
    written = {p.name for p in R.write_report(rep, tmp_path / "out", ["md", "html"])}
    assert "empirical-check.png" in written
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'id="empirical-check"' in html and 'id="plot-empirical-check"' in html

    own = R.build_hospital_report(run / "hospitals" / "north")
    assert [c.hospital for c in own.empirical_checks] == ["north"]
    assert "## Empirical check" in R.render_markdown(own)


# ----------------------------------------------------------------------------- black-box auditor, LiRA
def test_lira_scores_match_a_hand_made_gaussian_example():
    from xrayfed.client.lira import balanced_splits, lira_scores, logit_confidence, tpr_at_fpr

    # two units, four shadows: in {3, 5} / out {0, 2} (μ 4 / 1) and in {1, 3} / out {−1, 1} (μ 2 / 0);
    # every residual is ±1, so the pooled variance is 8 / (4 × 1) = 2
    phi = np.array([[3.0, 0.0, 5.0, 2.0], [1.0, -1.0, 3.0, 1.0]])
    inside = np.array([[True, False, True, False], [True, False, True, False]])
    target = np.array([4.0, 0.0])
    got = lira_scores(target, phi, inside)
    assert got == pytest.approx([9 / 4, -1.0])
    s = math.sqrt(2.0)
    assert got == pytest.approx(stats.norm.logpdf(target, [4, 2], s) - stats.norm.logpdf(target, [1, 0], s))
    split = balanced_splits(50, 8, np.random.default_rng(0))
    assert split.shape == (50, 8) and (split.sum(axis=1) == 4).all() and 10 < split[:, 0].sum() < 40
    # φ = log(p / (1 − p)) of the true label, from the logits
    p = 1 / (1 + np.exp(-np.array([0.3, -2.0])))
    assert logit_confidence("binary", np.array([[0.3], [-2.0]]), np.array([1.0, 0.0])) == pytest.approx(
        np.log(np.array([p[0], 1 - p[1]]) / np.array([1 - p[0], p[1]])))
    z = np.array([[1.0, 2.0, 0.5]])
    soft = np.exp(z[0]) / np.exp(z[0]).sum()
    assert logit_confidence("multiclass", z, np.array([1]))[0] == pytest.approx(math.log(soft[1] / (1 - soft[1])))
    assert tpr_at_fpr(np.arange(10.0), np.arange(100.0) / 100, fpr=0.01) == pytest.approx(0.9)  # above 0.98


def _record_training(monkeypatch):
    """Replace the DP training the audit calls by a recorder (nothing trains): what it was given."""
    import xrayfed.client.audit as A
    import xrayfed.client.dp as dp

    seen: list[dict] = []
    monkeypatch.setattr(dp, "train_private_round", lambda model, units, cfg, plan, task, dev, **kw: seen.append(
        {"units": units, "plan": plan, **kw}))
    made: list = []
    real = A.make_input_canaries
    monkeypatch.setattr(A, "make_input_canaries", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    return seen, made


def test_black_box_canaries_train_with_changed_labels_and_the_excluded_are_absent(tmp_path, monkeypatch):
    from xrayfed.client.audit import run_audit, summary_lines
    from xrayfed.client.dp import PatientUnits, plan_for
    from xrayfed.common.privacy.accounting import tolerance
    from xrayfed.client.hospital import hospital_split
    from xrayfed.common.data import load_dataset

    cfg = _hospital(tmp_path)
    cfg = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"unit": "patient"})})
    seen, made = _record_training(monkeypatch)
    res = run_audit(cfg, image_size=8, canaries=60, mia=False, seed=3, auditor="black-box")
    _, train, _ = hospital_split(cfg, load_dataset(cfg.data.path, split="train", image_size=8))
    real_plan, _ = plan_for(cfg, train)
    canaries = made[0]
    assert len(seen) == real_plan.max_rounds and all(s.get("canaries") is None for s in seen)  # no gradient canary
    plan = seen[0]["plan"]  # the hospital's plan, planned on its real training set
    assert (plan.noise_multiplier, plan.sample_rate, plan.steps, plan.num_examples) == (
        real_plan.noise_multiplier, real_plan.sample_rate, real_plan.steps, real_plan.num_examples)
    units = seen[0]["units"]
    assert isinstance(units, PatientUnits)
    scans = units.scans
    key = {bytes(img): i for i, img in enumerate(train.images)}
    assert len(key) == len(train)  # every scan distinct: a scan is found by its pixels
    trained = [key[bytes(img)] for img in scans.images]
    assert len(set(trained)) == len(trained)  # no scan twice (no clean copy beside a canary)
    pids = np.array(train.patient_ids)
    groups = {p: np.nonzero(pids == p)[0] for p in dict.fromkeys(train.patient_ids)}
    names = list(groups)
    inc_names = {names[i] for i, keep in zip(canaries.chosen, canaries.included) if keep}
    out_names = {names[i] for i, keep in zip(canaries.chosen, canaries.included) if not keep}
    assert len(inc_names) > 10 and len(out_names) > 10
    want = sorted(i for p, g in groups.items() if p not in out_names for i in g)
    assert sorted(trained) == want  # the others and the included canaries; no excluded canary's scan
    assert len(units) == len(groups) - len(out_names)
    y0, y1 = train.targets.numpy(), scans.targets.numpy()
    flipped = np.array([pids[i] in inc_names for i in trained])
    assert (y1[flipped] == 1 - y0[np.array(trained)][flipped]).all()  # every label of a canary patient changed
    assert (y1[~flipped] == y0[np.array(trained)][~flipped]).all()  # the others as they are
    assert res["auditor"].startswith("black-box") and "signal_check" not in res
    assert res["canaries"] == 60 and res["caught"] == res["exceeds_claim"]  # no signal check: the f-DP test alone
    assert res["exceeds_claim"] == (res["audited_lower_bound_fdp"] > res["claimed_epsilon"]
                                    + tolerance(res["claimed_epsilon"]))
    lines = summary_lines(res)
    assert "the black-box auditor: 60 input-space canaries (final model only)" in lines[0]
    assert not any("signal-to-noise" in line for line in lines)


def test_multiclass_canaries_get_another_class_and_the_feature_cache_keeps_them_apart(tmp_path):
    import torch as T

    from xrayfed.client.audit_input import changed_targets, make_input_canaries, scan_losses
    from xrayfed.common.data import load_dataset
    from xrayfed.common.model import build_model, feature_cache
    from xrayfed.common.modelspec import default_model
    from xrayfed.common.synthetic import write_npz

    ds = load_dataset(write_npz(tmp_path / "mc.npz", n_train=80, n_val=4, n_test=4, size=16, task="multiclass"),
                      split="train", image_size=16)
    groups = [np.array([i]) for i in range(0, 80, 2)]
    new = changed_targets(ds.task, ds.targets, groups, np.random.default_rng(0))
    hit = np.concatenate(groups)
    assert (new[hit] != ds.targets[hit]).all() and ((new >= 0) & (new < len(ds.task.class_names))).all()
    assert (new[1::2] == ds.targets[1::2]).all()
    assert len(set(((new[hit] - ds.targets[hit]) % len(ds.task.class_names)).tolist())) > 1  # drawn, not a shift
    # the scattering front end caches features by pixels: a canary shares its clean scan's entry, and its
    # loss (changed label) is the same with the cache as without it
    canaries = make_input_canaries(ds, "scan", 20, seed=0)
    T.manual_seed(0)
    model = build_model(default_model(16, ds.task.num_outputs))
    assert default_model(16, 1).scattering
    dev = T.device("cpu")
    with feature_cache(True):
        clean = scan_losses(model, ds, ds.task, dev)  # fills the cache with the clean scans
        cached = canaries.scores(model, ds.task, dev)
    with feature_cache(False):
        fresh = canaries.scores(model, ds.task, dev)
    assert cached == pytest.approx(fresh, rel=1e-6)
    assert not np.allclose(-cached, clean[canaries.chosen])  # the changed labels are what is scored


def _linear_model(monkeypatch, pixels: int) -> None:
    """A linear model over the pixels: it memorises a small training set, so a canary's changed label shows."""
    import xrayfed.common.model as model_mod

    monkeypatch.setattr(model_mod, "build_model",
                        lambda spec: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(pixels, 1)))


def _small_hospital(tmp_path, n: int, offset: int, batch: int):
    """n scans of 16 × 16 uniform noise, half of them validation; label 1 brightens the left half by
    ``offset`` grey levels, label 0 the right half (``offset`` 0: labels that only memorising can fit).
    One round of 30 epochs at ε = 1."""
    from xrayfed.common.config import HospitalConfig

    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in (("train", n), ("val", 4), ("test", 4)):
        y = (rng.random(k) < 0.5).astype(np.uint8)
        img = rng.integers(0, 256 - offset, (k, 16, 16))
        img[y == 1, :, :8] += offset
        img[y == 0, :, 8:] += offset
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = img.astype(np.uint8), y.reshape(-1, 1)
    np.savez(tmp_path / "small.npz", **arrays)
    return HospitalConfig.model_validate({
        "hospital": {"state_dir": str(tmp_path / "state"), "device": "cpu"},
        "data": {"path": str(tmp_path / "small.npz"), "val_fraction": 0.5},
        "privacy": {"epsilon": 1.0, "delta": 1e-5, "max_rounds": 1, "unit": "scan", "secure_rng": False},
        "training": {"batch_size": batch, "max_physical_batch_size": 512, "local_epochs": 30},
    })


@pytest.mark.filterwarnings("ignore:Full backward hook")  # the linear model's input needs no gradient
def test_black_box_audit_catches_training_without_noise(tmp_path, monkeypatch):
    from xrayfed.client.audit import run_audit
    from xrayfed.client.dp import faults

    _linear_model(monkeypatch, 256)
    cfg = _small_hospital(tmp_path, n=400, offset=60, batch=40)  # 200 training scans, 100 canaries

    def run():
        torch.manual_seed(0)
        return run_audit(cfg, image_size=16, canaries=100, mia=False, seed=0, lr=0.5, auditor="black-box")

    ok = run()
    assert ok["claimed_epsilon"] == pytest.approx(1.0, abs=0.02)
    assert ok["audited_lower_bound"] < ok["claimed_epsilon"] / 4
    assert ok["audited_lower_bound_fdp"] < ok["claimed_epsilon"] / 4 and not ok["caught"]
    with faults.injected("noise_0.1"):
        weak = run()
    # seen by both figures (measured: (ε, δ) 0.58–0.82, f-DP 1.07–1.35): at the edge of the claimed 1.0 plus
    # its tolerance 0.05, so caught or not by the f-DP test alone
    assert weak["audited_lower_bound"] > 0.3 and weak["audited_lower_bound_fdp"] > 0.8
    assert weak["caught"] == (weak["audited_lower_bound_fdp"] > weak["claimed_epsilon"] + 0.05)
    monkeypatch.setattr(faults, "noise_scale", lambda: 0.0)  # a test-only fault: no noise at all
    bad = run()
    assert bad["claimed_epsilon"] == pytest.approx(ok["claimed_epsilon"])
    assert bad["audited_lower_bound"] > bad["claimed_epsilon"]  # measured 1.63
    assert bad["audited_lower_bound_fdp"] > 2 * bad["claimed_epsilon"]  # measured 2.96
    assert bad["caught"] and bad["caught_by"] == ["f-DP figure"] and "LARGER than claimed" in bad["verdict"]


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_lira_finds_the_members_of_a_memorising_model(tmp_path, monkeypatch):
    from xrayfed.client.audit import run_audit, summary_lines

    _linear_model(monkeypatch, 256)
    cfg = _small_hospital(tmp_path, n=200, offset=0, batch=50)  # random labels: 100 memorised training scans
    torch.manual_seed(0)
    res = run_audit(cfg, image_size=16, canaries=100, seed=0, lr=0.5, attack="lira", shadows=4)
    mia = res["mia"]
    lira = mia["lira"]
    assert lira["shadows"] == 4 and lira["trainings"] == 8
    assert lira["members_no_dp"] == mia["members"] and lira["non_members"] == mia["non_members"]
    assert lira["auc_no_dp"] > 0.75 and mia["auc_no_dp"] > 0.75  # the no-DP reference memorised (0.92, 0.88)
    assert lira["auc_dp"] < 0.65 and lira["tpr_at_1pct_fpr_no_dp"] > lira["tpr_at_1pct_fpr_dp"]
    assert 0.0 <= lira["tpr_at_1pct_fpr_dp"] <= 1.0 and 0.0 <= lira["tpr_at_1pct_fpr_no_dp"] <= 1.0
    text = "\n".join(summary_lines(res))
    assert "membership inference (loss attack" in text
    assert "membership inference (LiRA, 4 shadow models with DP and 4 without: 8 more trainings of the plan)" in text


def test_the_audit_trains_on_the_scans_the_rounds_train_on(tmp_path):
    """The audit decodes the hospital's data as its rounds do (its classes, its local test split):
    a flat folder with a local test split is audited on the same N as the hospital plans on."""
    from xrayfed.client.audit import run_audit
    from xrayfed.client.dp import plan_for
    from xrayfed.client.hospital import hospital_split
    from xrayfed.common.config import HospitalConfig
    from xrayfed.common.synthetic import write_class_folders

    root = write_class_folders(tmp_path / "flat", n_train=80, n_test=40, size=24, seed=3, flat=True)
    cfg = HospitalConfig.model_validate({
        "hospital": {"state_dir": str(tmp_path / "state"), "device": "cpu"},
        "data": {"path": str(root), "val_fraction": 0.2, "local_test_fraction": 0.3},
        "privacy": {"epsilon": 8.0, "delta": 1e-5, "max_rounds": 2, "unit": "scan", "secure_rng": False},
        "training": {"local_epochs": 1.0, "max_physical_batch_size": 512}})
    plan, _ = plan_for(cfg, hospital_split(cfg)[1])
    res = run_audit(cfg, image_size=8, canaries=200, mia=False, seed=0)
    assert res["plan"]["units"] == plan.num_examples and res["plan"]["scans"] == plan.num_scans
