"""Rendering a report: Markdown, a self-contained HTML page (plots embedded), JSON; writing the files."""

from __future__ import annotations

import base64
import re
from html import escape
from pathlib import Path

from xrayfed.common.errors import UserError
from xrayfed.server.report import audit_section
from xrayfed.server.report.plots import render_all
from xrayfed.server.report.schema import FORMATS, HospitalReport, PlotRef, Report, privacy_level


# ============================================================================ renderers
def _num_text(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def _general_text(x: float | None) -> str:
    return "—" if x is None else f"{x:g}"


def _onoff(x: bool | None) -> str:
    return "unknown" if x is None else ("on" if x else "off")


#: The hospital table a privacy officer reads first (the DP parameters are in DETAIL_COLUMNS).
HOSPITAL_COLUMNS = ("Hospital", "Privacy unit", "Training set", "ε spent of budget", "ε left", "δ", "Rounds trained",
                    "Rounds refused", "Updates released / charged", "More rounds fit", "Level")
#: The DP parameters behind each hospital's ε (the report's details section).
DETAIL_COLUMNS = ("Hospital", "Noise multiplier σ", "Clip norm C", "Sample rate q", "Steps per round", "Total steps",
                  "Accountant", "Opacus secure_mode", "Noise from a secure RNG")
#: No table of a report has more columns than this: each fits a 1280 px wide window, cells wrap.
MAX_TABLE_COLUMNS = 11


def _unit_cell(h: HospitalReport) -> str:
    return "patient" if h.unit == "patient" else "scan (not patient)"


def _training_set(h: HospitalReport) -> str:
    """``1000 patients (3100 scans)`` / ``1000 scans`` / ``unknown``."""
    if not h.num_examples:
        return "unknown"
    if h.unit == "patient":
        return f"{h.num_examples} patients" + (f" ({h.num_scans} scans)" if h.num_scans else "")
    return f"{h.num_examples} scans"


def _rounds_trained_cell(h: HospitalReport) -> str:
    return str(h.rounds_trained) + (f" ({h.rounds_resent} resent)" if h.rounds_resent else "")


def hospital_rows(report: Report) -> list[list[str]]:
    return [[h.hospital, _unit_cell(h), _training_set(h),
             f"{_num_text(h.epsilon_spent)} of {_general_text(h.epsilon_budget)}", _num_text(h.epsilon_left),
             _general_text(h.delta), _rounds_trained_cell(h), str(h.rounds_refused),
             (f"{h.updates_released} / {h.rounds_trained}" if h.source != "metrics" else "—")
             + (f" ({h.releases_unpaid} UNPAID)" if h.releases_unpaid else ""),
             "unknown" if h.rounds_more is None else str(h.rounds_more), h.privacy_level]
            for h in report.hospitals]


def detail_rows(report: Report) -> list[list[str]]:
    return [[h.hospital, _num_text(h.noise_multiplier, ".4f"), _general_text(h.max_grad_norm),
             _num_text(h.sample_rate, ".4f"), "—" if h.steps_per_round is None else str(h.steps_per_round),
             str(h.total_steps), h.accountant.upper(), _onoff(h.secure_mode), _onoff(h.secure_rng)]
            for h in report.hospitals]


def _units(h) -> str:
    """What N counts: ``patients (S scans)`` or ``scans``."""
    if h.unit == "patient":
        return "patients" + (f" ({h.num_scans} scans)" if h.num_scans else "")
    return "scans"


def _unit_sentence(h) -> str:
    """The privacy unit in plain words."""
    if h.unit == "patient":
        return "the guarantee protects each patient (all of their scans together)"
    return "the guarantee protects each scan, not each patient"


def _md_table(header, rows) -> str:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(c) for c in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def summary_table(report: Report) -> str:
    """The per-hospital Markdown table (also printed to the terminal)."""
    return _md_table(HOSPITAL_COLUMNS, hospital_rows(report))


# ============================================================================ in plain words
def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _unit_words(report: Report) -> str:
    patient = [h.hospital for h in report.hospitals if h.unit == "patient"]
    scan = [h.hospital for h in report.hospitals if h.unit != "patient"]
    if not report.hospitals:
        return "Privacy unit: unknown (no hospital in this report)."
    if not scan:
        return "Privacy unit: each patient (all of their scans together)" + \
            ("" if len(patient) == 1 else " at every hospital") + "."
    words = ("each scan, not each patient: a patient with several scans is protected less (about their number of "
             "scans × ε)")
    if not patient:
        return f"Privacy unit: {words}" + ("" if len(scan) == 1 else ", at every hospital") + "."
    return f"Privacy unit: each patient (all of their scans together) at {_join(patient)}; {words}, at {_join(scan)}."


def _onoff_words(x: bool | None) -> str:
    return "unknown" if x is None else ("on" if x else "off")


def _security_words(report: Report) -> str:
    sec = report.security
    if report.kind == "hospital":
        at_rest = "unknown" if sec is None or sec.encrypted_at_rest is None else \
            ("encrypted at rest" if sec.encrypted_at_rest else "not encrypted at rest")
        return (f"Protection: this ledger is {at_rest}. TLS, hospital authentication and SecAgg+ are the federation "
                "server's settings and are not in the ledger: the operator's report states them.")
    if sec is None:
        return "Protection: not recorded by this run (TLS, hospital authentication, SecAgg+, encryption at rest unknown)."
    if sec.transport == "simulation":
        parts = ["a simulation on one machine (no network: TLS and hospital authentication do not apply)"]
    else:
        parts = [f"TLS {_onoff_words(sec.tls)}", f"hospital authentication {_onoff_words(sec.hospital_auth)}"]
    agg = _onoff_words(sec.secure_aggregation)
    if sec.secure_aggregation is False:
        agg += " (the server saw each hospital's update)"
    elif sec.secure_aggregation:
        agg += " (the server saw only the sum of the updates)"
    parts += [f"SecAgg+ {agg}", f"server checkpoints encrypted at rest {_onoff_words(sec.encrypted_at_rest)}"]
    tail = "" if sec.source == "metrics" else " (from federation.toml and the checkpoints: this run did not record it)"
    if sec.source == "metrics" and sec.rounds_recorded is not None and sec.rounds_recorded < len(report.rounds):
        tail += f" (recorded by the server in {sec.rounds_recorded} of {len(report.rounds)} rounds)"
    if sec.mixed:
        tail += f"; differed between rounds ({', '.join(sec.mixed)}): the weakest is shown"
    return "Protection: " + "; ".join(parts) + tail + "."


def _data_words(report: Report) -> str:
    sizes = [f"{h.hospital} {_training_set(h)}" for h in report.hospitals]
    return "Training data: " + ("; ".join(sizes) if sizes else "none") + "."


def _clock(t: str | None) -> str | None:
    """``2025-03-01T09:07:00+00:00`` → ``2025-03-01 09:07`` (UTC as recorded)."""
    if not t:
        return None
    return str(t).replace("T", " ")[:16]


def _span(times: list[str]) -> str:
    """``between A and B UTC`` (or ``at A UTC`` when both are the same minute)."""
    a, b = _clock(min(times)), _clock(max(times))
    return f"at {a} UTC" if a == b else f"between {a} and {b} UTC"


def _seconds(x: float) -> str:
    return f"{x:.0f} s" if x < 120 else f"{x / 60:.1f} min"


def _round_words(report: Report) -> list[str]:
    out = []
    if report.kind == "federation":
        rounds = report.rounds
        times = [r.time for r in rounds if r.time]
        text = f"Rounds: {len(rounds)}"
        if times:
            text += f", finished {_span(times)}"
        durations = sorted(r.duration_s for r in rounds if r.duration_s is not None)
        if durations:
            mid = durations[len(durations) // 2] if len(durations) % 2 else \
                (durations[len(durations) // 2 - 1] + durations[len(durations) // 2]) / 2
            spread = _seconds(durations[0]) != _seconds(durations[-1])
            text += f"; a round took {_seconds(mid)}" + \
                (f" (median; {_seconds(durations[0])} to {_seconds(durations[-1])})" if spread else "")
        out.append(text + ".")
        for r in rounds:
            if r.resent:
                out.append(f"Round {r.round} was interrupted and run again after a restart: {_join(r.resent)} resent "
                           "the update already trained and charged for it (charged once, counted once as trained).")
        return out
    for h in report.hospitals:
        trained = [r for r in h.rounds if r.status == "trained"]
        times = [r.time for r in trained if r.time]
        text = f"Rounds of {h.hospital}: {h.rounds_trained} trained" + \
            (f" {_span(times)}" if times else "") + \
            f", {h.rounds_refused} refused"
        resent = sorted({r.round for r in h.rounds if r.status == "resent"})
        if resent:
            text += (f"; the update of round {', '.join(map(str, resent))} was resent after a restart (charged once, "
                     "counted once as trained)")
        out.append(text + ".")
    return out


def plain_words(report: Report) -> list[str]:
    """The report's first lines, in plain words: the privacy unit, what protected the run, each
    hospital's training-set size, the rounds and their times, and what was released without DP."""
    out = [_unit_words(report), _security_words(report), _data_words(report), *_round_words(report)]
    if report.released_without_dp:
        out.append("Released without differential privacy (not covered by ε): "
                   + "; ".join(report.released_without_dp) + ".")
    return out


def headline(report: Report) -> list[str]:
    out = []
    if report.epsilon_max is not None:
        lvl = privacy_level(report.epsilon_max)
        out.append(f"Largest ε spent: {report.epsilon_max:.3f} ({report.epsilon_max_hospital}) — "
                   f"reference point: {lvl}.")
    out.append(f"Findings: {report.count('critical')} critical, {report.count('warning')} warning(s), "
               f"{report.count('info')} note(s). Second opinion: {report.accounting.checks - report.accounting.disagreements}"
               f" of {report.accounting.checks} ε values agree with {report.accounting.independent_library}.")
    summary = model_summary(report)
    if summary:
        out.append(f"Model after round {report.final_round} (server held-out set): {summary}.")
    return out


def model_summary(report: Report) -> str | None:
    """The final model's figures on the server's held-out set; with several classes or labels
    the AUROC is the macro average and each class's AUROC follows."""
    ev = report.final_eval
    if not ev:
        return None
    per_class = {k.split("/", 1)[1]: v for k, v in ev.items() if k.startswith("auc/")}
    several = len(per_class) > 1
    parts = [f"{'macro auc' if several and k == 'auc' else k} {_num_text(ev.get(k))}"
             for k in ("auc", "accuracy", "sensitivity", "specificity") if k in ev]
    if ev.get("threshold") is not None:
        parts.append(f"at threshold {_num_text(ev.get('threshold'))} (chosen on validation)")
    if several:
        parts.append("AUROC per class: " + ", ".join(f"{n} {_num_text(v)}" for n, v in per_class.items()))
    return ", ".join(parts)


def _second_opinion_rows(report: Report) -> list[list[str]]:
    rows = []
    for h in report.hospitals:
        so = h.second_opinion
        if so is None:
            rows.append([h.hospital, h.accountant.upper(), _num_text(h.epsilon_spent, ".4f"), "—", "—", "—", "—", "—"])
            continue
        per = [r for r in h.rounds if r.agrees is not None]
        rows.append([h.hospital, so.training_accountant.upper(), _num_text(so.epsilon_training, ".4f"),
                     f"{so.independent_method.upper()} {so.epsilon_independent:.4f}", _num_text(so.epsilon_pld, ".4f"),
                     _num_text(so.epsilon_rdp, ".4f"), f"±{so.tolerance:.3f}",
                     ("yes" if so.agrees else "**NO**") + f" ({sum(1 for r in per if r.agrees)}/{len(per)} per round)"])
    return rows


SECOND_OPINION_COLUMNS = ("Hospital", "Training accountant", "ε (training)", "ε (independent)", "PLD", "RDP bound",
                          "Tolerance", "Agrees")


ROUND_COLUMNS = ("Round", "Finished (UTC)", "Took", "Trained", "Refused / failed", "ε of each hospital after the round",
                 "Largest ε", "AUC", "Accuracy")


def _took_cell(r) -> str:
    """The round's wall time and, when the server recorded it, where it went (the slowest
    hospital's own figures, the transfer and the server's evaluation)."""
    if r.duration_s is None:
        return "—"
    t = r.timing or {}
    if "train_s" not in t:
        return _seconds(r.duration_s)
    return (f"{_seconds(r.duration_s)}: DP training {float(t['train_s']):.1f} s, start-up "
            f"{float(t.get('startup_s', 0)):.1f} s, data {float(t.get('data_s', 0)):.1f} s, transfer "
            f"{float(t.get('transfer_s', 0)):.1f} s, evaluation {float(t.get('eval_s', 0)):.1f} s")


def _trained_cell(r) -> str:
    """Who sent an update this round; a resent one is named as such (trained and charged once,
    in the attempt a restart interrupted)."""
    parts = []
    if r.trained:
        parts.append(", ".join(r.trained))
    if r.resent:
        parts.append(f"{', '.join(r.resent)} (resent after a restart, charged once)")
    return "; ".join(parts) or "none"


def round_rows(report: Report) -> list[list[str]]:
    """The rounds table: one line per round, every hospital's ε in one cell (the table keeps its
    width however many hospitals there are)."""
    names = [h.hospital for h in report.hospitals]
    rows = []
    for r in report.rounds:
        eps = []
        for n in sorted(r.epsilon, key=lambda n: (names.index(n) if n in names else len(names), n)):
            e = r.epsilon.get(n)
            mark = " (refused)" if n in r.refused else (" (resent)" if n in r.resent else "")
            eps.append(f"{n} {'—' if e is None else format(e, '.3f')}{mark}")
        ev = r.eval or r.client_eval or {}
        rows.append([str(r.round), _clock(r.time) or "—",
                     _took_cell(r), _trained_cell(r),
                     ", ".join(r.refused + r.failed) or "—", "; ".join(eps) or "—",
                     _num_text(r.max_epsilon) + (f" ({', '.join(r.max_epsilon_hospitals)})"
                                                 if r.max_epsilon_hospitals else ""),
                     _num_text(ev.get("auc")), _num_text(ev.get("accuracy"))])
    return rows


_EVENT_WORDS = {"trained": "trained (charged)", "refused": "refused (budget)",
                "resent": "resent after a restart (no new charge)", "retry": "retried (charged plan)",
                "failed": "failed"}


def _ledger_rows(h: HospitalReport) -> list[list[str]]:
    several = len({r.federation for r in h.rounds if r.federation}) > 1
    rows = []
    for r in h.rounds:
        rows.append([(f"{r.federation} " if several and r.federation else "") + str(r.round),
                     _EVENT_WORDS.get(r.status, r.status), _num_text(r.epsilon, ".4f"),
                     _num_text(r.epsilon_independent, ".4f"),
                     "—" if r.agrees is None else ("yes" if r.agrees else "NO"),
                     _num_text(r.noise_multiplier, ".4f"), _num_text(r.sample_rate, ".4f"),
                     "—" if r.steps is None else str(r.steps), _num_text(r.epsilon_reported, ".4f"),
                     (r.time or "—").replace("T", " ")[:19]])
    return rows


LEDGER_COLUMNS = ("Round", "Event", "ε (training)", "ε (independent)", "Agrees", "σ", "q", "Steps",
                  "ε reported to server", "Time (UTC)")

HOW_TO_READ = (
    "ε and δ: each hospital's model updates are (ε, δ)-differentially private with respect to its own training "
    "data at the privacy unit (each patient, or each scan) over the whole run; ε is cumulative. 'ε left' is "
    "budget − spent; 'More rounds fit' is how many further rounds at the last round's settings keep ε within the "
    "budget (the hospital's own test before training). 'Rounds trained' counts each round whose update was "
    "trained and charged once, including a round resent after a restart."
)

HOW_TO_READ_DETAILS = (
    "σ (noise multiplier): the DP noise added to each step, relative to the clip norm C (each unit's gradient is "
    "clipped to C). q (sample rate): the probability that a unit is in a step's batch (Poisson sampling). The "
    "accountant turns (σ, q, steps) into ε. Opacus secure_mode is Opacus' own CSPRNG mode (it needs torchcsprng; "
    "xrayfed never uses it); 'Noise from a secure RNG' says whether xrayfed drew the DP noise from a "
    "cryptographically secure generator itself."
)

ROUNDS_NOTE = ("ε is each hospital's cumulative ε as it reported it to the server; 'Largest ε' is the largest in "
               "the federation after the round; AUC and accuracy are the global model's (server held-out set, or "
               "the hospitals' validation when the server has none). 'Took' splits the round where the server "
               "recorded it: the slowest hospital's DP training, process start-up and scan decoding (its own "
               "figures), the transfer (serialisation, network, polling) and the server's evaluation.")


def render_markdown(report: Report, plot_files: dict[str, str] | None = None) -> str:
    L: list[str] = [f"# {report.title}", ""]
    src = ", ".join(f"`{s}`" for s in report.sources)
    L.append(f"Generated {report.generated_at} by {report.generator} from {src}. JSON schema version "
             f"{report.schema_version}.")
    L += ["", "## In plain words", ""]
    L += [f"- {line}" for line in plain_words(report)]
    L.append("")
    L += [f"**{line}**" if i == 0 else line for i, line in enumerate(headline(report))]
    L += ["", "## Hospitals", "", summary_table(report), "", HOW_TO_READ, ""]
    L += ["## Findings", ""]
    if report.findings:
        for f in report.findings:
            tag = {"critical": "**CRITICAL**", "warning": "**warning**", "info": "note"}[f.level]
            who = f" {f.hospital}:" if f.hospital else ""
            L.append(f"- {tag} `{f.code}`{who} {f.message}")
    else:
        L.append("None.")
    L.append("")
    if report.kind == "federation" and report.rounds:
        L += ["## Rounds", "", ROUNDS_NOTE, "", _md_table(ROUND_COLUMNS, round_rows(report)), ""]
    L += audit_section.markdown(report.empirical_checks, _md_table)  # Empirical check, when an audit is present
    if plot_files:
        L += ["## Plots", ""]
        for p in report.plots:
            if p.name in plot_files:
                L += [f"![{p.caption}]({plot_files[p.name]})", "", f"*{p.caption}*", ""]
    L += ["## Details", "", "### DP parameters", "", _md_table(DETAIL_COLUMNS, detail_rows(report)), "",
          HOW_TO_READ_DETAILS, ""]
    L += ["### Second opinion on ε", "",
          f"Every ε is recomputed from the logged (σ, q, steps) with {report.accounting.independent_library} "
          f"(PLD, discretisation {report.accounting.pld_discretization:g}; RDP), independent of Opacus used in "
          f"training. {report.accounting.tolerance_rule}", "",
          _md_table(SECOND_OPINION_COLUMNS, _second_opinion_rows(report)), ""]
    for h in report.hospitals:
        if h.ledger is not None:
            L += [f"### Ledger of {h.hospital}", "",
                  f"`{h.ledger.path}`: {h.ledger.lines} lines, hash chain verified; head hash `{h.ledger.head_hash}`. "
                  f"Budget planned for {h.max_rounds_planned or '?'} rounds; N = {h.num_examples or '?'} training "
                  f"{_units(h)}; {_unit_sentence(h)}; noise source: {h.noise_source or 'unknown'}.", "",
                  _md_table(LEDGER_COLUMNS, _ledger_rows(h)), ""]
    L += ["### Reference points", ""]
    L += [f"- **{rp.level}**: {rp.meaning}" for rp in report.reference_points]
    L.append("")
    return "\n".join(L)


# Every table fits the page: at most MAX_TABLE_COLUMNS columns, cells wrap (a long token breaks
# rather than widening its column), nothing scrolls sideways. Plots are shown one to a row at
# their own size (100 %) or smaller, never larger.
_CSS = """
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;color:#1d2330;margin:0;background:#f5f6f8}
main{max-width:1200px;margin:0 auto;padding:24px 28px 48px;background:#fff;box-sizing:border-box;overflow-wrap:break-word}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e3e5ea;padding-bottom:4px}
h3{font-size:15px;margin:20px 0 6px}
.meta{color:#667;font-size:12px;margin-bottom:14px}
ul.plain{margin:8px 0 14px;padding-left:20px}ul.plain li{margin:3px 0}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0}
.card{border:1px solid #e3e5ea;border-radius:8px;padding:10px 14px;min-width:150px}
.card .v{font-size:22px;font-weight:600}.card .k{font-size:12px;color:#667}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 10px;width:100%;table-layout:auto}
th,td{border:1px solid #e3e5ea;padding:4px 7px;text-align:left;white-space:normal;overflow-wrap:break-word;vertical-align:top}
th{background:#f0f2f5;font-weight:600;vertical-align:bottom}td.n,th.n{text-align:right}
.f{padding:6px 10px;border-radius:6px;margin:5px 0;border-left:4px solid}
.critical{background:#fdecea;border-color:#c0392b}.warning{background:#fff6e0;border-color:#e0a100}
.info{background:#eef4fb;border-color:#5b8bd0}
.badge{display:inline-block;font-size:11px;font-weight:700;text-transform:uppercase;margin-right:6px}
.lvl-strong{color:#1e8449}.lvl-common{color:#2e6fb7}.lvl-reasonable{color:#b9770e}.lvl-weak{color:#c0392b}
.no{color:#c0392b;font-weight:700}.yes{color:#1e8449}
figure{margin:12px 0 18px}figure img{max-width:100%;height:auto;border:1px solid #e3e5ea;border-radius:6px}
figcaption{font-size:12px;color:#556}
code{font-size:12px;background:#f0f2f5;padding:1px 4px;border-radius:3px;overflow-wrap:anywhere}
p.note{font-size:12.5px;color:#445}
"""


_NUMERIC = re.compile(r"^(—|[±+\-−]?\d[\d.,e+\-]*( \(.*\))?|unknown)$")
_LONG_WORD = re.compile(r"\S{21,}")
_EXPONENT = re.compile(r"(?<=\de)-(?=\d)")


def _cell_html(text: str) -> str:
    """A table cell's text, escaped, with a break opportunity every 20 characters of a longer
    word (a hospital's name, a path): a table's narrowest width is then set by words of at most
    20 characters, so it fits the page however long a name is."""
    out, at = [], 0
    for m in _LONG_WORD.finditer(text):
        out.append(escape(text[at:m.start()]))
        word = m.group(0)
        out.append("<wbr>".join(escape(word[k:k + 20]) for k in range(0, len(word), 20)))
        at = m.end()
    out.append(escape(text[at:]))
    return _EXPONENT.sub("\u2011", "".join(out))  # 1e-05 stays on one line (a non-breaking hyphen)


def render_html(report: Report, plots: dict[str, tuple[str, bytes]] | None = None) -> str:
    e = escape

    def table(header, rows, raw_cols: set[int] = frozenset()) -> str:  # type: ignore[assignment]
        # Right-align a column whose cells are all numbers (or "—").
        num = [bool(rows) and all(_NUMERIC.match(str(r[i])) for r in rows) for i in range(len(header))]
        th = "".join(f'<th{" class=n" if num[i] else ""}>{e(str(c))}</th>' for i, c in enumerate(header))
        body = "".join("<tr>" + "".join(f'<td{" class=n" if num[i] else ""}>{c if i in raw_cols else _cell_html(str(c))}</td>'
                                        for i, c in enumerate(r)) + "</tr>" for r in rows)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"

    H: list[str] = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                    '<meta name="viewport" content="width=device-width, initial-scale=1">',
                    f"<title>{e(report.title)}</title><style>{_CSS}</style></head><body><main>",
                    f"<h1>{e(report.title)}</h1>",
                    f'<div class="meta">Generated {e(report.generated_at)} by {e(report.generator)} · JSON schema '
                    f'{e(report.schema_version)} · sources: {", ".join("<code>" + e(s) + "</code>" for s in report.sources)}'
                    "</div>"]
    H.append('<h2 id="plain">In plain words</h2><ul class="plain">'
             + "".join(f"<li>{e(line)}</li>" for line in plain_words(report)) + "</ul>")
    cards = []
    if report.epsilon_max is not None:
        lvl = privacy_level(report.epsilon_max)
        cards.append((f'<span class="lvl-{lvl}">{report.epsilon_max:.3f}</span>',
                      f"largest ε spent ({e(report.epsilon_max_hospital or '')}, {lvl})"))
    cards.append((str(len(report.hospitals)), "hospitals"))
    if report.kind == "federation":
        cards.append((str(report.rounds_total), "rounds"))
    if report.final_eval and report.final_eval.get("auc") is not None:
        cards.append((f"{report.final_eval['auc']:.3f}", f"AUC after round {report.final_round}"))
    cards.append((f'<span class="{"no" if report.count("critical") else "yes"}">{report.count("critical")}</span>',
                  "critical findings"))
    cards.append((str(report.count("warning")), "warnings"))
    agree = report.accounting.checks - report.accounting.disagreements
    cards.append((f'<span class="{"no" if report.accounting.disagreements else "yes"}">{agree}/{report.accounting.checks}'
                  "</span>", "ε values confirmed independently"))
    H.append('<div class="cards">' + "".join(f'<div class="card"><div class="v">{v}</div><div class="k">{k}</div></div>'
                                             for v, k in cards) + "</div>")
    summary = model_summary(report)
    if summary:
        H.append(f'<p class="note">Model after round {report.final_round} on the server\'s held-out set: '
                 f'{e(summary)}.</p>')

    H.append('<h2 id="hospitals">Hospitals</h2>')
    rows = hospital_rows(report)
    for r in rows:
        r[-1] = f'<span class="lvl-{r[-1]}">{e(r[-1])}</span>'
    H.append(table(HOSPITAL_COLUMNS, rows, raw_cols={len(HOSPITAL_COLUMNS) - 1}))
    H.append(f'<p class="note">{e(HOW_TO_READ)} The DP parameters behind each ε are in the details below.</p>')

    H.append('<h2 id="findings">Findings</h2>')
    if report.findings:
        for f in report.findings:
            who = f"<b>{e(f.hospital)}</b>: " if f.hospital else ""
            H.append(f'<div class="f {f.level}"><span class="badge">{f.level}</span><code>{e(f.code)}</code> '
                     f"{who}{e(f.message)}</div>")
    else:
        H.append("<p>None.</p>")

    if report.kind == "federation" and report.rounds:
        H.append('<h2 id="rounds">Rounds</h2>')
        H.append(f'<p class="note">{e(ROUNDS_NOTE)}</p>')
        H.append(table(ROUND_COLUMNS, round_rows(report)))

    H += audit_section.html(report.empirical_checks, table, e)  # Empirical check, when an audit is present
    if plots:
        H.append('<h2 id="plots">Plots</h2>')
        for name, (caption, png) in plots.items():
            b64 = base64.b64encode(png).decode("ascii")
            H.append(f'<figure id="plot-{e(name)}"><img alt="{e(caption)}" src="data:image/png;base64,{b64}">'
                     f"<figcaption>{e(caption)}</figcaption></figure>")

    H.append('<h2 id="details">Details</h2><h3>DP parameters</h3>')
    H.append(table(DETAIL_COLUMNS, detail_rows(report)))
    H.append(f'<p class="note">{e(HOW_TO_READ_DETAILS)}</p>')
    H.append("<h3>Second opinion on ε</h3>")
    H.append(f'<p class="note">Every ε is recomputed from the logged (σ, q, steps) with '
             f"{e(report.accounting.independent_library)} (PLD, discretisation {report.accounting.pld_discretization:g}; "
             f"RDP), independent of Opacus used in training. {e(report.accounting.tolerance_rule)}</p>")
    so_rows = _second_opinion_rows(report)
    for r in so_rows:
        r[-1] = r[-1].replace("**NO**", '<span class="no">NO</span>').replace("yes", '<span class="yes">yes</span>', 1)
    H.append(table(SECOND_OPINION_COLUMNS, so_rows, raw_cols={len(SECOND_OPINION_COLUMNS) - 1}))
    for h in report.hospitals:
        if h.ledger is not None:
            H.append(f"<h3>Ledger of {e(h.hospital)}</h3>")
            H.append(f'<p class="note"><code>{e(h.ledger.path)}</code>: {h.ledger.lines} lines, hash chain verified; '
                     f"head hash <code>{e(h.ledger.head_hash[:16])}…</code>. Budget planned for "
                     f"{h.max_rounds_planned or '?'} rounds; N = {h.num_examples or '?'} training {e(_units(h))}; "
                     f"{e(_unit_sentence(h))}; noise source: "
                     f"{e(h.noise_source or 'unknown')}.</p>")
            H.append(table(LEDGER_COLUMNS, _ledger_rows(h)))
    H.append("<h3>Reference points</h3><ul>")
    H += [f'<li><b class="lvl-{rp.level}">{rp.level}</b>: {e(rp.meaning)}</li>' for rp in report.reference_points]
    H.append("</ul></main></body></html>")
    return "\n".join(H)


def render_json(report: Report) -> str:
    return report.model_dump_json(indent=2) + "\n"


def parse_formats(text: str) -> list[str]:
    parts = [p.strip().lower() for p in str(text).split(",") if p.strip()]
    if not parts or "all" in parts:
        return list(FORMATS)
    bad = [p for p in parts if p not in FORMATS]
    if bad:
        raise UserError(f"--format {text}: unknown format {bad[0]!r}; allowed: md, html, json, all (comma-separated)")
    return [f for f in FORMATS if f in parts]


def write_report(report: Report, out_dir: Path, formats: list[str]) -> list[Path]:
    """Render the plots and the requested formats into ``out_dir``; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rendered = render_all(report) if {"md", "html"} & set(formats) else {}
    report.plots = [PlotRef(name=n, file=f"{n}.png", caption=c) for n, (c, _) in rendered.items()]
    written: list[Path] = []
    for n, (_, png) in rendered.items():  # beside report.md / report.html (the HTML embeds them too)
        p = out_dir / f"{n}.png"
        p.write_bytes(png)
        written.append(p)
    if "md" in formats:
        p = out_dir / "report.md"
        p.write_text(render_markdown(report, {n: f"{n}.png" for n in rendered}), encoding="utf-8")
        written.append(p)
    if "html" in formats:
        p = out_dir / "report.html"
        p.write_text(render_html(report, rendered), encoding="utf-8")
        written.append(p)
    if "json" in formats:
        p = out_dir / "report.json"
        p.write_text(render_json(report), encoding="utf-8")
        written.append(p)
    return written


