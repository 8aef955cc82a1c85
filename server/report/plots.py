"""Plots of a privacy-budget report (matplotlib, Agg backend, PNG bytes).

* :func:`epsilon_per_round` — cumulative ε of every hospital per round, each against its budget
  line, with the reference points (ε = 1, 8, 10) as faint guides.
* :func:`auc_per_round` — the global model's AUC per round (server held-out set; the hospitals'
  local validation AUC dashed when reported).
* :func:`privacy_utility` — AUC against the largest ε in the federation after each round.

Every function takes a :class:`~xrayfed.server.report.Report` and returns PNG bytes, or
``None`` when the report holds nothing to draw. Only aggregate numbers are drawn.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from xrayfed.server.report import audit_section

if TYPE_CHECKING:  # pragma: no cover
    from xrayfed.server.report.schema import Report

DPI = 110
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", ":", "-.")
SIZE = (7.2, 4.2)
#: Every text in a plot (titles, labels, ticks, legends, annotations) is at least this large, in
#: points: legible where the report shows the plot at its own size (100 %).
MIN_FONT_PT = 10
REFERENCE_LINES = ((1.0, "ε = 1 (strong)"), (8.0, "ε = 8 (common limit)"), (10.0, "ε = 10 (weak above)"))
#: A plot is drawn only with at least this many points: one point alone says nothing a table does not.
MIN_POINTS = 2


def _fit(values: list[float], pad: float = 0.12, min_span: float = 0.0, lo_bound: float | None = None,
         hi_bound: float | None = None) -> tuple[float, float]:
    """Axis limits that fit ``values`` with a margin of ``pad`` × their span each side (at least
    ``min_span`` in all), within ``lo_bound``/``hi_bound``: the data fills the plot."""
    lo, hi = min(values), max(values)
    span = max(hi - lo, min_span)
    mid = (lo + hi) / 2
    lo, hi = mid - span / 2 - pad * span, mid + span / 2 + pad * span
    if lo_bound is not None and lo < lo_bound:
        hi, lo = min(hi + (lo_bound - lo), hi_bound if hi_bound is not None else float("inf")), lo_bound
    if hi_bound is not None and hi > hi_bound:
        lo, hi = max(lo - (hi - hi_bound), lo_bound if lo_bound is not None else -float("inf")), hi_bound
    return lo, hi


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10,
                         "ytick.labelsize": 10, "legend.fontsize": 10})
    fig, ax = plt.subplots(figsize=SIZE, dpi=DPI)
    ax.grid(True, color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def _round_axis(report: "Report") -> tuple[dict[str, list[tuple[float, object]]], str]:
    """Per hospital: [(x, HospitalRound)]; x is the round number, or the n-th entry of the
    hospital's ledger when its ledger spans several federations (round numbers repeat)."""
    out: dict[str, list[tuple[float, object]]] = {}
    sequential = False
    for h in report.hospitals:
        keys = [(r.federation, r.round) for r in h.rounds if r.status == "trained"]
        if len({f for f, _ in keys}) > 1 or len(keys) != len(set(keys)):
            sequential = True
    for h in report.hospitals:
        pts = []
        n = 0
        for r in h.rounds:
            if r.epsilon is None:
                continue
            n += 1
            pts.append((float(n if sequential else r.round), r))
        out[h.hospital] = pts
    return out, ("entry in the hospital's ledger" if sequential else "round")


def _shifts(series: dict[str, list], top: float) -> dict[str, float]:
    """How far to shift each hospital's curve along the round axis: hospitals whose ε curves
    coincide (within 1 % of the axis wherever both have a point) are set side by side, centred
    on the round; every other curve stays on its round."""
    curves = {name: {x: r.epsilon for x, r in pts} for name, pts in series.items() if pts}
    names = list(curves)
    group: dict[str, int] = {}
    for a in names:
        for b in names:
            if a == b or b in group:
                continue
            shared = set(curves[a]) & set(curves[b])
            if shared and all(abs(curves[a][x] - curves[b][x]) <= 0.01 * top for x in shared):
                group.setdefault(a, len(group))
                group[b] = group[a]
    out = {n: 0.0 for n in series}
    for g in set(group.values()):
        members = [n for n in names if group.get(n) == g]
        step = min(0.12, 0.6 / len(members))
        for i, n in enumerate(members):
            out[n] = (i - (len(members) - 1) / 2) * step
    return out


