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
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import BaseModel, ConfigDict

from xrayfed.common.privacy.audit import AUDIT_FILE, exceeds_claim

DPI = 110  # as the report's other plots (xrayfed.server.report.plots)
MIN_FONT_PT = 10

TITLE = "Empirical check"
PLOT_NAME = "empirical-check"
#: What the report reads in a folder: ``audit.json`` (``xrayfed audit``'s default) and ``audit-*.json``.
AUDIT_GLOB = AUDIT_FILE.replace(".json", "*.json")
PLOT_CAPTION = ("Empirical check: claimed ε against the audit's f-DP figure, measured ε and (ε, δ) lower bound (and "
                "the membership-attack AUC)")
EXPLANATION = (
    "A privacy audit trains the hospital's exact plan once more, in its own process (nothing is charged, nothing "
    "leaves), with canaries — artificial training units, each included with probability 1/2 — and an adversary "
    "tries to tell which were included: the white-box auditor sees every noised training step (gradient "
    "canaries: the stronger test), the black-box auditor only the final model (training scans with changed "
    "labels: a weaker signal). How well it guesses gives two figures, both holding at the stated confidence. "
    "The f-DP figure (Mahloujifar, Melis & Chaudhuri 2025) is the audit's first test: the run is shown to be less "
    "private than the kind of noisy training (DP-SGD) its ε was computed for would be at an ε equal to the "
    "figure, so a figure above the claimed ε (beyond the accountants' small tolerance) proves the training "
    "spends more privacy than it claims (a bug or a misconfiguration). The (ε, δ) lower bound (Steinke, Nasr & "
    "Jagielski 2023) says the run's own ε is at least that, whatever the training, and is shown for reference: "
    "it cannot exceed about 6.3 at δ = 10⁻⁵, so it cannot catch a fault at a claimed ε = 8. The white-box audit "
    "also measures the noise, clipping and sample rate its canaries actually met and states the measured ε, the "
    "ε of DP-SGD with those (a lower bound at 99.9 % confidence that assumes the training adds Gaussian noise to "
    "clipped contributions, as its code does): above the claim, the run fails too, as it does when the canaries "
    "carry more signal than the accountant was told. Figures below the claim are the expected outcome and show "
    "no such bug, but they cannot prove there is none. The "
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
    audited_lower_bound: float  # the (ε, δ) one-run lower bound
    confidence: float
    fdp_epsilon: float | None = None  # the f-DP figure (absent from older audit files)
    measured_epsilon: float | None = None  # white-box: the measured-mechanism lower bound (absent from older files)
    measured_confidence: float | None = None
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
        me = d.get("measured") or {}
        return EmpiricalCheck(
            measured_epsilon=(float(d["audited_lower_bound_measured"])
                              if d.get("audited_lower_bound_measured") is not None else None),
            measured_confidence=me.get("confidence"),
            hospital=str(d["hospital"]), source=str(path), unit=str(d["unit"]),
            claimed_epsilon=float(d["claimed_epsilon"]), delta=float(d["delta"]),
            audited_lower_bound=float(d["audited_lower_bound"]), confidence=float(d["confidence"]),
            fdp_epsilon=(float(d["audited_lower_bound_fdp"]) if d.get("audited_lower_bound_fdp") is not None
                         else None),
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
        if c.fdp_epsilon is None:  # an audit file from before the f-DP figure: its one bound
            figures = f"audited lower bound {c.audited_lower_bound:.2f}"
        else:
            figures = (f"f-DP figure {c.fdp_epsilon:.2f} (the audit's test: the training is less private than "
                       "DP-SGD at that ε would be) and (ε, δ) lower bound "
                       f"{c.audited_lower_bound:.2f} (its ε is at least that)")
        measured = ("" if c.measured_epsilon is None else
                    f"; measured ε ≥ {c.measured_epsilon:.2f} at {100 * (c.measured_confidence or 0.999):g} % (the "
                    "noise, clipping and sample rate the canaries met, as DP-SGD's ε)")
        s = (f"{c.hospital} (per {c.unit}): claimed ε = {c.claimed_epsilon:.2f}; {figures} at {pct} confidence"
             f"{measured} from {c.canaries} canaries{who} — ")
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


COLUMNS = ["Hospital", "Unit", "Auditor", "Claimed ε", "f-DP figure", "Measured ε ≥", "(ε, δ) lower bound",
           "Confidence", "Canaries", "Attack AUC (DP)", "Attack AUC (no DP)", "LiRA AUC (DP)", "LiRA AUC (no DP)", "Verdict"]


def rows(checks: list[EmpiricalCheck]) -> list[list[str]]:
    def num(x: float | None) -> str:
        return "—" if x is None else f"{x:.3f}"

    return [[c.hospital, c.unit, auditor_kind(c), f"{c.claimed_epsilon:.2f}",
             "—" if c.fdp_epsilon is None else f"{c.fdp_epsilon:.2f}",
             "—" if c.measured_epsilon is None else f"{c.measured_epsilon:.2f}", f"{c.audited_lower_bound:.2f}",
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
    """Per audit, bars for the claimed ε, the f-DP figure and the measured ε (white-box; dotted),
    each red where that figure is above the claim by more than the accountants' tolerance (its test
    caught the run), green where not (no bar where an older audit file lacks it), and the (ε, δ)
    lower bound (grey: reported, not tested; coloured by the verdict in an older file, where it was the test), the
    attack AUC with and without DP in the title where measured. None without an audit."""
    if not checks:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.2), dpi=DPI)
    ax.grid(True, axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    def label(c: EmpiricalCheck) -> str:  # fault names wrapped, so neighbouring labels do not overlap
        fault = "\n(" + "\n".join(textwrap.wrap(c.broken.replace("_", " "), 12)) + ")" if c.broken else ""
        return c.hospital + fault + ("\n(black-box)" if auditor_kind(c) == "black-box" else "")

    labels = [label(c) for c in checks]
    xs = list(range(len(checks)))
    w = 0.2
    pct = f"{100 * checks[0].confidence:g} % confidence"

    from matplotlib.patches import Patch

    red, green, grey, blue = "#c0392b", "#1e8449", "#8c8c8c", "#5b8bd0"

    def verdict_colour(c: EmpiricalCheck) -> str:
        return red if c.caught else green

    def test_colour(c: EmpiricalCheck, figure: float | None) -> str:  # each test's own outcome
        return red if exceeds_claim(c.claimed_epsilon, figure) else green

    ax.bar([x - 1.5 * w for x in xs], [c.claimed_epsilon for c in checks], w, color=blue)
    with_fdp = [(x, c) for x, c in zip(xs, checks) if c.fdp_epsilon is not None]
    if with_fdp:
        ax.bar([x - 0.5 * w for x, _ in with_fdp], [c.fdp_epsilon for _, c in with_fdp], w,
               color=[test_colour(c, c.fdp_epsilon) for _, c in with_fdp])
    with_measured = [(x, c) for x, c in zip(xs, checks) if c.measured_epsilon is not None]
    if with_measured:
        ax.bar([x + 0.5 * w for x, _ in with_measured], [c.measured_epsilon for _, c in with_measured], w,
               color=[test_colour(c, c.measured_epsilon) for _, c in with_measured], hatch="..", edgecolor="white")
    old = [c.fdp_epsilon is None for c in checks]  # an older file: its (ε, δ) bound was the test
    ax.bar([x + 1.5 * w for x in xs], [c.audited_lower_bound for c in checks], w,
           color=[verdict_colour(c) if o else grey for c, o in zip(checks, old)],
           hatch=["//" if o else "" for o in old], edgecolor="white")
    for x, c in zip(xs, checks):
        for dx, y in ((-0.5 * w, c.fdp_epsilon), (0.5 * w, c.measured_epsilon), (1.5 * w, c.audited_lower_bound)):
            if y is not None:
                ax.annotate(f"{y:.2f}", xy=(x + dx, y), xytext=(0, 3), textcoords="offset points", ha="center",
                            fontsize=MIN_FONT_PT)
    handles = [Patch(color=blue, label="claimed ε")]
    if with_fdp:
        handles.append(Patch(color=green, label=f"f-DP figure ({pct}), a test: red above the claim"))
    if with_measured:
        handles.append(Patch(facecolor=green, hatch="..", edgecolor="white",
                             label="measured ε (white-box, 99.9 %), a test: red above the claim"))
    if not all(old):
        handles.append(Patch(color=grey, label=f"(ε, δ) lower bound ({pct}), reported"))
    if any(old):
        handles.append(Patch(facecolor=green, hatch="//", edgecolor="white",
                             label="(ε, δ) lower bound, older audit file (then the test)"))
    top = max(max(c.claimed_epsilon, c.audited_lower_bound, c.fdp_epsilon or 0.0, c.measured_epsilon or 0.0)
              for c in checks)
    ax.set_ylim(0, top * (1.25 + 0.1 * len(handles)) if top > 0 else 1.0)  # room for the legend
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=MIN_FONT_PT)
    ax.set_ylabel("ε")
    ax.legend(handles=handles, loc="upper left", fontsize=MIN_FONT_PT)
    mia = [(x, c) for x, c in zip(xs, checks) if c.mia_auc_dp is not None and c.mia_auc_no_dp is not None]
    if mia:
        note = "; ".join(f"{c.hospital}: attack AUC {c.mia_auc_dp:.2f} (DP) vs {c.mia_auc_no_dp:.2f} (no DP)"
                         for _, c in mia)
        ax.set_title(note if len(note) < 80 else "membership attack AUC: see the table", fontsize=MIN_FONT_PT + 1)
    else:
        ax.set_title("Claimed ε vs the audit's figures")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()
