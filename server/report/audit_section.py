"""The report's "Empirical check" section: a hospital's privacy audit (``xrayfed audit``) beside
its claimed ε, in plain words, with one plot.

Where the report finds an audit: ``audit.json`` beside each hospital ledger it reads (the
hospital's ``state_dir``, where ``xrayfed audit`` writes by default) and, for a federation run,
``RUN_DIR/audit*.json`` (a hospital may give the operator its audit file: it holds aggregate
figures only, no scan and no patient). A file that cannot be read is reported as a finding,
never a traceback. The section and the plot appear only when an audit is present.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import BaseModel, ConfigDict

from xrayfed.common.privacy.audit import AUDIT_FILE

DPI = 110  # as the report's other plots (xrayfed.server.report.plots)
MIN_FONT_PT = 10

TITLE = "Empirical check"
PLOT_NAME = "empirical-check"
#: What the report reads in a folder: ``audit.json`` (``xrayfed audit``'s default) and ``audit-*.json``.
AUDIT_GLOB = AUDIT_FILE.replace(".json", "*.json")
PLOT_CAPTION = "Empirical check: claimed ε against the audited lower bound (and the membership-attack AUC)"
EXPLANATION = (
    "A privacy audit trains the hospital's exact plan once more, in its own process (nothing is charged, nothing "
    "leaves), with canaries — artificial training units, each included with probability 1/2 — and an adversary "
    "tries to tell which were included: the white-box auditor sees every noised training step (gradient "
    "canaries: the stronger test), the black-box auditor only the final model (training scans with changed "
    "labels: a weaker bound). How well it guesses gives a lower bound on ε that holds at the stated confidence "
    "(Steinke, Nasr & Jagielski 2023). A lower bound above the "
    "claimed ε proves the training spends more privacy than it claims (a bug or a misconfiguration); a lower "
    "bound below it is the expected outcome and shows no such bug, but it cannot prove there is none. The "
    "membership attack asks whether the trained model's loss tells the hospital's training patients from its "
    "held-out ones (AUC 0.5: no better than a coin), beside the same attack on a model trained without DP; "
    "LiRA, where run, is the stronger likelihood-ratio attack calibrated on shadow models trained the same way.")


class EmpiricalCheck(BaseModel):
    """One audit result as the report shows it (read from an ``audit.json``)."""

    model_config = ConfigDict(extra="forbid")

    hospital: str
    source: str
    unit: str
    claimed_epsilon: float
    delta: float
    audited_lower_bound: float
    confidence: float
    canaries: int
    caught: bool
    signal_ratio_lower: float | None = None
    mia_auc_dp: float | None = None
    mia_auc_no_dp: float | None = None
    auditor: str | None = None  # "white-box …" or "black-box …" (absent from older audit files: white-box)
    lira_auc_dp: float | None = None
    lira_auc_no_dp: float | None = None
    lira_shadows: int | None = None
    broken: str | None = None
    verdict: str = ""


def read_audit(path: Path) -> EmpiricalCheck:
    """The :class:`EmpiricalCheck` of one ``audit.json``; ``ValueError`` naming what is wrong."""
    try:
        d: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        mia = d.get("mia") or {}
        lira = mia.get("lira") or {}
        sc = d.get("signal_check") or {}
        return EmpiricalCheck(
            hospital=str(d["hospital"]), source=str(path), unit=str(d["unit"]),
            claimed_epsilon=float(d["claimed_epsilon"]), delta=float(d["delta"]),
            audited_lower_bound=float(d["audited_lower_bound"]), confidence=float(d["confidence"]),
            canaries=int(d["canaries"]), caught=bool(d.get("caught", d["audited_lower_bound"] > d["claimed_epsilon"])),
            signal_ratio_lower=sc.get("ratio_lower"), mia_auc_dp=mia.get("auc_dp"), mia_auc_no_dp=mia.get("auc_no_dp"),
            auditor=str(d["auditor"]) if d.get("auditor") else None, lira_auc_dp=lira.get("auc_dp"),
            lira_auc_no_dp=lira.get("auc_no_dp"), lira_shadows=lira.get("shadows"),
            broken=d.get("broken"), verdict=str(d.get("verdict", "")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable audit result ({type(e).__name__}: {str(e)[:120]})") from None


def find_audits(folders: Iterable[Path]) -> tuple[list[EmpiricalCheck], list[str]]:
    """Every ``audit*.json`` directly in ``folders`` (each file once), and one line for each that
    cannot be read (the report shows it as a warning)."""
    out: list[EmpiricalCheck] = []
    problems: list[str] = []
    seen: set[Path] = set()
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for p in sorted(folder.glob(AUDIT_GLOB)):
            if p.resolve() in seen or not p.is_file():
                continue
            seen.add(p.resolve())
            try:
                out.append(read_audit(p))
            except ValueError as e:
                problems.append(str(e))
    return out, problems


def exceeded(checks: list[EmpiricalCheck]) -> list[tuple[str, str]]:
    """``(hospital, message)`` for every audit that caught the training spending more than it
    claims (a critical finding in the report)."""
    return [(c.hospital, f"the privacy audit ({c.source}) found the training spends more than the claimed "
                         f"ε = {c.claimed_epsilon:.2f}: {c.verdict}") for c in checks if c.caught]


def auditor_kind(c: EmpiricalCheck) -> str:
    """``white-box`` or ``black-box`` (an audit file without the field is white-box: the only kind before)."""
    return "black-box" if (c.auditor or "").startswith("black-box") else "white-box"


def plain_lines(checks: list[EmpiricalCheck]) -> list[str]:
    """One sentence per audit, in plain words."""
    lines = []
    for c in checks:
        pct = f"{100 * c.confidence:g} %"
        who = ""
        if c.auditor:
            who = (" (black-box: input-space canaries scored on the final model only)" if auditor_kind(c) == "black-box"
                   else " (white-box: gradient canaries, every noised step observed)")
        s = (f"{c.hospital} (per {c.unit}): claimed ε = {c.claimed_epsilon:.2f}; audited lower bound "
             f"{c.audited_lower_bound:.2f} at {pct} confidence from {c.canaries} canaries{who} — ")
        if c.caught:
            s += "the training spends MORE privacy than it claims: do not train with it until this is fixed."
        else:
            s += "no evidence that ε is larger than claimed (a lower bound can reveal a bug, never prove its absence)."
        if c.mia_auc_dp is not None and c.mia_auc_no_dp is not None:
            s += (f" Membership attack on its model: AUC {c.mia_auc_dp:.3f} with DP, {c.mia_auc_no_dp:.3f} without "
                  "(0.5 = a coin).")
        if c.lira_auc_dp is not None and c.lira_auc_no_dp is not None:
            s += (f" LiRA ({c.lira_shadows} shadow models): AUC {c.lira_auc_dp:.3f} with DP, {c.lira_auc_no_dp:.3f} "
                  "without.")
        if c.broken:
            s += f" (A benchmark run with the deliberate fault {c.broken}.)"
        lines.append(s)
    return lines


COLUMNS = ["Hospital", "Unit", "Auditor", "Claimed ε", "Audited lower bound", "Confidence", "Canaries",
           "Attack AUC (DP)", "Attack AUC (no DP)", "LiRA AUC (DP)", "LiRA AUC (no DP)", "Verdict"]


def rows(checks: list[EmpiricalCheck]) -> list[list[str]]:
    def num(x: float | None) -> str:
        return "—" if x is None else f"{x:.3f}"

    return [[c.hospital, c.unit, auditor_kind(c), f"{c.claimed_epsilon:.2f}", f"{c.audited_lower_bound:.2f}",
             f"{100 * c.confidence:g} %", str(c.canaries), num(c.mia_auc_dp), num(c.mia_auc_no_dp),
             num(c.lira_auc_dp), num(c.lira_auc_no_dp),
             "MORE than claimed" if c.caught else "no evidence above claim"] for c in checks]


def markdown(checks: list[EmpiricalCheck], table: Callable[[list[str], list[list[str]]], str]) -> list[str]:
    """The section's Markdown lines (empty without an audit)."""
    if not checks:
        return []
    L = [f"## {TITLE}", "", EXPLANATION, ""]
    L += [f"- {line}" for line in plain_lines(checks)]
    L += ["", table(COLUMNS, rows(checks)), ""]
    return L