def epsilon_per_round(report: "Report") -> bytes | None:
    if not report.hospitals or not any(h.rounds for h in report.hospitals):
        return None
    series, xlabel = _round_axis(report)
    if len({x for pts in series.values() for x, _ in pts}) < MIN_POINTS:
        return None  # one round: the table says it all
    plt, fig, ax = _figure()
    fig.set_size_inches(SIZE[0], SIZE[1] + 0.5)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ymax = max([h.epsilon_budget for h in report.hospitals] + [h.epsilon_spent for h in report.hospitals])
    top = ymax * 1.15 if ymax > 0 else 1.0
    xs_all: list[float] = []
    refused_labelled = disputed_labelled = False
    shifts = _shifts(series, top)
    # Each hospital has its own colour, marker and line style; hospitals with the same settings
    # have the same curve, and then each is also shifted a little along the round axis (its
    # markers stand side by side instead of on top of each other).
    for i, h in enumerate(report.hospitals):
        c = colors[i % len(colors)]
        shift = shifts.get(h.hospital, 0.0)
        pts = [(x + shift, r) for x, r in series.get(h.hospital, [])]
        xs_all += [x for x, _ in pts]
        if not pts:
            continue
        ax.plot([x for x, _ in pts], [r.epsilon for _, r in pts], color=c,  # type: ignore[attr-defined]
                marker=MARKERS[i % len(MARKERS)], markersize=6, linewidth=1.8,
                linestyle=LINESTYLES[i % len(LINESTYLES)], label=f"{h.hospital}", zorder=3 + i / 100)
        ref = [(x, r.epsilon) for x, r in pts if r.status == "refused"]  # type: ignore[attr-defined]
        if ref:
            ax.scatter([x for x, _ in ref], [y for _, y in ref], marker="x", s=70, linewidths=2, color="#c0392b",
                       zorder=5, label=None if refused_labelled else "round refused (budget spent)")
            refused_labelled = True
        bad = [(x, r.epsilon) for x, r in pts if r.agrees is False]  # type: ignore[attr-defined]
        if bad:
            ax.scatter([x for x, _ in bad], [y for _, y in bad], marker="o", s=160, facecolors="none",
                       edgecolors="#c0392b", linewidths=2, zorder=6,
                       label=None if disputed_labelled else "ε disputed by the independent accountant")
            disputed_labelled = True
    # One dashed line per distinct budget, named after the hospitals that have it.
    budgets: dict[float, list[str]] = {}
    for h in report.hospitals:
        budgets.setdefault(round(h.epsilon_budget, 9), []).append(h.hospital)
    for b, names in sorted(budgets.items()):
        who = "every hospital" if len(names) == len(report.hospitals) > 1 else ", ".join(names)
        ax.axhline(b, color="#333333", linestyle="--", linewidth=1.3, zorder=1)
        ax.annotate(f"budget ε = {b:g} ({who})", xy=(0.0, b), xycoords=("axes fraction", "data"), xytext=(4, 3),
                    textcoords="offset points", ha="left", va="bottom", fontsize=MIN_FONT_PT, color="#333333", zorder=2,
                    bbox=dict(boxstyle="square,pad=0.15", fc="white", ec="none", alpha=0.9))
    for y, text in REFERENCE_LINES:
        if y <= top and all(abs(y - b) > 1e-9 for b in budgets):
            ax.axhline(y, color="#aaaaaa", linestyle=":", linewidth=0.9, zorder=0)
            ax.annotate(text, xy=(1.0, y), xycoords=("axes fraction", "data"), xytext=(-4, 2),
                        textcoords="offset points", ha="right", va="bottom", fontsize=MIN_FONT_PT, color="#777777")
    ax.set_ylim(0, top)
    if xs_all:
        lo, hi = min(xs_all), max(xs_all)
        ax.set_xlim(lo - 0.5, hi + 0.5)
        if hi - lo <= 20:
            ax.set_xticks(range(int(round(lo)), int(round(hi)) + 1))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ε spent (cumulative)")
    ax.set_title("Privacy budget spent per round (δ per hospital in the table)")
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i].startswith(("round refused", "ε disputed")))
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    ax.legend(handles, labels, fontsize=MIN_FONT_PT, loc="upper center", bbox_to_anchor=(0.5, -0.16),
              ncol=min(4, max(1, len(labels))), frameon=False)
    return _png(plt, fig)


def _auc_rows(report: "Report"):
    server = [(r.round, r.eval.get("auc")) for r in report.rounds if r.eval and r.eval.get("auc") is not None]
    client = [(r.round, r.client_eval.get("auc")) for r in report.rounds
              if r.client_eval and r.client_eval.get("auc") is not None]
    return server, client


