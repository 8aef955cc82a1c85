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
ROOT = Path(__file__).resolve().parents[1]


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


# ------------------------------------------------------------------------------------------ after a restart
# Two hospitals of the same settings; the server is killed in round 2 after both released their
# update and restarted from round 1's checkpoint: both resend (report_synth: what a real restart
# writes, as tests/test_faults.py checks on real processes).
TWINS = [Site("north", n=800, epsilon=6.0, noise_multiplier=1.1), Site("south", n=800, epsilon=6.0, noise_multiplier=1.1)]


@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("restart") / "run", TWINS, rounds=3, federation="synthetic",
                   restart_round=2)
    server_only = run.parent / "server-run"  # the operator's run folder: the ledgers live at the hospitals
    shutil.copytree(run, server_only, ignore=shutil.ignore_patterns("hospitals"))
    ledgers = {s.name: run / "hospitals" / s.name / "privacy-ledger.jsonl" for s in TWINS}
    return run, server_only, ledgers


def test_after_a_restart_the_operator_and_hospital_reports_agree(restarted):
    run, server_only, ledgers = restarted
    events = [r["event"] for r in json.loads("[" + ",".join(ledgers["north"].read_text().splitlines()) + "]")
              if r.get("round") == 2]
    assert events == ["train", "release", "resend"]  # what a real restart leaves in the ledger
    operator = R.build_federation_report(server_only)  # from metrics.jsonl alone
    with_ledgers = R.build_federation_report(server_only, list(ledgers.values()))
    for name, path in ledgers.items():
        own = R.build_hospital_report(path).hospitals[0]
        assert (own.rounds_trained, own.rounds_resent, own.updates_released) == (3, 1, 3)
        for rep in (operator, with_ledgers):
            h = next(x for x in rep.hospitals if x.hospital == name)
            assert (h.rounds_trained, h.rounds_resent) == (own.rounds_trained, own.rounds_resent), (h.source, h)
            assert h.epsilon_spent == pytest.approx(own.epsilon_spent, rel=1e-9)
            assert h.epsilon_left == pytest.approx(own.epsilon_left, rel=1e-9)
    assert operator.count("critical") == 0 and with_ledgers.count("critical") == 0
    # The round itself: both hospitals' updates were aggregated, and they are named as resent.
    r2 = operator.rounds[1]
    assert (r2.trained, r2.resent, sorted(r2.participants)) == ([], ["north", "south"], ["north", "south"])
    md = R.render_markdown(operator)
    assert "| 2 | 2025-03-01 09:14 | 6.9 min | north, south (resent after a restart, charged once) |" in md
    assert "| north | scan (not patient) | 800 scans | " in md and "| 3 (1 resent) | 0 | — |" in md
    assert ("Round 2 was interrupted and run again after a restart: north and south resent the update already "
            "trained and charged for it (charged once, counted once as trained).") in md
    assert [(f.code, f.round) for f in operator.findings if f.code == "update_resent"] == [("update_resent", 2)]
    own_md = R.render_markdown(R.build_hospital_report(ledgers["north"]))
    assert "| 3 (1 resent) | 0 | 3 / 3 |" in own_md
    assert "the update of round 2 was resent after a restart (charged once, counted once as trained)" in own_md


