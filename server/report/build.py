"""Building a report: from a hospital's verified ledger, from a federation run's metrics, or both
(every ε with its second opinion, cross-checks between the two)."""

from __future__ import annotations

import math
import tomllib
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from xrayfed.common.errors import UserError
from xrayfed.common.privacy import accounting as A
from xrayfed.common.privacy.accounting import (
    rounds_that_fit,
    second_opinions,
    training_epsilon,
)
from xrayfed.common.privacy.ledger import (
    LEDGER_FILE,
    check_anchor,
    read_ledger,
    unpaid_releases,
)
from xrayfed.common.protocol.rounds import RESENT, SENT_AN_UPDATE
from xrayfed.common.security.atrest import is_encrypted, is_encrypted_line
from xrayfed.server.report import audit_section
from xrayfed.server.report.findings import hospital_findings, secure_mode_note
from xrayfed.server.report.schema import (
    LEDGER_RECOMPUTE_TOL,
    REPORTED_TOL,
    Accounting,
    Finding,
    HospitalReport,
    HospitalRound,
    LedgerInfo,
    Report,
    RoundSummary,
    RunSecurity,
    SecondOpinion,
    privacy_level,
)
from xrayfed.server.rundir import RunDir, read_metrics


# ============================================================================ helpers
def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _int(x: Any) -> int | None:
    v = _num(x)
    return int(round(v)) if v is not None else None


def _metrics_dict(d: Any) -> dict[str, float | None] | None:
    if not isinstance(d, dict):
        return None
    return {str(k): _num(v) for k, v in d.items() if isinstance(v, (int, float)) or v is None}


def _library() -> str:
    try:
        return f"dp-accounting {version('dp-accounting')}"
    except PackageNotFoundError:  # pragma: no cover
        return "dp-accounting"


def _generator() -> str:
    try:
        return f"xrayfed {version('xrayfed')}"
    except PackageNotFoundError:  # pragma: no cover
        return "xrayfed"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _opinion_model(op) -> SecondOpinion:
    return SecondOpinion(
        training_accountant=op.training_accountant, epsilon_training=op.epsilon,
        independent_method=op.independent_method, independent_library=_library(),
        epsilon_independent=op.independent_epsilon, epsilon_pld=op.pld_epsilon, epsilon_rdp=op.rdp_epsilon,
        tolerance=op.tolerance, agrees=op.agrees, reason=op.reason,
    )


