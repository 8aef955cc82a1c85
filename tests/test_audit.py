"""The privacy audit: the one-run lower bound's arithmetic, its teeth (deliberately broken DP is
caught, the correct code is not), the command, and that an audit charges nothing.

Seed policy: the canaries (inclusion, coordinates, sampling) and the initial model are seeded;
the teeth test trains with ``secure_rng = false`` so that the DP noise comes from torch's seeded
generator — the run is then a function of its seeds, and the settings leave wide margins (the
correct code's bound is below a third of the claimed ε, every fault's well above it)."""

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
    assert ok["signal_check"]["ratio_lower"] < 1.0 and not ok["caught"]
    assert "no evidence" in ok["verdict"]
    for fault in ("noise_0.1", "no_clipping"):
        bad = run(fault)
        assert bad["broken"] == fault
        assert bad["audited_lower_bound"] > 2 * bad["claimed_epsilon"], fault
        assert bad["caught"] and "LARGER than claimed" in bad["verdict"]
    half_q = run("accountant_half_q")
    assert half_q["claimed_epsilon"] == pytest.approx(1.0, abs=0.02)
    assert half_q["signal_check"]["ratio_lower"] > 1.2 and half_q["caught"]
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
    assert f"claimed ε = {res['claimed_epsilon']:.2f} (δ = 1e-05); audited lower bound" in text
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
    # the fault switch is a Python context manager only: no option, no environment variable
    help_text = build_parser()._subparsers._group_actions[0].choices["audit"].format_help()
    assert not any(w in help_text for w in ("--fault", "--broken", "noise_0.1", "no_clipping", "half_q"))
    source = Path(faults_mod.__file__).read_text()
    assert "os.environ" not in source and "getenv" not in source and "import os" not in source
    with pytest.raises(ValueError):
        with faults_mod.injected("no_noise_at_all"):
            pass


def _audit_file(path, hospital: str, claimed: float, bound: float, broken=None, mia=None):
    from xrayfed.client.audit import verdict

    path.write_text(json.dumps({
        "hospital": hospital, "unit": "scan", "claimed_epsilon": claimed, "delta": 1e-5,
        "audited_lower_bound": bound, "confidence": 0.95, "canaries": 10000, "caught": bound > claimed,
        "signal_check": {"ratio_lower": 0.8}, "mia": mia or {}, "broken": broken,
        "verdict": verdict(claimed, bound, 0.95)}))


def test_reports_show_the_empirical_check_when_an_audit_is_present(tmp_path):
    import xrayfed.server.report as R
    from report_synth import Site, make_run

    run = make_run(tmp_path / "run", [Site("north", 800, noise_multiplier=1.0)], rounds=2)
    plain = R.build_federation_report(run)
    assert plain.empirical_checks == [] and "Empirical check" not in R.render_markdown(plain)

    _audit_file(run / "hospitals" / "north" / "audit.json", "north", 8.0, 0.9,
                mia={"auc_dp": 0.512, "auc_no_dp": 0.634})
    _audit_file(run / "audit-south.json", "south", 1.0, 3.4, broken="noise_0.1")
    (run / "audit-garbled.json").write_text("{not json")
    rep = R.build_federation_report(run)
    assert sorted(c.hospital for c in rep.empirical_checks) == ["north", "south"]
    assert [f.hospital for f in rep.findings if f.code == "audit_exceeds_claim"] == ["south"]
    assert any(f.code == "audit_unreadable" and "audit-garbled.json" in f.message for f in rep.findings)
    md = R.render_markdown(rep)
    assert "## Empirical check" in md
    assert ("north (per scan): claimed ε = 8.00; audited lower bound 0.90 at 95 % confidence from 10000 canaries — "
            "no evidence that ε is larger than claimed (a lower bound can reveal a bug, never prove its absence). "
            "Membership attack on its model: AUC 0.512 with DP, 0.634 without (0.5 = a coin).") in md
    assert "south (per scan): claimed ε = 1.00; audited lower bound 3.40" in md
    assert "the training spends MORE privacy than it claims" in md
    written = {p.name for p in R.write_report(rep, tmp_path / "out", ["md", "html"])}
    assert "empirical-check.png" in written
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'id="empirical-check"' in html and 'id="plot-empirical-check"' in html

    own = R.build_hospital_report(run / "hospitals" / "north")
    assert [c.hospital for c in own.empirical_checks] == ["north"]
    assert "## Empirical check" in R.render_markdown(own)