def test_a_failed_round_charged_at_the_hospital_is_not_an_accountant_disagreement(fed_run, tmp_path):
    """A hospital charged for a round whose update never reached the server (it died mid-round)
    reports more ε than the server's rows account for: an incomplete history (info), not a
    critical disagreement of accountants; the report still counts the larger ε."""
    run = tmp_path / "run"
    shutil.copytree(fed_run, run, ignore=shutil.ignore_patterns("hospitals", "report"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row["hospitals"] = [h for h in row["hospitals"] if h["hospital"] == "st-marys"]
    rows[1]["hospitals"] = [{"hospital": "st-marys", "node_id": 1000, "status": "failed", "error": "lost"}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = R.build_federation_report(run)
    (h,) = rep.hospitals
    assert h.epsilon_spent == pytest.approx(rows[2]["hospitals"][0]["epsilon"])  # what the hospital reported
    assert (h.rounds_trained, h.rounds_failed) == (2, 1)
    assert rep.count("critical") == 0, [f.message for f in rep.findings if f.level == "critical"]
    info = next(f for f in rep.findings if f.code == "history_incomplete")
    assert "round 2, which it failed" in info.message


# ------------------------------------------------------------------------------------------ in plain words
def _plain(md: str) -> list[str]:
    section = md.split("## In plain words\n\n", 1)[1].split("\n\n", 1)[0]
    return [line[2:] for line in section.splitlines()]


def test_the_report_says_in_plain_words_what_was_protected_and_how(fed):
    out, rep = fed
    lines = _plain((out / "report.md").read_text())
    assert lines[0] == ("Privacy unit: each scan, not each patient: a patient with several scans is protected less "
                        "(about their number of scans × ε), at every hospital.")
    assert lines[1] == ("Protection: TLS on; hospital authentication on; SecAgg+ off (the server saw each hospital's "
                        "update); server checkpoints encrypted at rest on.")
    assert lines[2] == "Training data: northgate 1500 scans; riverside 600 scans; st-marys 1000 scans."
    assert lines[3] == "Rounds: 3, finished between 2025-03-01 09:07 and 2025-03-01 09:21 UTC; a round took 6.9 min."
    assert lines[4].startswith("Released without differential privacy (not covered by ε): with every round: the "
                               "hospital's training loss, its training-set size")
    assert "validation metrics (AUC, accuracy on each hospital's own validation split): released in 3 round(s)" in lines[4]
    assert rep.security.model_dump() == {"transport": "grpc", "tls": True, "hospital_auth": True,
                                         "secure_aggregation": False, "encrypted_at_rest": True,
                                         "source": "metrics", "rounds_recorded": 3, "mixed": []}
    html = (out / "report.html").read_text()
    assert html.index('id="plain"') < html.index('id="hospitals"')  # at the top
    assert "<li>Protection: TLS on; hospital authentication on;" in html


def test_protection_recorded_per_round_by_the_server(tmp_path):
    """What the server records with each round (server/federation.py), and how the report reads
    it: the weakest setting of any round, a run that did not record it read from federation.toml
    and its checkpoints, a simulation named as such."""
    from xrayfed.common.checkpoint import Checkpoint
    from xrayfed.common.config import FederationConfig
    from xrayfed.common.model import build_model
    from xrayfed.common.prediction import TaskSpec
    from xrayfed.common.security.atrest import parse_key, save_checkpoint
    from xrayfed.server.federation import run_security

    cfg = FederationConfig.model_validate({"network": {"tls": {"insecure": True}}})
    assert run_security(cfg) == {"transport": "grpc", "tls": False, "hospital_auth": False,
                                 "secure_aggregation": False, "encrypted_at_rest": False}
    cfg = FederationConfig.model_validate({"federation": {"secure_aggregation": True, "min_clients": 2}})
    key = parse_key("00" * 32)
    assert run_security(cfg, key) == {"transport": "grpc", "tls": True, "hospital_auth": True,
                                      "secure_aggregation": True, "encrypted_at_rest": True}
    assert run_security(cfg, simulated=True)["transport"] == "simulation"
    assert not run_security(cfg, simulated=True)["tls"]

    site = [Site("solo", n=500, epsilon=8.0, noise_multiplier=1.1)]
    # one round with TLS and hospital authentication off (a restart with --insecure): the weakest is shown
    run = make_run(tmp_path / "mixed", site, rounds=2, ledgers=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows[1]["security"] = dict(rows[1]["security"], tls=False, hospital_auth=False)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = _plain(R.render_markdown(R.build_federation_report(run)))
    assert lines[1] == ("Protection: TLS off; hospital authentication off; SecAgg+ off (the server saw each "
                        "hospital's update); server checkpoints encrypted at rest on; differed between rounds (tls, "
                        "hospital_auth): the weakest is shown.")
    # a simulation
    run = make_run(tmp_path / "sim", site, rounds=2, ledgers=False,
                   security={"transport": "simulation", "tls": False, "hospital_auth": False,
                             "secure_aggregation": False, "encrypted_at_rest": False})
    assert _plain(R.render_markdown(R.build_federation_report(run)))[1].startswith(
        "Protection: a simulation on one machine (no network: TLS and hospital authentication do not apply); SecAgg+ off")
    # an older run that recorded nothing: federation.toml (TLS on by default) and its encrypted checkpoints
    run = make_run(tmp_path / "old", site, rounds=2, ledgers=False, security=None)
    spec = FederationConfig().model
    save_checkpoint(run / "checkpoints" / "round-0002.pt",
                    Checkpoint(model=spec, task=TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")),
                               image_size=28, state_dict=build_model(spec).state_dict()), key)
    sec = R.build_federation_report(run).security
    assert (sec.source, sec.tls, sec.hospital_auth, sec.encrypted_at_rest) == ("config", True, True, True)


def test_hospital_report_says_in_plain_words_what_its_ledger_shows(known):
    _, out, rep = known
    lines = _plain((out / "report.md").read_text())
    assert lines[0] == ("Privacy unit: each scan, not each patient: a patient with several scans is protected less "
                        "(about their number of scans × ε).")
    assert lines[1] == ("Protection: this ledger is not encrypted at rest. TLS, hospital authentication and SecAgg+ "
                        "are the federation server's settings and are not in the ledger: the operator's report "
                        "states them.")
    assert lines[2] == "Training data: h1 1000 scans."
    assert re.fullmatch(r"Rounds of h1: 2 trained (at|between) \d{4}-\d\d-\d\d \d\d:\d\d.* UTC, 1 refused\.", lines[3])
    assert lines[4].startswith("Released without differential privacy (not covered by ε):")
    assert "validation metrics" in lines[4] and "training loss" in lines[4]
    assert rep.security.encrypted_at_rest is False and rep.security.source == "ledger"


# ------------------------------------------------------------------------------------------ as people see it
def html_tables(html: str) -> list[int]:
    """The number of columns of each table of a page."""
    from html.parser import HTMLParser

    class Cols(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables: list[int] = []
            self.row = 0

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.tables.append(0)
            elif tag == "tr":
                self.row = 0
            elif tag in ("td", "th"):
                self.row += int(dict(attrs).get("colspan") or 1)
                self.tables[-1] = max(self.tables[-1], self.row)

    p = Cols()
    p.feed(html)
    return p.tables


def test_every_table_fits_a_laptop_window_without_a_browser(fed, restarted):
    """Always on (no browser needed): no table has more columns than fit at 1280 px, cells wrap,
    nothing is put in a sideways scroller, plots are not shrunk below their own size."""
    pages = [(fed[0] / "report.html").read_text(),
             R.render_html(R.build_federation_report(restarted[1], list(restarted[2].values())))]
    for html in pages:
        cols = html_tables(html)
        assert cols and max(cols) <= 11, cols  # 11 columns of ~100 px fit the 1144 px of text at 1280 px
        css = html.split("<style>", 1)[1].split("</style>", 1)[0]
        assert "nowrap" not in css and "overflow-x" not in css and 'class="scroll"' not in html
        assert re.search(r"th,td\{[^}]*white-space:normal[^}]*overflow-wrap:break-word", css)
        assert "grid-template-columns" not in css  # one plot to a row, at 100 %


def _report_render():
    import importlib.util

    spec = importlib.util.spec_from_file_location("report_render", ROOT / "bench" / "report_render.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(_report_render().find_chromium() is None,
                    reason="no Chromium on this machine (Debian: apt-get install chromium)")
def test_reports_in_headless_chromium_have_no_horizontal_overflow_at_1280px(fed, known, tmp_path):
    rr = _report_render()
    # hospitals with long names (one a single 40-letter word): the widest cells a report has
    names = ["university-hospital-of-the-northern-region", "universityhospitalofthesouthernregionxyz", "east"]
    wide = make_run(tmp_path / "wide", [Site(n, n=700, epsilon=8.0, noise_multiplier=1.1) for n in names],
                    rounds=2, ledgers=False)
    assert cli.main(["report", str(wide), "--format", "html"]) == 0
    for page in (fed[0] / "report.html", known[1] / "report.html", wide / "report" / "report.html"):
        result = rr.measure(page, width=1280)
        fits, line = rr.verdict(result)
        assert fits, f"{page}: {line}"
        assert result["page_width"] <= 1280 and result["images"], line
        assert all(i["shown"] == i["natural"] for i in result["images"]), line  # plots at 100 %


# ------------------------------------------------------------------------------------------ plots
def _figures(report, monkeypatch) -> dict:
    """The matplotlib figures of a report's plots (before they become PNG)."""
    from xrayfed.server.report import plots as P

    figs = {}
    monkeypatch.setattr(P, "_png", lambda plt, fig: fig)
    for name, _, fn in P.PLOTS:
        fig = fn(report)
        if fig is not None:
            fig.canvas.draw()
            figs[name] = fig
    return figs


def test_plot_text_is_legible_and_overlapping_curves_stay_apart(restarted, monkeypatch):
    from matplotlib.text import Text

    rep = R.build_federation_report(restarted[1], list(restarted[2].values()))
    figs = _figures(rep, monkeypatch)
    assert set(figs) == {"epsilon-per-round", "auc-per-round", "privacy-utility"}
    for name, fig in figs.items():
        small = [(t.get_text(), t.get_fontsize()) for t in fig.findobj(Text)
                 if t.get_visible() and t.get_text().strip() and t.get_fontsize() < 10]
        assert not small, (name, small)  # every text ≥ 10 pt at the plot's own size
    # north and south have the same settings: the same ε curve. Each is told apart by its line
    # style and marker, and their markers stand side by side rather than on top of each other.
    ax = figs["epsilon-per-round"].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines() if ln.get_label() in ("north", "south")}
    n, s = lines["north"], lines["south"]
    assert list(n.get_ydata()) == pytest.approx(list(s.get_ydata()))
    assert n.get_linestyle() != s.get_linestyle() and n.get_marker() != s.get_marker()
    assert all(abs(a - b) >= 0.1 for a, b in zip(n.get_xdata(), s.get_xdata()))


def test_no_mostly_empty_plot(restarted, known, monkeypatch):
    rep = R.build_federation_report(restarted[1])
    figs = _figures(rep, monkeypatch)
    for name in ("auc-per-round", "privacy-utility"):
        ax = figs[name].axes[0]
        data = [ln for ln in ax.get_lines() if ln.get_marker() not in (None, "None", "")]  # not the guides
        ys = [float(y) for ln in data for y in ln.get_ydata()]
        xs = [float(x) for ln in data for x in ln.get_xdata()]
        lo, hi = ax.get_ylim()
        assert (max(ys) - min(ys)) / (hi - lo) >= 0.5, (name, ys, (lo, hi))  # the values fill the height
        if name == "privacy-utility":
            lo, hi = ax.get_xlim()
            assert (max(xs) - min(xs)) / (hi - lo) >= 0.5, (name, xs, (lo, hi))
    # one round: nothing to draw that the table does not already say
    one = R.build_hospital_report(ledger_at(Path(known[0]).parent.parent / "one", Site("one", n=500, epsilon=4.0,
                                                                                       noise_multiplier=1.1), 1))
    assert _figures(one, monkeypatch) == {}