def resolve_ledger(path: Path) -> Path:
    """A ledger file, or a hospital state folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / LEDGER_FILE
    if not path.is_file():
        raise UserError(f"--ledger {path}: no such ledger file (a hospital's {LEDGER_FILE} or its state folder)")
    return path


# ============================================================================ hospitals
class _Checks:
    """Collects the second-opinion checks of one report."""

    def __init__(self) -> None:
        self.n = 0
        self.bad = 0
        self.accountants: set[str] = set()

    def add(self, ops, accountant: str) -> None:
        self.accountants.add(accountant)
        for op in ops:
            self.n += 1
            self.bad += 0 if op.agrees else 1


def _fits(history, last, delta, budget, accountant, spent) -> int:
    if spent > budget:
        return 0
    return rounds_that_fit(history, last, delta, budget, accountant)


def hospital_from_ledger(path: Path, checks: _Checks, atrest_key=None, ledger_key_file=None) -> HospitalReport:
    """Per-hospital detail from a verified ledger (raises ``LedgerError`` naming a bad line, a
    chain that does not verify under the ledger key, or a ledger cut short of its head anchor).

    ``atrest_key`` decrypts an encrypted ledger (:mod:`xrayfed.common.security.atrest`);
    ``ledger_key_file``: the ledger's HMAC key when it is not beside the ledger."""
    records = read_ledger(path, atrest_key, key_file=ledger_key_file)
    if not records:
        raise UserError(f"{path}: the ledger is empty (no round recorded yet)")
    heads = [r for r in records if r.get("event") == "budget"]
    trains = [r for r in records if r.get("event") == "train"]
    head = heads[-1] if heads else {}
    last = trains[-1] if trains else {}

    def pick(key: str, default: Any = None) -> Any:
        for src in (head, last):
            if src.get(key) is not None:
                return src[key]
        for r in reversed(records):
            if r.get(key) is not None:
                return r[key]
        return default

    name = str(records[-1].get("hospital") or pick("hospital", path.parent.name))
    budget = _num(pick("epsilon_budget"))
    delta = _num(pick("delta"))
    if budget is None or delta is None:
        raise UserError(f"{path}: no budget line (epsilon_budget, delta); not a privacy ledger")
    accountant = str(pick("accountant", "prv"))
    history = []
    for r in trains:
        vals = [_num(r.get(k)) for k in ("noise_multiplier", "sample_rate", "steps", "epsilon")]
        if any(v is None for v in vals):
            raise UserError(f"{path}: line {int(r['seq']) + 1}: a 'train' line without noise_multiplier, sample_rate, "
                            "steps and epsilon; not a ledger this version of xrayfed can read")
        history.append((vals[0], vals[1], int(vals[2])))
    spent = training_epsilon(history, delta, accountant) if history else 0.0

    # Second opinion on every ε the ledger states: each train line, and ε spent now.
    k_of: list[int] = []
    k = 0
    for r in records:
        if r.get("event") == "train":
            k += 1
        k_of.append(k)
    stated = [(i, r) for i, r in enumerate(records)
              if r.get("event") in ("train", "refused", "resend", "retry") and _num(r.get("epsilon")) is not None]
    check_list = [(k_of[i], float(r["epsilon"]), float(r.get("delta", delta)),
                   str(r.get("accountant", accountant))) for i, r in stated]
    check_list.append((len(history), spent, delta, accountant, True))
    ops = second_opinions(history, check_list)
    checks.add(ops, accountant)
    final_op = ops[-1]
    op_of = {i: op for (i, _), op in zip(stated, ops[:-1])}

    rounds: list[HospitalRound] = []
    status_of = {"train": "trained", "refused": "refused", "resend": "resent", "retry": "retry"}
    for i, r in enumerate(records):
        ev = r.get("event")
        if ev not in status_of:
            continue
        op = op_of.get(i)
        rounds.append(HospitalRound(
            round=int(r.get("round", 0)), federation=r.get("federation"), status=status_of[ev], time=r.get("time"),
            epsilon=_num(r.get("epsilon")), epsilon_if_trained=_num(r.get("epsilon_if_trained")),
            epsilon_independent=op.independent_epsilon if op else None, epsilon_rdp=op.rdp_epsilon if op else None,
            agrees=op.agrees if op else None,
            noise_multiplier=_num(r.get("noise_multiplier")) if ev == "train" else None,
            sample_rate=_num(r.get("sample_rate")) if ev == "train" else None,
            steps=_int(r.get("steps")) if ev == "train" else None,
        ))

    max_rounds = _int(head.get("max_rounds"))
    more = None
    if history:
        more = _fits(history, history[-1], delta, budget, accountant, spent)
    h = HospitalReport(
        hospital=name, source="ledger", epsilon_budget=budget, delta=delta, epsilon_spent=spent,
        epsilon_left=max(0.0, budget - spent), rounds_trained=len(trains),
        rounds_refused=sum(1 for r in records if r.get("event") == "refused"),
        rounds_resent=sum(1 for r in records if r.get("event") == "resend"),
        updates_released=sum(1 for r in records if r.get("event") == "release"),
        releases_unpaid=len(unpaid_releases(records)),
        noise_multiplier=_num(last.get("noise_multiplier")), max_grad_norm=_num(pick("max_grad_norm")),
        sample_rate=_num(last.get("sample_rate")), steps_per_round=_int(last.get("steps")),
        total_steps=sum(n for _, _, n in history), accountant=accountant,
        secure_mode=bool(head.get("secure_mode", False)),
        secure_rng=bool(pick("secure_rng")) if pick("secure_rng") is not None else None,
        noise_source=head.get("noise_source"), num_examples=_int(pick("num_examples")),
        unit="patient" if pick("unit") == "patient" else "scan", num_scans=_int(pick("num_scans")),
        most_scans_of_one_patient=_int(head.get("most_scans_of_one_patient")),
        max_rounds_planned=max_rounds, rounds_more=more, privacy_level=privacy_level(spent),
        budget_level=privacy_level(budget), second_opinion=_opinion_model(final_op) if history else None,
        rounds=rounds,
        ledger=LedgerInfo(path=str(path), lines=len(records), head_hash=str(records[-1]["hash"])),
    )
    h._records = records
    # The ledger's own last ε (same δ and accountant) must equal the recomputation.
    if last and float(last.get("delta", -1)) == delta and last.get("accountant", accountant) == accountant:
        logged = float(last["epsilon"])
        if abs(logged - spent) > LEDGER_RECOMPUTE_TOL * max(1.0, spent):
            h._ledger_mismatch = (logged, spent)
    return h