def html(checks: list[EmpiricalCheck], table: Callable[..., str], escape: Callable[[str], str]) -> list[str]:
    """The section's HTML (empty without an audit)."""
    if not checks:
        return []
    H = [f'<h2 id="empirical-check">{TITLE}</h2>', f'<p class="note">{escape(EXPLANATION)}</p>',
         '<ul class="plain">' + "".join(f"<li>{escape(line)}</li>" for line in plain_lines(checks)) + "</ul>",
         table(COLUMNS, rows(checks))]
    return H


def plot(checks: list[EmpiricalCheck]) -> bytes | None:
    """Claimed ε against the audited lower bound per audit (bars; red where the bound is above the
    claim), the attack AUC with and without DP in the title where measured. None without an audit."""
    if not checks:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.2), dpi=DPI)
    ax.grid(True, axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    labels = [c.hospital + (f"\n({c.broken})" if c.broken else "") + ("\n(black-box)" if auditor_kind(c) == "black-box"
              else "") for c in checks]
    xs = list(range(len(checks)))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [c.claimed_epsilon for c in checks], w, color="#5b8bd0", label="claimed ε")
    ax.bar([x + w / 2 for x in xs], [c.audited_lower_bound for c in checks], w,
           color=["#c0392b" if c.caught else "#1e8449" for c in checks],
           label=f"audited lower bound ({100 * checks[0].confidence:g} % confidence)")
    for x, c in zip(xs, checks):
        ax.annotate(f"{c.audited_lower_bound:.2f}", xy=(x + w / 2, c.audited_lower_bound), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=MIN_FONT_PT)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=MIN_FONT_PT)
    ax.set_ylabel("ε")
    ax.legend(loc="upper left", fontsize=MIN_FONT_PT)
    mia = [(x, c) for x, c in zip(xs, checks) if c.mia_auc_dp is not None and c.mia_auc_no_dp is not None]
    if mia:
        note = "; ".join(f"{c.hospital}: attack AUC {c.mia_auc_dp:.2f} (DP) vs {c.mia_auc_no_dp:.2f} (no DP)"
                         for _, c in mia)
        ax.set_title(note if len(note) < 80 else "membership attack AUC: see the table", fontsize=MIN_FONT_PT + 1)
    else:
        ax.set_title("Claimed ε vs audited lower bound")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()