def auc_per_round(report: "Report") -> bytes | None:
    server, client = _auc_rows(report)
    if max(len(server), len(client)) < MIN_POINTS:
        return None
    plt, fig, ax = _figure()
    if server:
        ax.plot([x for x, _ in server], [y for _, y in server], marker="o", color="#1f77b4", linewidth=1.8,
                label="server held-out set")
    if client:
        ax.plot([x for x, _ in client], [y for _, y in client], marker="s", markersize=4, color="#2ca02c",
                linestyle="--", linewidth=1.4, label="hospitals' validation (weighted mean)")
    xs = [x for x, _ in server + client]
    ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    if max(xs) - min(xs) <= 20:
        ax.set_xticks(range(min(xs), max(xs) + 1))
    ys = [y for _, y in server + client]
    lo, hi = _fit(ys, min_span=0.05, lo_bound=0.0, hi_bound=1.0)
    ax.set_ylim(lo, hi)
    if lo < 0.5 < hi:  # chance, where the data comes near it
        ax.axhline(0.5, color="#999999", linestyle=":", linewidth=0.8)
        ax.annotate("chance", xy=(0.0, 0.5), xycoords=("axes fraction", "data"), xytext=(4, 2),
                    textcoords="offset points", ha="left", va="bottom", fontsize=MIN_FONT_PT, color="#777777")
    ax.set_xlabel("round")
    ax.set_ylabel("AUC")
    ax.set_title("Model AUC per round (axis fitted to the values)")
    ax.legend(fontsize=MIN_FONT_PT, loc="best", frameon=False)
    return _png(plt, fig)


def privacy_utility(report: "Report") -> bytes | None:
    server, client = _auc_rows(report)
    src, label = (server, "server held-out set") if server else (client, "hospitals' validation")
    eps = {r.round: r.max_epsilon for r in report.rounds if r.max_epsilon is not None}
    pts = [(eps[rnd], auc, rnd) for rnd, auc in src if rnd in eps]
    if len(pts) < MIN_POINTS:
        return None
    plt, fig, ax = _figure()
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="#8e44ad", linewidth=1.6)
    # Round labels: one per distinct point (rounds at the same ε and AUC share a label), the
    # label of the point's first round first, so that no two labels are drawn on each other.
    labels: dict[tuple[float, float], list[int]] = {}
    for x, y, rnd in pts:
        labels.setdefault((round(x, 6), round(y, 6)), []).append(rnd)
    for (x, y), rnds in labels.items():
        text = ("round " if rnds[0] == pts[0][2] else "") + ", ".join(map(str, rnds[:3])) + ("…" if len(rnds) > 3 else "")
        ax.annotate(text, xy=(x, y), xytext=(-6, 6), textcoords="offset points", fontsize=MIN_FONT_PT,
                    color="#444444", ha="right")
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    xlo, xhi = _fit(xs, pad=0.15, min_span=0.5, lo_bound=0.0)
    for x, text in REFERENCE_LINES:
        if xlo < x < xhi:
            ax.axvline(x, color="#aaaaaa", linestyle=":", linewidth=0.9, zorder=0)
            ax.annotate(text, xy=(x, 0.0), xycoords=("data", "axes fraction"), xytext=(-3, 4),
                        textcoords="offset points", fontsize=MIN_FONT_PT, color="#777777", ha="right", va="bottom")
    ax.set_xlim(xlo, xhi)
    ax.set_ylim(*_fit(ys, pad=0.2, min_span=0.05, lo_bound=0.0, hi_bound=1.0))
    ax.set_xlabel("largest ε spent in the federation (cumulative)")
    ax.set_ylabel(f"AUC ({label})")
    ax.set_title("Privacy–utility: AUC against ε (axes fitted to the values)")
    return _png(plt, fig)


PLOTS = (
    ("epsilon-per-round", "ε spent per round for each hospital, against its budget", epsilon_per_round),
    ("auc-per-round", "Global model AUC per round", auc_per_round),
    ("privacy-utility", "Privacy–utility curve: AUC against the largest ε in the federation", privacy_utility),
)


def render_all(report: "Report") -> dict[str, tuple[str, bytes]]:
    """``{name: (caption, png_bytes)}`` for every plot that has something to draw."""
    out = {}
    for name, caption, fn in PLOTS:
        png = fn(report)
        if png is not None:
            out[name] = (caption, png)
    png = audit_section.plot(report.empirical_checks)  # the Empirical check's, when an audit is present
    if png is not None:
        out[audit_section.PLOT_NAME] = (audit_section.PLOT_CAPTION, png)
    return out
