"""The warnings a privacy officer expects, per hospital and for the federation."""

from __future__ import annotations

from xrayfed.server.report.schema import Finding, HospitalReport


def hospital_findings(h: HospitalReport) -> list[Finding]:
    """The warnings a privacy officer expects for one hospital."""
    out: list[Finding] = []

    def add(level, code, message, rnd=None):
        out.append(Finding(level=level, code=code, hospital=h.hospital, round=rnd, message=message))

    if h.epsilon_spent > h.epsilon_budget + 1e-12:
        add("critical", "over_budget", f"ε spent {h.epsilon_spent:.3f} exceeds the budget ε = {h.epsilon_budget:g}")
    if h.num_examples and h.delta >= 1.0 / h.num_examples:
        add("critical", "delta_ge_1_over_n",
            f"δ = {h.delta:g} ≥ 1/N = {1.0 / h.num_examples:.3g} for N = {h.num_examples} training images: "
            "a mechanism could release one person's images outright with probability δ; choose δ ≪ 1/N")
    if h.rounds_more == 0:
        add("warning", "budget_exhausted",
            f"budget exhausted: ε spent {h.epsilon_spent:.3f} of {h.epsilon_budget:g}; another round at the current "
            f"settings would exceed it" + (f" ({h.rounds_refused} round(s) refused)" if h.rounds_refused else ""))
    elif h.rounds_refused:
        add("info", "rounds_refused", f"{h.rounds_refused} round(s) were refused for lack of budget")
    if h.privacy_level == "weak":
        add("warning", "epsilon_weak", f"ε spent {h.epsilon_spent:.3f} > 10: a weak guarantee")
    elif h.privacy_level == "reasonable":
        add("warning", "epsilon_above_common",
            f"ε spent {h.epsilon_spent:.3f} > 8: above the range of published DP image models")
    if h.budget_level in ("weak", "reasonable") and h.budget_level != h.privacy_level:
        add("info", "budget_above_common", f"the budget ε = {h.epsilon_budget:g} allows "
            f"{'a weak guarantee (ε > 10)' if h.budget_level == 'weak' else 'ε above 8'}")
    if h.unit == "scan":
        k = h.most_scans_of_one_patient
        add("warning", "privacy_unit_scan",
            "the guarantee protects each scan, not each patient: a patient with k scans is protected only at about "
            "k × ε (group privacy)" + (f"; this hospital's most-scanned patient has {k} scans (about "
                                       f"ε = {k * h.epsilon_spent:.3g} for them)" if k and k > 1 else "")
            + "; train at the patient unit ([privacy] unit = \"patient\") where the data knows its patients")
    if h.secure_rng is False:
        add("warning", "secure_rng_off",
            "DP noise is drawn from torch's generator (not cryptographically secure): set privacy.secure_rng = true")
    for r in h.rounds:
        if r.agrees is False:
            add("critical", "accountant_disagreement",
                f"round {r.round} ({r.status}): ε = {r.epsilon:.4f} but the independent accountant gives "
                f"{r.epsilon_independent:.4f}; beyond the stated tolerance", r.round)
    so = h.second_opinion
    if so is not None and not so.agrees:
        add("critical", "accountant_disagreement", f"ε spent: {so.reason}")
    if h.releases_unpaid:
        add("critical", "release_without_charge",
            f"{h.releases_unpaid} of {h.updates_released} released update(s) are not paid for by their own "
            "privacy charge: ε is under-counted")
    mm = h._ledger_mismatch
    if mm:
        add("critical", "ledger_inconsistent",
            f"the ledger's last ε = {mm[0]:.6f} differs from ε = {mm[1]:.6f} recomputed from its own rounds")
    if h.source == "metrics" and h.rounds_trained + h.rounds_resent:
        rec, rep = h._recomputed, h._last_reported
        if rec is not None and rep is not None and so is not None:
            if rep < rec - so.tolerance:
                add("critical", "epsilon_underreported",
                    f"reported ε = {rep:.4f} but this run's rounds alone account for ε = {rec:.4f}; "
                    "the report uses the larger value")
            elif rep > rec + so.tolerance:
                failed = [str(r.round) for r in h.rounds if r.status == "failed"]
                add("info", "history_incomplete",
                    f"reported ε = {rep:.4f} exceeds ε = {rec:.4f} from the updates the server received in this run: "
                    "the hospital was charged where no update reached the server ("
                    + (f"round {', '.join(failed)}, which it failed, or " if failed else "")
                    + "an earlier run); its ledger (xrayfed report --ledger) has the full history")
    return out



def secure_mode_note(hospitals: list[HospitalReport], findings: list[Finding]) -> None:
    off = [h.hospital for h in hospitals if not h.secure_mode]
    if off:
        findings.append(Finding(
            level="info", code="secure_mode_off",
            message="Opacus secure_mode is off for " + ", ".join(off) + " (xrayfed never uses it: it needs "
                    "torchcsprng). With secure_rng on, xrayfed draws the DP noise from a CSPRNG itself; the Poisson "
                    "batch sampler uses torch's generator, seeded from os.urandom"))


