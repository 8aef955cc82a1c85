"""Privacy-budget reports: exact figures, plots, second opinion, tamper evidence, warnings."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from report_synth import Site, hospital_config, make_run
from xrayfed.client.dp import BudgetExceeded, PrivacyLedger, compute_epsilon, plan_dp
from xrayfed.common import cli
from xrayfed.common.privacy.ledger import append_record
from xrayfed.common.errors import UserError
from xrayfed.server import report as R

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")
DELTA = 1e-5


def ledger_at(tmp: Path, site: Site, rounds: int, federation: str = "fed") -> Path:
    """A hospital ledger written through the real PrivacyLedger API; refusals are recorded too."""
    cfg = hospital_config(site, tmp / site.name)
    plan = plan_dp(cfg, site.n)
    ledger = PrivacyLedger(cfg.hospital.state_dir, cfg)
    ledger.ensure_header(plan)
    for r in range(1, rounds + 1):
        try:
            ledger.charge(plan, federation=federation, server_round=r, key=f"{federation}-{r}")
        except BudgetExceeded:
            pass
    return ledger.path


def pngs_in_html(html: str) -> list:
    from PIL import Image

    out = []
    for b64 in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html):
        im = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
        im.load()  # decodes the whole image
        out.append(im)
    return out


# ------------------------------------------------------------------------------------------ fixtures
# A known ledger: N = 1000, B = 64 → q = 0.064, 16 steps per round, σ = 1.1, budget ε = 2.5 at δ = 1e-5.
# Rounds 1 and 2 fit (ε = 1.8615, 2.3467); round 3 would reach 2.7365 and is refused.
KNOWN = Site("h1", n=1000, epsilon=2.5, noise_multiplier=1.1)


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("known")
    path = ledger_at(tmp, KNOWN, rounds=3)
    out = tmp / "out"
    assert cli.main(["report", "--ledger", str(path), "--out", str(out)]) == 0
    return path, out, R.Report.model_validate_json((out / "report.json").read_text())


# A federation: st-marys has budget to spare, riverside runs out in round 3, northgate has secure RNG off.
SITES = [
    Site("st-marys", n=1000, epsilon=4.0, noise_multiplier=1.1),
    Site("riverside", n=600, epsilon=2.5, noise_multiplier=1.3),
    Site("northgate", n=1500, epsilon=8.0, noise_multiplier=0.9, secure_rng=False),
]


@pytest.fixture(scope="module")
def fed_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("fed") / "run", SITES, rounds=3, federation="synthetic")


@pytest.fixture(scope="module")
def fed(fed_run):
    out = fed_run / "report"
    assert cli.main(["report", str(fed_run)]) == 0  # default --out RUN_DIR/report, all formats
    return out, R.Report.model_validate_json((out / "report.json").read_text())


# ------------------------------------------------------------------------------------------ hospital report
def test_known_ledger_exact_figures(known):
    path, out, rep = known
    assert rep.kind == "hospital" and rep.schema_version == "1"
    (h,) = rep.hospitals
    q, steps = 64 / 1000, 16
    spent = compute_epsilon([(1.1, q, steps)] * 2, DELTA)  # the training accountant, from (σ, q, steps)
    assert spent == pytest.approx(2.3467, abs=5e-4)
    assert h.epsilon_spent == pytest.approx(spent, rel=1e-8)
    assert h.epsilon_left == pytest.approx(2.5 - spent, rel=1e-8)
    assert (h.epsilon_budget, h.delta, h.num_examples) == (2.5, DELTA, 1000)
    assert (h.rounds_trained, h.rounds_refused, h.rounds_more) == (2, 1, 0)
    assert (h.noise_multiplier, h.max_grad_norm, h.sample_rate, h.steps_per_round) == (1.1, 1.0, q, steps)
    assert (h.accountant, h.secure_mode, h.secure_rng, h.total_steps) == ("prv", False, True, 32)
    assert [(r.round, r.status) for r in h.rounds] == [(1, "trained"), (2, "trained"), (3, "refused")]
    assert h.rounds[0].epsilon == pytest.approx(compute_epsilon([(1.1, q, steps)], DELTA), rel=1e-9)
    assert h.rounds[2].epsilon_if_trained == pytest.approx(compute_epsilon([(1.1, q, steps)] * 3, DELTA), rel=1e-6)
    # Second opinion shown beside every ε, agreeing within the stated tolerance.
    assert h.second_opinion.agrees and h.second_opinion.independent_method == "pld"
    assert abs(h.second_opinion.epsilon_independent - spent) <= max(0.05, 0.02 * spent)
    assert all(r.agrees for r in h.rounds) and rep.accounting.checks == 4 and rep.accounting.disagreements == 0
    # The Markdown table shows the same figures.
    md = (out / "report.md").read_text()
    row = f"| h1 | scan (not patient) | 1000 scans | {spent:.3f} of 2.5 | {2.5 - spent:.3f} | 1e-05 | 2 | 1 | 0 / 2 | 0 | common |"
    assert row in md
    assert "| h1 | 1.1000 | 1 | 0.0640 | 16 | 32 | PRV | off | on |" in md  # the DP parameters, in the details
    assert "budget_exhausted" in md and "Ledger of h1" in md


def test_hospital_html_embeds_decodable_plot(known):
    _, out, rep = known
    html = (out / "report.html").read_text()
    assert "<img" in html and "http" not in html.split("<main>", 1)[1]  # self-contained
    ims = pngs_in_html(html)
    assert len(ims) == 1 and ims[0].size[0] >= 600 and ims[0].size[1] >= 400  # ε per round (no AUC for a hospital)
    assert [p.name for p in rep.plots] == ["epsilon-per-round"]
    assert (out / "epsilon-per-round.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_exhausted_is_warned(known):
    codes = {(f.code, f.level) for f in known[2].findings}
    assert ("budget_exhausted", "warning") in codes
    assert not any(c in {"delta_ge_1_over_n", "secure_rng_off", "accountant_disagreement"} for c, _ in codes)


def test_tampered_ledger_line_is_named_by_the_cli(known, tmp_path, capsys):
    src, _, _ = known
    lines = src.read_text().splitlines(keepends=True)
    rec = json.loads(lines[2])  # line 3: round 2's spend
    rec["epsilon"] = round(rec["epsilon"] / 2, 6)  # someone "lowers" the spend
    lines[2] = json.dumps(rec, sort_keys=True) + "\n"
    bad = tmp_path / "privacy-ledger.jsonl"
    bad.write_text("".join(lines))
    for f in ("ledger.key", "privacy-ledger.head"):  # the hospital's key and head anchor come along
        (tmp_path / f).write_bytes((src.parent / f).read_bytes())
    capsys.readouterr()
    assert cli.main(["report", "--ledger", str(bad), "--out", str(tmp_path / "out")]) == 2  # exit status 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and "line 3" in err[0] and err[0].startswith("xrayfed: error: "), cap.err
    assert "hash does not match" in err[0] and not cap.out and not (tmp_path / "out").exists()
    # A deleted line is named too (the line after the gap).
    del lines[1]
    bad.write_text("".join(lines))
    with pytest.raises(UserError, match=r"line 2: sequence number"):
        R.build_hospital_report(bad)


def test_delta_at_least_one_over_n_is_warned(tmp_path):
    """The client refuses δ ≥ 1/N (test_privacy); a ledger written with one anyway (an older or
    modified client) is still flagged by the report."""
    import dataclasses

    # q = 1 (full batch) keeps the accountants fast; δ = 0.05 ≥ 1/40.
    site = Site("tiny", n=40, epsilon=4.0, delta=1e-3, batch_size=40, noise_multiplier=1.0)
    cfg = hospital_config(site, tmp_path / site.name)
    plan = dataclasses.replace(plan_dp(cfg, site.n), delta=0.05)
    ledger = PrivacyLedger(cfg.hospital.state_dir, cfg)
    ledger.ensure_header(plan)
    ledger.charge(plan, federation="fed", server_round=1, key="fed-1")
    small = ledger.path
    rep = R.build_hospital_report(small)
    hits = [f for f in rep.findings if f.code == "delta_ge_1_over_n"]
    assert len(hits) == 1 and hits[0].level == "critical" and "N = 40" in hits[0].message


def test_wrong_logged_epsilon_is_flagged_by_the_second_opinion(tmp_path):
    """A buggy client logs half the true ε (hash chain intact): the independent accountant flags it."""
    cfg = hospital_config(KNOWN, tmp_path)
    plan = plan_dp(cfg, KNOWN.n)
    ledger = PrivacyLedger(tmp_path, cfg)
    ledger.ensure_header(plan)
    ledger.charge(plan, federation="fed", server_round=1, key="k1")
    true2 = compute_epsilon([(plan.noise_multiplier, plan.sample_rate, plan.steps)] * 2, plan.delta)
    append_record(ledger.path, {**ledger.records[-1], "round": 2, "request": "k2", "epsilon": true2 / 2})
    rep = R.build_hospital_report(ledger.path)
    (h,) = rep.hospitals
    assert [r.agrees for r in h.rounds] == [True, False]
    assert h.epsilon_spent == pytest.approx(true2, rel=1e-8)  # the report recomputes, it does not trust the log
    codes = [(f.code, f.level, f.round) for f in rep.findings]
    assert ("accountant_disagreement", "critical", 2) in codes
    assert ("ledger_inconsistent", "critical", None) in codes
    assert rep.accounting.disagreements == 1


def test_reference_points():
    assert [R.privacy_level(e) for e in (0.3, 1.0, 1.01, 8.0, 8.5, 10.0, 10.01, 50)] == [
        "strong", "strong", "common", "common", "reasonable", "reasonable", "weak", "weak"]
    assert [(p.level, p.max_epsilon) for p in R.REFERENCE_POINTS] == [
        ("strong", 1.0), ("common", 8.0), ("reasonable", 10.0), ("weak", None)]


def test_weak_epsilon_and_secure_rng_off_are_warned(tmp_path):
    # σ = 0.4, full batch: one round spends ε ≈ 13.2 (weak), noise from torch's generator.
    path = ledger_at(tmp_path, Site("lax", n=100, epsilon=30.0, batch_size=100, noise_multiplier=0.4,
                                    secure_rng=False), 1)
    rep = R.build_hospital_report(path)
    (h,) = rep.hospitals
    assert h.privacy_level == "weak" and h.epsilon_spent > 10
    codes = {f.code: f.level for f in rep.findings}
    assert codes["epsilon_weak"] == "warning" and codes["secure_rng_off"] == "warning"
    # 8 < ε ≤ 10 is "above the common range"
    h2 = h.model_copy(update={"epsilon_spent": 9.0, "privacy_level": "reasonable", "secure_rng": True})
    assert {f.code for f in R.hospital_findings(h2)} >= {"epsilon_above_common"}
    assert "secure_rng_off" not in {f.code for f in R.hospital_findings(h2)}


# ------------------------------------------------------------------------------------------ federation report
def test_federation_report_rounds_and_hospitals(fed):
    out, rep = fed
    assert rep.kind == "federation" and rep.federation == "synthetic" and rep.rounds_total == 3
    names = [h.hospital for h in rep.hospitals]
    assert names == ["northgate", "riverside", "st-marys"]
    assert all(h.source == "ledger+metrics" for h in rep.hospitals)
    assert [r.participants for r in rep.rounds] == [["st-marys", "riverside", "northgate"]] * 2 + [
        ["st-marys", "northgate"]]
    assert rep.rounds[2].refused == ["riverside"]
    metrics = [json.loads(line) for line in (out.parent / "metrics.jsonl").read_text().splitlines()]
    for r, m in zip(rep.rounds, metrics):
        assert r.max_epsilon == pytest.approx(max(h["epsilon"] for h in m["hospitals"]))
        assert r.epsilon == {h["hospital"]: pytest.approx(h["epsilon"]) for h in m["hospitals"]}
        assert r.eval["auc"] == m["eval"]["auc"]
    by = {h.hospital: h for h in rep.hospitals}
    assert (by["riverside"].rounds_trained, by["riverside"].rounds_refused, by["riverside"].rounds_more) == (2, 1, 0)
    sm = by["st-marys"]
    assert sm.epsilon_spent == pytest.approx(compute_epsilon([(1.1, 0.064, 16)] * 3, DELTA), rel=1e-8)
    assert compute_epsilon([(1.1, 0.064, 16 * (3 + sm.rounds_more))], DELTA) <= 4.0
    assert compute_epsilon([(1.1, 0.064, 16 * (4 + sm.rounds_more))], DELTA) > 4.0
    assert all(r.epsilon_reported == r.epsilon for r in sm.rounds)  # server's ε matches the ledger
    codes = {(f.code, f.hospital) for f in rep.findings}
    assert ("budget_exhausted", "riverside") in codes and ("secure_rng_off", "northgate") in codes
    assert rep.count("critical") == 0 and rep.final_eval["auc"] == metrics[-1]["eval"]["auc"]


def test_federation_html_has_three_decodable_plots(fed):
    out, rep = fed
    ims = pngs_in_html((out / "report.html").read_text())
    assert len(ims) == 3 and all(im.format == "PNG" and im.size[0] >= 600 for im in ims)
    assert [p.name for p in rep.plots] == ["epsilon-per-round", "auc-per-round", "privacy-utility"]
    md = (out / "report.md").read_text()
    assert "![" in md and "(epsilon-per-round.png)" in md and (out / "privacy-utility.png").is_file()


def test_metrics_only_report_and_underreporting(fed_run, tmp_path):
    """Without ledgers the report works from what hospitals reported, re-derives every ε from the
    logged (σ, q, steps), and flags a hospital that reports less than its rounds account for."""
    run = tmp_path / "run"
    shutil.copytree(fed_run, run, ignore=shutil.ignore_patterns("hospitals", "report"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # two hospitals are enough here (and faster)
        row["hospitals"] = [h for h in row["hospitals"] if h["hospital"] != "riverside"]
    assert rows[2]["hospitals"][0]["hospital"] == "st-marys"
    rows[2]["hospitals"][0]["epsilon"] *= 0.7  # st-marys under-reports round 3
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = R.build_federation_report(run)
    by = {h.hospital: h for h in rep.hospitals}
    assert all(h.source == "metrics" for h in rep.hospitals)
    assert by["northgate"].second_opinion.agrees and by["northgate"].rounds_more is not None
    sm = by["st-marys"]
    assert sm.epsilon_spent == pytest.approx(compute_epsilon([(1.1, 0.064, 16)] * 3, DELTA), rel=1e-8)  # the larger
    assert [r.agrees for r in sm.rounds] == [True, True, False]
    codes = {(f.code, f.hospital, f.level) for f in rep.findings}
    assert ("epsilon_underreported", "st-marys", "critical") in codes
    assert ("accountant_disagreement", "st-marys", "critical") in codes


def test_cli_format_flag_and_schema(known, fed_run, tmp_path, capsys):
    out = tmp_path / "json-only"
    capsys.readouterr()
    assert cli.main(["report", "--ledger", str(known[0].parent), "--out", str(out), "--format", "json"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    printed = capsys.readouterr().out  # the summary table is printed to the terminal too
    assert "| Hospital | Privacy unit | Training set | ε spent of budget | ε left | δ |" in printed
    assert "| h1 | scan (not patient) | 1000 scans |" in printed
    assert printed.index("- Privacy unit: each scan, not each patient") < printed.index("| Hospital |")
    assert cli.main(["report", str(fed_run), "--format", "pdf"]) == 2
    assert "unknown format 'pdf'" in capsys.readouterr().err
    assert cli.main(["report", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["properties"]["schema_version"]["const"] == "1"
    assert {"hospitals", "rounds", "findings", "accounting", "reference_points"} <= set(schema["properties"])
    assert cli.main(["report", str(fed_run / "metrics.jsonl")]) == 2  # a file is not a run dir: one line
    assert "--ledger" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ demo run
def check_demo_run_report(run_dir: Path, build: bool = True) -> R.Report:
    """What a demo run's report must show: every hospital of the run, each within its budget,
    every ε confirmed by the independent accountant. Point it at a real run with XRAYFED_DEMO_RUN
    (or call it from an end-to-end test). ``build=False``: RUN_DIR/report was just written by
    ``xrayfed report RUN_DIR``."""
    run_dir = Path(run_dir)
    out = run_dir / "report"
    if build:
        assert cli.main(["report", str(run_dir), "--format", "json,html"]) == 0
    rep = R.Report.model_validate_json((out / "report.json").read_text())
    rows = R.read_metrics(run_dir / "metrics.jsonl")
    in_metrics = {h["hospital"] for row in rows for h in row["hospitals"] if h.get("status") != "failed"}
    assert in_metrics and {h.hospital for h in rep.hospitals} == in_metrics
    for h in rep.hospitals:
        assert h.epsilon_spent <= h.epsilon_budget, h
        assert h.second_opinion is not None and h.second_opinion.agrees, h.second_opinion
    assert len(rep.rounds) == len(rows)
    assert rep.count("critical") == 0, [f.message for f in rep.findings if f.level == "critical"]
    assert len(pngs_in_html((out / "report.html").read_text())) >= 1
    return rep


def test_demo_run_report_lists_every_hospital_within_budget(request):
    real = os.environ.get("XRAYFED_DEMO_RUN")
    if real:
        check_demo_run_report(Path(real))
    else:  # the synthetic run; its report was written by the `fed` fixture with `xrayfed report RUN_DIR`
        request.getfixturevalue("fed")
        check_demo_run_report(request.getfixturevalue("fed_run"), build=False)


def test_releases_against_charges_and_server_anchors(tmp_path):
    """The report shows releases vs charges, flags a release no charge paid for, and flags a
    ledger that lacks a head the server recorded (rolled back)."""
    cfg = hospital_config(KNOWN, tmp_path / "h1")
    plan = plan_dp(cfg, KNOWN.n)
    ledger = PrivacyLedger(cfg.hospital.state_dir, cfg)
    ledger.ensure_header(plan)
    c1 = ledger.charge(plan, federation="fed", server_round=1, key="k1")
    ledger.record_release(c1, "d1")
    head1 = ledger.head()
    c2 = ledger.charge(plan, federation="fed", server_round=2, key="k2")
    ledger.record_release(c2, "d2")
    rep = R.build_hospital_report(ledger.path)
    h = rep.hospitals[0]
    assert (h.updates_released, h.rounds_trained, h.releases_unpaid) == (2, 2, 0)
    assert "| 2 / 2 |" in R.summary_table(rep)
    assert not [f for f in rep.findings if f.code == "release_without_charge"]
    # a second release of round 1's update under the same charge (what a retrain used to do)
    append_record(ledger.path, {"event": "release", "round": 1, "request": "k1", "charge_seq": c1["seq"],
                                "digest": "d3", "epsilon": h.epsilon_spent})
    rep = R.build_hospital_report(ledger.path)
    bad = [f for f in rep.findings if f.code == "release_without_charge"]
    assert rep.hospitals[0].releases_unpaid == 1 and bad and bad[0].level == "critical"
    # the operator's report: the run recorded a head the ledger no longer has
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"round": 1, "federation": "fed", "hospitals": [
                {"hospital": "h1", "status": "trained", "epsilon": c1["epsilon"], "ledger_seq": head1[0],
                 "ledger_head": head1[1]}]},
            {"round": 2, "federation": "fed", "hospitals": [
                {"hospital": "h1", "status": "trained", "epsilon": c2["epsilon"], "ledger_seq": 99,
                 "ledger_head": "f" * 64}]}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = R.build_federation_report(run, [ledger.path])
    rolled = [f for f in rep.findings if f.code == "ledger_rolled_back"]
    assert len(rolled) == 1 and rolled[0].round == 2 and rolled[0].level == "critical"