def _hospital_from_metrics(name: str, entries: list[tuple[int, dict[str, Any]]], checks: _Checks) -> HospitalReport:
    """Per-hospital figures from the server's metrics only (what the hospital reported)."""
    def latest(key: str, default: Any = None) -> Any:
        for _, r in reversed(entries):
            if r.get(key) is not None and (not isinstance(r.get(key), str) or r.get(key)):
                return r[key]
        return default

    budget = _num(latest("epsilon_budget"))
    delta = _num(latest("delta"))
    if budget is None or delta is None:
        raise UserError(f"metrics.jsonl: hospital {name} never reported its budget (epsilon_budget, delta)")
    accountant = str(latest("accountant", "prv") or "prv")
    # A round's update was trained and charged once whether it arrived in the round's first
    # attempt ("trained") or was resent after a restart ("resent": the attempt that carried the
    # charge never reached metrics.jsonl), so both count as a round trained, and both spend.
    spend = [(rnd, r) for rnd, r in entries if r.get("status") in SENT_AN_UPDATE
             and all(_num(r.get(k)) is not None for k in ("noise_multiplier", "sample_rate", "steps"))]
    history = [(float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"])) for _, r in spend]
    recomputed = training_epsilon(history, delta, accountant) if history else 0.0
    reported = [_num(r.get("epsilon")) for _, r in entries if _num(r.get("epsilon")) is not None]
    last_reported = reported[-1] if reported else 0.0
    # Conservative: the larger of what the hospital reported and what this run's rounds account for.
    spent = max(last_reported or 0.0, recomputed)

    rounds: list[HospitalRound] = []
    check_list = []
    check_at = []
    for rnd, r in entries:
        k = sum(1 for s, _ in spend if s <= rnd)
        eps = _num(r.get("epsilon"))
        st = r.get("status") if r.get("status") in ("trained", "refused", "resent", "failed") else "failed"
        is_spend = st in ("trained", "resent")
        rounds.append(HospitalRound(
            round=rnd, federation=r.get("_federation"), status=st, epsilon=eps, epsilon_reported=eps,
            noise_multiplier=_num(r.get("noise_multiplier")) if is_spend else None,
            sample_rate=_num(r.get("sample_rate")) if is_spend else None,
            steps=_int(r.get("steps")) if is_spend else None,
        ))
        if eps is not None:
            check_list.append((k, eps, _num(r.get("delta")) or delta, str(r.get("accountant") or accountant)))
            check_at.append(len(rounds) - 1)
    final_op = None
    if history or check_list:
        # The checkable figure is what this run's rounds account for; more than that reported is
        # budget spent where the server saw no update (a round the hospital was charged for and
        # then failed, or an earlier run): history_incomplete, not a disagreement of accountants.
        check_list.append((len(history), recomputed, delta, accountant, True))
        ops = second_opinions(history, check_list)
        checked = [ops[-1]]
        for j, op in zip(check_at, ops[:-1]):
            rounds[j].epsilon_independent = op.independent_epsilon
            rounds[j].epsilon_rdp = op.rdp_epsilon
            eps = rounds[j].epsilon
            if not op.agrees and eps is not None and eps > op.independent_epsilon:
                continue  # over what the rounds seen here account for: not checkable from metrics
            rounds[j].agrees = op.agrees
            checked.append(op)
        checks.add(checked, accountant)
        final_op = ops[-1]
    last_spend = spend[-1][1] if spend else {}
    complete = final_op is not None and final_op.agrees and abs(last_reported - recomputed) <= final_op.tolerance
    more = None
    if history and budget is not None and complete:
        more = _fits(history, history[-1], delta, budget, accountant, spent)
    h = HospitalReport(
        hospital=name, source="metrics", epsilon_budget=budget, delta=delta, epsilon_spent=spent,
        epsilon_left=max(0.0, budget - spent), rounds_trained=sum(1 for _, r in entries if r.get("status") in SENT_AN_UPDATE),
        rounds_refused=sum(1 for _, r in entries if r.get("status") == "refused"),
        rounds_resent=sum(1 for _, r in entries if r.get("status") == RESENT),
        rounds_failed=sum(1 for _, r in entries if r.get("status") == "failed"),
        noise_multiplier=_num(last_spend.get("noise_multiplier")), max_grad_norm=_num(latest("max_grad_norm")),
        sample_rate=_num(last_spend.get("sample_rate")), steps_per_round=_int(last_spend.get("steps")),
        total_steps=sum(n for _, _, n in history), accountant=accountant, secure_mode=bool(latest("secure_mode", False)),
        secure_rng=bool(latest("secure_rng")) if latest("secure_rng") is not None else None,
        num_examples=_int(latest("num_examples")), rounds_more=more, privacy_level=privacy_level(spent),
        unit="patient" if latest("patient_unit") else "scan", num_scans=_int(latest("num_scans")),
        budget_level=privacy_level(budget), second_opinion=_opinion_model(final_op) if final_op else None,
        rounds=rounds,
    )
    h._recomputed = recomputed
    h._last_reported = last_reported
    return h


# ============================================================================ builders
def _accounting(checks: _Checks) -> Accounting:
    return Accounting(
        training_accountants=sorted(checks.accountants), independent_library=_library(),
        pld_discretization=A.PLD_DISCRETIZATION, tolerance_abs=A.TOL_ABS, tolerance_rel=A.TOL_REL,
        tolerance_rule=A.TOLERANCE_TEXT, checks=checks.n, disagreements=checks.bad,
    )


def _finish(report: Report) -> Report:
    if report.hospitals:
        top = max(report.hospitals, key=lambda h: h.epsilon_spent)
        report.epsilon_max, report.epsilon_max_hospital = top.epsilon_spent, top.hospital
    order = {"critical": 0, "warning": 1, "info": 2}
    report.findings.sort(key=lambda f: (order[f.level], f.hospital or "", f.round or 0))
    return report


def _attach_audits(report: Report, folders: list[Path]) -> None:
    """The Empirical check: audit results found in ``folders`` (:mod:`~.audit_section`)."""
    report.empirical_checks, problems = audit_section.find_audits(folders)
    report.findings += [Finding(level="warning", code="audit_unreadable", message=m) for m in problems]
    report.findings += [Finding(level="critical", code="audit_exceeds_claim", hospital=h, message=m)
                        for h, m in audit_section.exceeded(report.empirical_checks)]


def build_hospital_report(ledger_path: Path | str | list[Path], atrest_key=None, ledger_key_file=None) -> Report:
    """Report of one hospital's own ledger (or several ledgers side by side)."""
    paths = [resolve_ledger(Path(p)) for p in (ledger_path if isinstance(ledger_path, list) else [ledger_path])]
    checks = _Checks()
    hospitals: list[HospitalReport] = []
    for p in dict.fromkeys(paths):
        h = hospital_from_ledger(p, checks, atrest_key, ledger_key_file)
        _one_ledger_per_hospital(h, hospitals)
        hospitals.append(h)
    findings = [f for h in hospitals for f in hospital_findings(h)]
    secure_mode_note(hospitals, findings)
    names = ", ".join(h.hospital for h in hospitals)
    feds = sorted({r.federation for h in hospitals for r in h.rounds if r.federation})
    findings.extend(resent_findings(hospitals))
    report = Report(
        kind="hospital", title=f"Privacy-budget report — hospital {names}", generated_at=_now(),
        generator=_generator(), federation=", ".join(feds) or None, sources=[str(p) for p in paths],
        rounds_total=max((h.rounds_trained for h in hospitals), default=0),
        hospitals=hospitals, findings=findings, accounting=_accounting(checks),
        security=ledger_security(paths), released_without_dp=released_without_dp(None),
    )
    _attach_audits(report, [p.parent for p in paths])
    return _finish(report)


def _one_ledger_per_hospital(h: HospitalReport, hospitals: list[HospitalReport]) -> None:
    for other in hospitals:
        if other.hospital == h.hospital:
            raise UserError(f"two ledgers for hospital {h.hospital}: {other.ledger.path if other.ledger else '?'} and "
                            f"{h.ledger.path if h.ledger else '?'}; give one ledger per hospital")


def _federation_name(run_dir: Path, rows: list[dict[str, Any]]) -> str | None:
    p = RunDir(run_dir).config_path
    if p.is_file():
        try:
            return str(tomllib.loads(p.read_text(encoding="utf-8"))["federation"]["name"])
        except (tomllib.TOMLDecodeError, KeyError, TypeError):
            pass
    return next((str(r["federation"]) for r in rows if r.get("federation")), None)


def build_federation_report(run_dir: Path | str, extra_ledgers: list[Path] | None = None,
                            atrest_key=None, ledger_key_file=None) -> Report:
    """Report of a whole federation run: metrics.jsonl plus any hospital ledgers found."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise UserError(f"{run_dir}: a file, not a run directory (for a hospital's ledger use --ledger FILE)")
    mpath = run_dir / "metrics.jsonl"
    if not mpath.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (not a federation run directory, or no round finished yet)")
    rows = read_metrics(mpath)
    fed = _federation_name(run_dir, rows)
    checks = _Checks()
    findings: list[Finding] = []

    # Every hospital's replies, by name (a failed reply names only the node: map it back).
    node_name: dict[int, str] = {}
    for row in rows:
        for h in row.get("hospitals") or []:
            if h.get("status") != "failed" and h.get("hospital") and h.get("node_id") is not None:
                node_name[int(h["node_id"])] = str(h["hospital"])
    per: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for row in rows:
        for h in row.get("hospitals") or []:
            name = str(h.get("hospital") or "")
            if h.get("status") == "failed" and h.get("node_id") is not None:
                name = node_name.get(int(h["node_id"]), name or f"node-{h['node_id']}")
            per.setdefault(name, []).append((int(row["round"]), dict(h, _federation=fed)))

    ledgers: dict[Path, Path] = {}  # resolved → as given
    hdir = run_dir / "hospitals"
    if hdir.is_dir():
        for p in sorted(hdir.glob(f"*/{LEDGER_FILE}")):
            ledgers.setdefault(p.resolve(), p)
    for p in extra_ledgers or []:
        p = resolve_ledger(p)
        ledgers.setdefault(p.resolve(), p)

    hospitals: list[HospitalReport] = []
    seen: set[str] = set()
    for path in ledgers.values():
        h = hospital_from_ledger(path, checks, atrest_key, ledger_key_file)
        _one_ledger_per_hospital(h, hospitals)
        entries = per.get(h.hospital, [])
        if entries:
            h.source = "ledger+metrics"
            _attach_reported(h, entries, fed, findings)
            h.rounds_failed = sum(1 for _, r in entries if r.get("status") == "failed")
        hospitals.append(h)
        seen.add(h.hospital)
    for name, entries in per.items():
        if name in seen:
            continue
        if not any(_num(r.get("epsilon_budget")) is not None for _, r in entries):
            findings.append(Finding(level="warning", code="hospital_failed", hospital=name,
                                    message=f"{name} failed in round(s) {', '.join(str(r) for r, _ in entries)} "
                                            "and never reported a budget"))
            continue
        hospitals.append(_hospital_from_metrics(name, entries, checks))
    hospitals.sort(key=lambda h: h.hospital)
    for h in hospitals:
        findings.extend(hospital_findings(h))
        if h.rounds_failed:
            findings.append(Finding(level="warning", code="hospital_failed", hospital=h.hospital,
                                    message=f"{h.hospital} failed in {h.rounds_failed} round(s)"))
    secure_mode_note(hospitals, findings)
    findings.extend(server_findings(rows))

    rounds = _round_summaries(rows, node_name, findings)
    findings.extend(round_resent_findings(rounds))
    final = next((r for r in reversed(rounds) if r.eval), None)
    if not any(r.eval for r in rounds):
        findings.append(Finding(level="info", code="no_server_eval",
                                message="no server-side evaluation in metrics.jsonl (set [eval] path in "
                                        "federation.toml); AUC plots use the hospitals' validation AUC if any"))
    report = Report(
        kind="federation", title=f"Privacy-budget report — federation {fed or run_dir.name}", generated_at=_now(),
        generator=_generator(), federation=fed,
        run_id=next((str(r["run_id"]) for r in reversed(rows) if r.get("run_id")), None),
        sources=[str(mpath)] + [str(p) for p in ledgers.values()], rounds_total=len(rows),
        final_round=final.round if final else None, final_eval=final.eval if final else None,
        hospitals=hospitals, rounds=rounds, findings=findings, accounting=_accounting(checks),
        security=run_security(run_dir, rows), released_without_dp=released_without_dp(rounds),
    )
    _attach_audits(report, [run_dir, *(p.parent for p in ledgers.values())])
    return _finish(report)


# ============================================================================ the plain-words header
_SECURITY_KEYS = ("tls", "hospital_auth", "secure_aggregation", "encrypted_at_rest")


def run_security(run_dir: Path, rows: list[dict[str, Any]]) -> RunSecurity | None:
    """What protected the run: as the server recorded it with each round (a setting that differed
    between rounds, e.g. after a restart with another configuration, is shown at its weakest and
    named in ``mixed``); for a run that did not record it, from ``federation.toml`` and whether
    its checkpoints are encrypted."""
    recorded = [r["security"] for r in rows if isinstance(r.get("security"), dict)]
    if recorded:
        out: dict[str, Any] = {}
        mixed = []
        for k in _SECURITY_KEYS:
            vals = {bool(x[k]) for x in recorded if x.get(k) is not None}
            out[k] = min(vals) if vals else None
            if len(vals) > 1:
                mixed.append(k)
        transports = {x.get("transport") for x in recorded}
        transport = "simulation" if transports == {"simulation"} else "grpc" if "grpc" in transports else None
        return RunSecurity(transport=transport, source="metrics", mixed=mixed, rounds_recorded=len(recorded), **out)
    cfg_path = RunDir(run_dir).config_path
    if not cfg_path.is_file():
        return None
    try:
        cfg = tomllib.loads(cfg_path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None
    net = cfg.get("network") if isinstance(cfg.get("network"), dict) else {}
    tls_cfg = net.get("tls") if isinstance(net.get("tls"), dict) else {}
    tls = not bool(tls_cfg.get("insecure", False))
    fed = cfg.get("federation") if isinstance(cfg.get("federation"), dict) else {}
    ckpts = sorted(RunDir(run_dir).checkpoints.glob("round-*.pt"))
    at_rest = None
    if ckpts:
        at_rest = all(is_encrypted(c.open("rb").read(16)) for c in ckpts)
    return RunSecurity(tls=tls, hospital_auth=tls and net.get("supernode_auth") is not False,
                       secure_aggregation=bool(fed.get("secure_aggregation", False)), encrypted_at_rest=at_rest,
                       source="config")


def ledger_security(paths: list[Path]) -> RunSecurity:
    """What a hospital's ledger shows of the run's protection: whether it is encrypted at rest
    (TLS, hospital authentication and SecAgg+ are the server's settings, not in the ledger)."""
    enc = []
    for p in paths:
        with Path(p).open("r", encoding="utf-8", errors="replace") as f:
            enc.append(is_encrypted_line(f.readline()))
    return RunSecurity(encrypted_at_rest=all(enc) if enc else None, source="ledger")


def released_without_dp(rounds: list[RoundSummary] | None) -> list[str]:
    """What leaves a hospital in the clear, outside the DP guarantee (ε covers the model updates
    only). ``rounds``: a federation's rounds (says whether validation metrics were released)."""
    out = ["with every round: the hospital's training loss, its training-set size (patients or scans) and its "
           "privacy figures (ε, δ, σ, q, steps), in the clear to the server"]
    if rounds is None:
        out.append("validation metrics (AUC, accuracy on the hospital's own validation split) whenever the server "
                   "asks the hospitals to evaluate (a federation without its own held-out set)")
    else:
        asked = [r.round for r in rounds if r.client_eval]
        out.append("validation metrics (AUC, accuracy on each hospital's own validation split): "
                   + (f"released in {len(asked)} round(s) of this run" if asked
                      else "not asked for in this run (the server evaluated on its own held-out set)"))
    return out


def resent_findings(hospitals: list[HospitalReport]) -> list[Finding]:
    """A hospital report: each round whose update was sent again after a restart (charged once)."""
    out = []
    for h in hospitals:
        for r in h.rounds:
            if r.status == "resent":
                out.append(Finding(level="info", code="update_resent", hospital=h.hospital, round=r.round,
                                   message=f"round {r.round}: the update already trained and charged for this round "
                                           "was sent again after a restart (no new privacy charge); it counts once "
                                           "among the rounds trained"))
    return out


def round_resent_findings(rounds: list[RoundSummary]) -> list[Finding]:
    """A federation report: each round in which hospitals resent an update after a restart."""
    return [Finding(level="info", code="update_resent", round=r.round,
                    message=f"round {r.round}: {', '.join(r.resent)} resent the update already trained and charged for this "
                            "round (the round was interrupted and run again after a restart); charged once, counted "
                            "once among the rounds trained")
            for r in rounds if r.resent]


def server_findings(rows: list[dict[str, Any]]) -> list[Finding]:
    """What the server itself detected in a round and recorded in metrics.jsonl: a ledger head
    behind the hospital's anchor (``ledger_rollback``), a reply naming another hospital than the
    one its key is registered as (``claimed_hospital``)."""
    out = []
    for row in rows:
        rnd = row.get("round")
        for h in row.get("hospitals") or []:
            if h.get("ledger_rollback"):
                out.append(Finding(level="critical", code="ledger_rolled_back", hospital=str(h.get("hospital")),
                                   round=rnd, message=f"round {rnd}: {h['ledger_rollback']}"))
            if h.get("claimed_hospital"):
                out.append(Finding(level="critical", code="reply_names_another_hospital",
                                   hospital=str(h.get("hospital")), round=rnd,
                                   message=f"round {rnd}: a reply from {h.get('hospital')}'s key named hospital "
                                           f"\"{h['claimed_hospital']}\"; it was rejected"))
    return out


def _attach_reported(h: HospitalReport, entries: list[tuple[int, dict[str, Any]]], fed: str | None,
                     findings: list[Finding]) -> None:
    """Cross-check the ε a hospital reported to the server with its own ledger, round by round,
    and that the ledger still holds every head the server recorded (truncation, rollback)."""
    want = {"trained": "trained", "resent": "trained", "refused": "refused"}
    for rnd, row in entries:
        if row.get("claimed_hospital"):
            continue  # another key's reply: nothing in it is this hospital's
        if row.get("ledger_head") and row.get("ledger_seq") is not None and h._records:
            problem = check_anchor(h._records, int(row["ledger_seq"]), str(row["ledger_head"]))
            if problem:
                findings.append(Finding(level="critical", code="ledger_rolled_back", hospital=h.hospital, round=rnd,
                                        message=f"round {rnd}: the server recorded the hospital's ledger head, but "
                                                f"{problem}"))
        eps = _num(row.get("epsilon"))
        st = row.get("status")
        if eps is None or st not in want:
            continue
        match = [r for r in h.rounds if r.round == rnd and r.status == want[st]
                 and (fed is None or r.federation in (None, fed))]
        if not match:
            findings.append(Finding(level="warning", code="reported_not_in_ledger", hospital=h.hospital, round=rnd,
                                    message=f"round {rnd}: the server recorded '{st}' with ε = {eps:.4f} but the "
                                            "hospital's ledger has no such line"))
            continue
        m = match[-1]
        m.epsilon_reported = eps
        if m.epsilon is not None and abs(eps - m.epsilon) > REPORTED_TOL * max(1.0, m.epsilon):
            low = eps < m.epsilon
            findings.append(Finding(
                level="critical" if low else "warning", code="reported_epsilon_mismatch", hospital=h.hospital,
                round=rnd, message=f"round {rnd}: reported ε = {eps:.4f} to the server but the ledger says "
                                   f"{m.epsilon:.4f}" + (" (under-reported)" if low else "")))


def _round_summaries(rows: list[dict[str, Any]], node_name: dict[int, str],
                     findings: list[Finding]) -> list[RoundSummary]:
    out = []
    latest: dict[str, float] = {}
    for row in rows:
        hs = row.get("hospitals") or []

        def names(status: str) -> list[str]:
            res = []
            for h in hs:
                if h.get("status") == status:
                    n = str(h.get("hospital") or "")
                    if status == "failed" and h.get("node_id") is not None:
                        n = node_name.get(int(h["node_id"]), n)
                    res.append(n)
            return sorted(res)

        eps = {str(h.get("hospital")): _num(h.get("epsilon")) for h in hs if h.get("status") != "failed"}
        for n, e in eps.items():
            if e is not None:
                latest[n] = e
        top = max(latest.values()) if latest else None
        participants = row.get("participants")
        if not isinstance(participants, list):
            participants = names("trained") + names("resent")
        server_max = _num(row.get("max_epsilon"))
        this_round = [e for e in eps.values() if e is not None]
        if server_max is not None and this_round and abs(server_max - max(this_round)) > 1e-9:
            findings.append(Finding(level="warning", code="metrics_inconsistent", round=int(row["round"]),
                                    message=f"round {row['round']}: max_epsilon = {server_max:.4f} in metrics.jsonl "
                                            f"but the hospitals' rows give {max(this_round):.4f}"))
        if hs and not participants:
            findings.append(Finding(level="info", code="round_without_update", round=int(row["round"]),
                                    message=f"round {row['round']}: no hospital trained (all refused or failed); "
                                            "the global model did not change"))
        out.append(RoundSummary(
            round=int(row["round"]), time=row.get("time"), duration_s=_num(row.get("duration_s")),
            participants=[str(p) for p in participants], trained=names("trained"), resent=names("resent"),
            refused=names("refused"), failed=names("failed"), epsilon=eps, max_epsilon=top,
            max_epsilon_hospitals=sorted(n for n, e in latest.items() if top is not None and e == top),
            max_epsilon_server=server_max, eval=_metrics_dict(row.get("eval")),
            client_eval=_metrics_dict(row.get("client_eval")),
            timing={k: v for k, v in row["timing"].items() if isinstance(v, (int, float, str))}
            if isinstance(row.get("timing"), dict) else None,
        ))
    return out


