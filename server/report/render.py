"""Rendering a report: Markdown, a self-contained HTML page (plots embedded), JSON; writing the files."""

from __future__ import annotations

import base64
import re
from html import escape
from pathlib import Path

from xrayfed.common.errors import UserError
from xrayfed.server.report.plots import render_all
from xrayfed.server.report.schema import FORMATS, HospitalReport, PlotRef, Report, privacy_level


# ============================================================================ renderers
def _num_text(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def _general_text(x: float | None) -> str:
    return "—" if x is None else f"{x:g}"


def _onoff(x: bool | None) -> str:
    return "unknown" if x is None else ("on" if x else "off")


HOSPITAL_COLUMNS = ("Hospital", "Privacy unit", "Budget ε", "δ", "ε spent", "ε left", "Rounds trained", "Rounds refused",
                    "Updates released / charged", "σ",
                    "Clip norm C", "Sample rate q", "Steps/round", "Accountant", "secure_mode", "Secure RNG",
                    "More rounds fit", "Level")


def hospital_rows(report: Report) -> list[list[str]]:
    return [[h.hospital, ("each patient" if h.unit == "patient" else "each scan (not each patient)")
             + (f", N = {h.num_examples}" if h.num_examples else ""), _general_text(h.epsilon_budget), _general_text(h.delta), _num_text(h.epsilon_spent), _num_text(h.epsilon_left),
             str(h.rounds_trained), str(h.rounds_refused),
             (f"{h.updates_released} / {h.rounds_trained}" if h.source != "metrics" else "—")
             + (f" ({h.releases_unpaid} UNPAID)" if h.releases_unpaid else ""),
             _num_text(h.noise_multiplier, ".4f"), _general_text(h.max_grad_norm),
             _num_text(h.sample_rate, ".4f"), "—" if h.steps_per_round is None else str(h.steps_per_round),
             h.accountant.upper(), _onoff(h.secure_mode), _onoff(h.secure_rng),
             "unknown" if h.rounds_more is None else str(h.rounds_more), h.privacy_level]
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


def _epsilon_matrix(report: Report) -> tuple[list[str], list[list[str]]]:
    names = [h.hospital for h in report.hospitals]
    header = ["Round", "Trained", "Refused / failed"] + [f"ε {n}" for n in names] + ["Largest ε", "AUC", "Accuracy"]
    rows = []
    for r in report.rounds:
        cells = []
        for n in names:
            e = r.epsilon.get(n)
            mark = "" if n in r.trained else (" (refused)" if n in r.refused else (" (resent)" if n in r.resent else ""))
            cells.append(("—" if e is None else f"{e:.3f}") + mark)
        ev = r.eval or r.client_eval or {}
        rows.append([str(r.round), ", ".join(r.trained) or "none", ", ".join(r.refused + r.failed) or "—", *cells,
                     (_num_text(r.max_epsilon) + (f" ({', '.join(r.max_epsilon_hospitals)})" if r.max_epsilon_hospitals else "")),
                     _num_text(ev.get("auc")), _num_text(ev.get("accuracy"))])
    return header, rows


def _ledger_rows(h: HospitalReport) -> list[list[str]]:
    rows = []
    for r in h.rounds:
        rows.append([str(r.round), r.federation or "—", r.status, _num_text(r.epsilon, ".4f"),
                     _num_text(r.epsilon_independent, ".4f"),
                     "—" if r.agrees is None else ("yes" if r.agrees else "NO"),
                     _num_text(r.noise_multiplier, ".4f"), _num_text(r.sample_rate, ".4f"), "—" if r.steps is None else str(r.steps),
                     _num_text(r.epsilon_reported, ".4f"), r.time or "—"])
    return rows


LEDGER_COLUMNS = ("Round", "Federation", "Event", "ε (training)", "ε (independent)", "Agrees", "σ", "q",
                  "Steps", "ε reported to server", "Time (UTC)")

HOW_TO_READ = (
    "ε and δ: each hospital's model updates are (ε, δ)-differentially private with respect to its own training "
    "images (example-level DP, add/remove adjacency) over the whole run; ε is cumulative. 'ε left' is budget − "
    "spent; 'More rounds fit' is how many further rounds at the last round's σ, q and steps keep ε within the "
    "budget (the hospital's own test before training). secure_mode is Opacus' secure mode (never used by "
    "xrayfed); 'Secure RNG' says whether the DP noise comes from a cryptographically secure generator."
)


def render_markdown(report: Report, plot_files: dict[str, str] | None = None) -> str:
    L: list[str] = [f"# {report.title}", ""]
    src = ", ".join(f"`{s}`" for s in report.sources)
    L.append(f"Generated {report.generated_at} by {report.generator} from {src}. JSON schema version "
             f"{report.schema_version}.")
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
    L += ["", "## Second opinion on ε", "",
          f"Every ε is recomputed from the logged (σ, q, steps) with {report.accounting.independent_library} "
          f"(PLD, discretisation {report.accounting.pld_discretization:g}; RDP), independent of Opacus used in "
          f"training. {report.accounting.tolerance_rule}", "",
          _md_table(SECOND_OPINION_COLUMNS, _second_opinion_rows(report)), ""]
    if report.kind == "federation" and report.rounds:
        header, rows = _epsilon_matrix(report)
        L += ["## Rounds", "", "ε is each hospital's cumulative ε as reported to the server; 'Largest ε' is the "
              "largest in the federation after the round.", "", _md_table(header, rows), ""]
    if plot_files:
        L += ["## Plots", ""]
        for p in report.plots:
            if p.name in plot_files:
                L += [f"![{p.caption}]({plot_files[p.name]})", "", f"*{p.caption}*", ""]
    for h in report.hospitals:
        if h.ledger is not None:
            L += [f"## Ledger of {h.hospital}", "",
                  f"`{h.ledger.path}`: {h.ledger.lines} lines, hash chain verified; head hash `{h.ledger.head_hash}`. "
                  f"Budget planned for {h.max_rounds_planned or '?'} rounds; N = {h.num_examples or '?'} training "
                  f"{_units(h)}; {_unit_sentence(h)}; noise source: {h.noise_source or 'unknown'}.", "",
                  _md_table(LEDGER_COLUMNS, _ledger_rows(h)), ""]
    L += ["## Reference points", ""]
    L += [f"- **{rp.level}**: {rp.meaning}" for rp in report.reference_points]
    L.append("")
    return "\n".join(L)


_CSS = """
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;color:#1d2330;margin:0;background:#f5f6f8}
main{max-width:1200px;margin:0 auto;padding:24px 28px 48px;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e3e5ea;padding-bottom:4px}
.meta{color:#667;font-size:12px;margin-bottom:14px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0}
.card{border:1px solid #e3e5ea;border-radius:8px;padding:10px 14px;min-width:150px}
.card .v{font-size:22px;font-weight:600}.card .k{font-size:12px;color:#667}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 10px;width:100%}
th,td{border:1px solid #e3e5ea;padding:4px 7px;text-align:left;white-space:nowrap}
th{background:#f0f2f5;font-weight:600;white-space:normal;vertical-align:bottom}td.n,th.n{text-align:right}
.scroll{overflow-x:auto}
.f{padding:6px 10px;border-radius:6px;margin:5px 0;border-left:4px solid}
.critical{background:#fdecea;border-color:#c0392b}.warning{background:#fff6e0;border-color:#e0a100}
.info{background:#eef4fb;border-color:#5b8bd0}
.badge{display:inline-block;font-size:11px;font-weight:700;text-transform:uppercase;margin-right:6px}
.lvl-strong{color:#1e8449}.lvl-common{color:#2e6fb7}.lvl-reasonable{color:#b9770e}.lvl-weak{color:#c0392b}
.no{color:#c0392b;font-weight:700}.yes{color:#1e8449}
figure{margin:12px 0 18px}figure img{max-width:100%;border:1px solid #e3e5ea;border-radius:6px}
figcaption{font-size:12px;color:#556}.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:8px}
code{font-size:12px;background:#f0f2f5;padding:1px 4px;border-radius:3px}
p.note{font-size:12.5px;color:#445}
"""


_NUMERIC = re.compile(r"^(—|[±+\-−]?\d[\d.,e+\-]*( \(.*\))?|unknown)$")


def render_html(report: Report, plots: dict[str, tuple[str, bytes]] | None = None) -> str:
    e = escape

    def table(header, rows, raw_cols: set[int] = frozenset()) -> str:  # type: ignore[assignment]
        # Right-align a column whose cells are all numbers (or "—").
        num = [bool(rows) and all(_NUMERIC.match(str(r[i])) for r in rows) for i in range(len(header))]
        th = "".join(f'<th{" class=n" if num[i] else ""}>{e(str(c))}</th>' for i, c in enumerate(header))
        body = "".join("<tr>" + "".join(f'<td{" class=n" if num[i] else ""}>{c if i in raw_cols else e(str(c))}</td>'
                                        for i, c in enumerate(r)) + "</tr>" for r in rows)
        return f'<div class="scroll"><table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'

    H: list[str] = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                    '<meta name="viewport" content="width=device-width, initial-scale=1">',
                    f"<title>{e(report.title)}</title><style>{_CSS}</style></head><body><main>",
                    f"<h1>{e(report.title)}</h1>",
                    f'<div class="meta">Generated {e(report.generated_at)} by {e(report.generator)} · JSON schema '
                    f'{e(report.schema_version)} · sources: {", ".join("<code>" + e(s) + "</code>" for s in report.sources)}'
                    "</div>"]
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

    H.append("<h2>Hospitals</h2>")
    rows = hospital_rows(report)
    for r in rows:
        r[-1] = f'<span class="lvl-{r[-1]}">{e(r[-1])}</span>'
    H.append(table(HOSPITAL_COLUMNS, rows, raw_cols={len(HOSPITAL_COLUMNS) - 1}))
    H.append(f'<p class="note">{e(HOW_TO_READ)}</p>')

    H.append("<h2>Findings</h2>")
    if report.findings:
        for f in report.findings:
            who = f"<b>{e(f.hospital)}</b>: " if f.hospital else ""
            H.append(f'<div class="f {f.level}"><span class="badge">{f.level}</span><code>{e(f.code)}</code> '
                     f"{who}{e(f.message)}</div>")
    else:
        H.append("<p>None.</p>")

    if plots:
        H.append("<h2>Plots</h2><div class=\"plots\">")
        for name, (caption, png) in plots.items():
            b64 = base64.b64encode(png).decode("ascii")
            H.append(f'<figure id="plot-{e(name)}"><img alt="{e(caption)}" src="data:image/png;base64,{b64}">'
                     f"<figcaption>{e(caption)}</figcaption></figure>")
        H.append("</div>")

    H.append("<h2>Second opinion on ε</h2>")
    H.append(f'<p class="note">Every ε is recomputed from the logged (σ, q, steps) with '
             f"{e(report.accounting.independent_library)} (PLD, discretisation {report.accounting.pld_discretization:g}; "
             f"RDP), independent of Opacus used in training. {e(report.accounting.tolerance_rule)}</p>")
    so_rows = _second_opinion_rows(report)
    for r in so_rows:
        r[-1] = r[-1].replace("**NO**", '<span class="no">NO</span>').replace("yes", '<span class="yes">yes</span>', 1)
    H.append(table(SECOND_OPINION_COLUMNS, so_rows, raw_cols={len(SECOND_OPINION_COLUMNS) - 1}))

    if report.kind == "federation" and report.rounds:
        header, rrows = _epsilon_matrix(report)
        H.append("<h2>Rounds</h2>")
        H.append('<p class="note">ε is each hospital\'s cumulative ε as reported to the server; "Largest ε" is the '
                 "largest in the federation after the round.</p>")
        H.append(table(header, rrows))
    for h in report.hospitals:
        if h.ledger is not None:
            H.append(f"<h2>Ledger of {e(h.hospital)}</h2>")
            H.append(f'<p class="note"><code>{e(h.ledger.path)}</code>: {h.ledger.lines} lines, hash chain verified; '
                     f"head hash <code>{e(h.ledger.head_hash[:16])}…</code>. Budget planned for "
                     f"{h.max_rounds_planned or '?'} rounds; N = {h.num_examples or '?'} training {e(_units(h))}; "
                     f"{e(_unit_sentence(h))}; noise source: "
                     f"{e(h.noise_source or 'unknown')}.</p>")
            H.append(table(LEDGER_COLUMNS, _ledger_rows(h)))
    H.append("<h2>Reference points</h2><ul>")
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


