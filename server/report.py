"""``xrayfed report``: how much privacy budget was spent, what is left, what it bought.

Two kinds of report, each written as Markdown, a self-contained HTML page (plots embedded as
base64 PNG) and JSON (schema: :class:`Report`, ``xrayfed report --schema``):

* **federation** — ``xrayfed report RUN_DIR`` (the operator): every hospital's ε per round as
  reported to the server (``RUN_DIR/metrics.jsonl``), which hospitals trained in each round,
  the largest ε in the federation, the model's AUC per round and the privacy–utility curve.
  Hospital ledgers found under ``RUN_DIR/hospitals/NAME/privacy-ledger.jsonl`` (demo runs) or
  given with ``--ledger`` are verified and used for the per-hospital detail.
* **hospital** — ``xrayfed report --ledger LEDGER`` (a hospital, its own ledger only).

Every ε gets a second opinion from an accountant independent of training (Google's
dp-accounting; tolerance in :mod:`xrayfed.common.accounting`). A ledger whose hash chain is
broken is refused, naming the line. Reports carry aggregate numbers only, never patient data.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from xrayfed.common.errors import UserError

SCHEMA_VERSION = "1"
LEDGER_FILE = "privacy-ledger.jsonl"
FORMATS = ("md", "html", "json")
# |logged ε − recomputed ε| above this (relative to max(1, ε)) means the ledger contradicts itself.
LEDGER_RECOMPUTE_TOL = 1e-6
# |ε reported to the server − ε in the hospital's ledger| above this is a mismatch.
REPORTED_TOL = 1e-6

Level = Literal["strong", "common", "reasonable", "weak"]


# ============================================================================ schema
class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReferencePoint(_M):
    """One reference point for ε: ``level`` applies when ε ≤ ``max_epsilon`` (None: above all)."""

    level: Level
    max_epsilon: float | None
    meaning: str


REFERENCE_POINTS: list[ReferencePoint] = [
    ReferencePoint(level="strong", max_epsilon=1.0,
                   meaning="ε ≤ 1: a strong formal guarantee (tier 1 of Ponomareva et al., "
                           "'How to DP-fy ML', JAIR 2023)"),
    ReferencePoint(level="common", max_epsilon=8.0,
                   meaning="1 < ε ≤ 8: the range of published differentially private image classifiers "
                           "(e.g. De et al. 2022 report CIFAR-10 and ImageNet models at ε = 1 to 8)"),
    ReferencePoint(level="reasonable", max_epsilon=10.0,
                   meaning="8 < ε ≤ 10: still 'reasonable' (tier 2 of Ponomareva et al.) but above "
                           "the usual published range"),
    ReferencePoint(level="weak", max_epsilon=None,
                   meaning="ε > 10: a weak guarantee (tier 3 of Ponomareva et al.); little formal protection"),
]


def privacy_level(epsilon: float) -> Level:
    """The reference point an ε falls under (see :data:`REFERENCE_POINTS`)."""
    for rp in REFERENCE_POINTS:
        if rp.max_epsilon is None or epsilon <= rp.max_epsilon:
            return rp.level
    return "weak"  # pragma: no cover


class Finding(_M):
    """A warning for the privacy officer. ``critical``: the guarantee or the numbers cannot be
    trusted as stated; ``warning``: needs attention; ``info``: worth knowing."""

    level: Literal["critical", "warning", "info"]
    code: str = Field(description="stable identifier, e.g. delta_ge_1_over_n, budget_exhausted")
    hospital: str | None = None
    round: int | None = None
    message: str


class SecondOpinion(_M):
    """ε recomputed by an accountant independent of the one used for training."""

    training_accountant: str = Field(description="prv | rdp (Opacus)")
    epsilon_training: float = Field(description="the ε being checked (training accountant)")
    independent_method: Literal["pld", "rdp"] = Field(description="like-for-like independent accountant")
    independent_library: str = Field(description="e.g. dp-accounting 0.4.4")
    epsilon_independent: float
    epsilon_pld: float = Field(description="dp-accounting PLD (near-tight)")
    epsilon_rdp: float = Field(description="dp-accounting RDP (upper bound, looser)")
    tolerance: float
    agrees: bool
    reason: str = ""


class HospitalRound(_M):
    """One line of a hospital's history: a round trained, refused, resent or retried."""

    round: int
    federation: str | None = None
    status: Literal["trained", "refused", "resent", "retry", "failed"]
    time: str | None = None
    epsilon: float | None = Field(None, description="cumulative ε after this round (training accountant)")
    epsilon_if_trained: float | None = Field(None, description="refused rounds: ε had it trained")
    epsilon_reported: float | None = Field(None, description="ε the hospital reported to the server this round")
    epsilon_independent: float | None = None
    epsilon_rdp: float | None = Field(None, description="dp-accounting RDP (only for RDP-trained hospitals)")
    agrees: bool | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None


class LedgerInfo(_M):
    path: str
    lines: int
    head_hash: str = Field(description="hash of the last line (commits to the whole verified chain)")
    verified: bool = True


class HospitalReport(_M):
    hospital: str
    source: Literal["ledger", "metrics", "ledger+metrics"]
    epsilon_budget: float
    delta: float
    epsilon_spent: float = Field(description="cumulative ε at δ over every round trained (training accountant)")
    epsilon_left: float = Field(description="max(0, budget − spent)")
    rounds_trained: int
    rounds_refused: int
    rounds_resent: int = 0
    rounds_failed: int = 0
    updates_released: int = Field(0, description="updates that left the hospital (ledger 'release' lines); each "
                                                  "must be paid for by its own 'train' charge")
    releases_unpaid: int = Field(0, description="releases without their own charge (must be 0)")
    noise_multiplier: float | None = Field(None, description="σ of the last round trained")
    max_grad_norm: float | None = Field(None, description="clip norm C")
    sample_rate: float | None = Field(None, description="Poisson sample rate q of the last round")
    steps_per_round: int | None = None
    total_steps: int = 0
    accountant: str
    secure_mode: bool = Field(description="Opacus secure_mode (xrayfed never enables it)")
    secure_rng: bool | None = Field(None, description="DP noise from a CSPRNG")
    noise_source: str | None = None
    num_examples: int | None = Field(None, description="N, training examples at the hospital")
    max_rounds_planned: int | None = None
    rounds_more: int | None = Field(None, description="more rounds that fit the budget at the last round's settings")
    privacy_level: Level = Field(description="reference point of ε spent")
    budget_level: Level = Field(description="reference point of the ε budget")
    second_opinion: SecondOpinion | None = None
    rounds: list[HospitalRound] = Field(default_factory=list)
    ledger: LedgerInfo | None = None
    # Cross-checks kept for the findings (not part of the JSON).
    _ledger_mismatch: tuple[float, float] | None = PrivateAttr(None)
    _recomputed: float | None = PrivateAttr(None)
    _last_reported: float | None = PrivateAttr(None)
    _records: list = PrivateAttr(default_factory=list)


class RoundSummary(_M):
    """One federation round (from metrics.jsonl)."""

    round: int
    time: str | None = None
    duration_s: float | None = None
    participants: list[str] = Field(description="hospitals whose update was aggregated (trained or resent)")
    trained: list[str]
    resent: list[str] = Field(default_factory=list)
    refused: list[str] = Field(default_factory=list)
    failed: list[str] = Field(default_factory=list)
    epsilon: dict[str, float | None] = Field(description="ε each replying hospital reported this round")
    max_epsilon: float | None = Field(None, description="largest cumulative ε of any hospital after this round")
    max_epsilon_hospitals: list[str] = Field(default_factory=list)
    max_epsilon_server: float | None = Field(None, description="max_epsilon as written by the server")
    eval: dict[str, float | None] | None = None
    client_eval: dict[str, float | None] | None = None


class Accounting(_M):
    training_accountants: list[str]
    independent_library: str
    pld_discretization: float
    tolerance_abs: float
    tolerance_rel: float
    tolerance_rule: str
    checks: int = Field(description="ε values given a second opinion")
    disagreements: int


class PlotRef(_M):
    name: str
    file: str = Field(description="PNG written beside the report (none when only JSON is written)")
    caption: str


class Report(_M):
    """A privacy-budget report (JSON schema version ``schema_version``)."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    kind: Literal["federation", "hospital"]
    title: str
    generated_at: str
    generator: str
    federation: str | None = None
    run_id: str | None = None
    sources: list[str]
    rounds_total: int = 0
    epsilon_max: float | None = Field(None, description="largest ε spent by any hospital")
    epsilon_max_hospital: str | None = None
    final_round: int | None = None
    final_eval: dict[str, float | None] | None = None
    hospitals: list[HospitalReport]
    rounds: list[RoundSummary] = Field(default_factory=list)
    findings: list[Finding] = Field(default_factory=list)
    reference_points: list[ReferencePoint] = Field(default_factory=lambda: list(REFERENCE_POINTS))
    accounting: Accounting
    plots: list[PlotRef] = Field(default_factory=list)

    def count(self, level: str) -> int:
        return sum(1 for f in self.findings if f.level == level)


def json_schema() -> dict[str, Any]:
    return Report.model_json_schema()


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
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"dp-accounting {version('dp-accounting')}"
    except PackageNotFoundError:  # pragma: no cover
        return "dp-accounting"


def _generator() -> str:
    from importlib.metadata import PackageNotFoundError, version

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
    from xrayfed.common.accounting import rounds_that_fit

    if spent > budget:
        return 0
    return rounds_that_fit(history, last, delta, budget, accountant)


def hospital_from_ledger(path: Path, checks: _Checks, atrest_key=None, ledger_key_file=None) -> HospitalReport:
    """Per-hospital detail from a verified ledger (raises ``LedgerError`` naming a bad line, a
    chain that does not verify under the ledger key, or a ledger cut short of its head anchor).

    ``atrest_key`` decrypts an encrypted ledger (:mod:`xrayfed.common.atrest`);
    ``ledger_key_file``: the ledger's HMAC key when it is not beside the ledger."""
    from xrayfed.common.accounting import second_opinions, training_epsilon
    from xrayfed.common.ledger import read_ledger, unpaid_releases

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
    from xrayfed.common.accounting import second_opinions, training_epsilon

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
    spend = [(rnd, r) for rnd, r in entries if r.get("status") in ("trained", "resent")
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
        check_list.append((len(history), spent, delta, accountant, True))
        ops = second_opinions(history, check_list)
        checks.add(ops, accountant)
        for j, op in zip(check_at, ops[:-1]):
            rounds[j].epsilon_independent = op.independent_epsilon
            rounds[j].epsilon_rdp = op.rdp_epsilon
            rounds[j].agrees = op.agrees
        final_op = ops[-1]
    last_spend = spend[-1][1] if spend else {}
    complete = final_op is not None and final_op.agrees and abs(last_reported - recomputed) <= final_op.tolerance
    more = None
    if history and budget is not None and complete:
        more = _fits(history, history[-1], delta, budget, accountant, spent)
    h = HospitalReport(
        hospital=name, source="metrics", epsilon_budget=budget, delta=delta, epsilon_spent=spent,
        epsilon_left=max(0.0, budget - spent), rounds_trained=sum(1 for _, r in entries if r.get("status") == "trained"),
        rounds_refused=sum(1 for _, r in entries if r.get("status") == "refused"),
        rounds_resent=sum(1 for _, r in entries if r.get("status") == "resent"),
        rounds_failed=sum(1 for _, r in entries if r.get("status") == "failed"),
        noise_multiplier=_num(last_spend.get("noise_multiplier")), max_grad_norm=_num(latest("max_grad_norm")),
        sample_rate=_num(last_spend.get("sample_rate")), steps_per_round=_int(last_spend.get("steps")),
        total_steps=sum(n for _, _, n in history), accountant=accountant, secure_mode=bool(latest("secure_mode", False)),
        secure_rng=bool(latest("secure_rng")) if latest("secure_rng") is not None else None,
        num_examples=_int(latest("num_examples")), rounds_more=more, privacy_level=privacy_level(spent),
        budget_level=privacy_level(budget), second_opinion=_opinion_model(final_op) if final_op else None,
        rounds=rounds,
    )
    h._recomputed = recomputed
    h._last_reported = last_reported
    return h


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
                add("info", "history_incomplete",
                    f"reported ε = {rep:.4f} exceeds ε = {rec:.4f} from this run's rounds: the hospital spent "
                    "budget before this run; its ledger (xrayfed report --ledger) has the full history")
    return out


# ============================================================================ builders
def _accounting(checks: _Checks) -> Accounting:
    from xrayfed.common import accounting as A

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
    _secure_mode_note(hospitals, findings)
    names = ", ".join(h.hospital for h in hospitals)
    feds = sorted({r.federation for h in hospitals for r in h.rounds if r.federation})
    report = Report(
        kind="hospital", title=f"Privacy-budget report — hospital {names}", generated_at=_now(),
        generator=_generator(), federation=", ".join(feds) or None, sources=[str(p) for p in paths],
        rounds_total=max((h.rounds_trained for h in hospitals), default=0),
        hospitals=hospitals, findings=findings, accounting=_accounting(checks),
    )
    return _finish(report)


def _one_ledger_per_hospital(h: HospitalReport, hospitals: list[HospitalReport]) -> None:
    for other in hospitals:
        if other.hospital == h.hospital:
            raise UserError(f"two ledgers for hospital {h.hospital}: {other.ledger.path if other.ledger else '?'} and "
                            f"{h.ledger.path if h.ledger else '?'}; give one ledger per hospital")


def _secure_mode_note(hospitals: list[HospitalReport], findings: list[Finding]) -> None:
    off = [h.hospital for h in hospitals if not h.secure_mode]
    if off:
        findings.append(Finding(
            level="info", code="secure_mode_off",
            message="Opacus secure_mode is off for " + ", ".join(off) + " (xrayfed never uses it: it needs "
                    "torchcsprng). With secure_rng on, xrayfed draws the DP noise from a CSPRNG itself; the Poisson "
                    "batch sampler uses torch's generator, seeded from os.urandom"))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl, the last row per round winning (a resumed round may appear twice)."""
    rows: dict[int, dict[str, Any]] = {}
    with path.open("r", encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                rows[int(r["round"])] = r
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise UserError(f"{path}: line {n}: not a metrics row (JSON object with a 'round')") from None
    return [rows[k] for k in sorted(rows)]


def _federation_name(run_dir: Path, rows: list[dict[str, Any]]) -> str | None:
    import tomllib

    p = run_dir / "federation.toml"
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
    _secure_mode_note(hospitals, findings)

    rounds = _round_summaries(rows, node_name, findings)
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
    )
    return _finish(report)


def _attach_reported(h: HospitalReport, entries: list[tuple[int, dict[str, Any]]], fed: str | None,
                     findings: list[Finding]) -> None:
    """Cross-check the ε a hospital reported to the server with its own ledger, round by round,
    and that the ledger still holds every head the server recorded (truncation, rollback)."""
    from xrayfed.common.ledger import check_anchor

    want = {"trained": "trained", "resent": "trained", "refused": "refused"}
    for rnd, row in entries:
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
        ))
    return out


# ============================================================================ renderers
def _f(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:g}"


def _onoff(x: bool | None) -> str:
    return "unknown" if x is None else ("on" if x else "off")


HOSPITAL_COLUMNS = ("Hospital", "Budget ε", "δ", "ε spent", "ε left", "Rounds trained", "Rounds refused",
                    "Updates released / charged", "σ",
                    "Clip norm C", "Sample rate q", "Steps/round", "Accountant", "secure_mode", "Secure RNG",
                    "More rounds fit", "Level")


def hospital_rows(report: Report) -> list[list[str]]:
    return [[h.hospital, _g(h.epsilon_budget), _g(h.delta), _f(h.epsilon_spent), _f(h.epsilon_left),
             str(h.rounds_trained), str(h.rounds_refused),
             (f"{h.updates_released} / {h.rounds_trained}" if h.source != "metrics" else "—")
             + (f" ({h.releases_unpaid} UNPAID)" if h.releases_unpaid else ""),
             _f(h.noise_multiplier, ".4f"), _g(h.max_grad_norm),
             _f(h.sample_rate, ".4f"), "—" if h.steps_per_round is None else str(h.steps_per_round),
             h.accountant.upper(), _onoff(h.secure_mode), _onoff(h.secure_rng),
             "unknown" if h.rounds_more is None else str(h.rounds_more), h.privacy_level]
            for h in report.hospitals]


def _md_table(header, rows) -> str:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(c) for c in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def summary_table(report: Report) -> str:
    """The per-hospital Markdown table (also printed to the terminal)."""
    return _md_table(HOSPITAL_COLUMNS, hospital_rows(report))


def _headline(report: Report) -> list[str]:
    out = []
    if report.epsilon_max is not None:
        lvl = privacy_level(report.epsilon_max)
        out.append(f"Largest ε spent: {report.epsilon_max:.3f} ({report.epsilon_max_hospital}) — "
                   f"reference point: {lvl}.")
    out.append(f"Findings: {report.count('critical')} critical, {report.count('warning')} warning(s), "
               f"{report.count('info')} note(s). Second opinion: {report.accounting.checks - report.accounting.disagreements}"
               f" of {report.accounting.checks} ε values agree with {report.accounting.independent_library}.")
    if report.final_eval:
        ev = report.final_eval
        parts = [f"{k} {_f(ev.get(k))}" for k in ("auc", "accuracy", "sensitivity", "specificity") if k in ev]
        out.append(f"Model after round {report.final_round} (server held-out set): " + ", ".join(parts) + ".")
    return out


def _second_opinion_rows(report: Report) -> list[list[str]]:
    rows = []
    for h in report.hospitals:
        so = h.second_opinion
        if so is None:
            rows.append([h.hospital, h.accountant.upper(), _f(h.epsilon_spent, ".4f"), "—", "—", "—", "—", "—"])
            continue
        per = [r for r in h.rounds if r.agrees is not None]
        rows.append([h.hospital, so.training_accountant.upper(), _f(so.epsilon_training, ".4f"),
                     f"{so.independent_method.upper()} {so.epsilon_independent:.4f}", _f(so.epsilon_pld, ".4f"),
                     _f(so.epsilon_rdp, ".4f"), f"±{so.tolerance:.3f}",
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
                     (_f(r.max_epsilon) + (f" ({', '.join(r.max_epsilon_hospitals)})" if r.max_epsilon_hospitals else "")),
                     _f(ev.get("auc")), _f(ev.get("accuracy"))])
    return header, rows


def _ledger_rows(h: HospitalReport) -> list[list[str]]:
    rows = []
    for r in h.rounds:
        rows.append([str(r.round), r.federation or "—", r.status, _f(r.epsilon, ".4f"),
                     _f(r.epsilon_independent, ".4f"),
                     "—" if r.agrees is None else ("yes" if r.agrees else "NO"),
                     _f(r.noise_multiplier, ".4f"), _f(r.sample_rate, ".4f"), "—" if r.steps is None else str(r.steps),
                     _f(r.epsilon_reported, ".4f"), r.time or "—"])
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
    L += [f"**{line}**" if i == 0 else line for i, line in enumerate(_headline(report))]
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
                  f"images; noise source: {h.noise_source or 'unknown'}.", "",
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
    import base64
    from html import escape as e

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
    if report.final_eval:
        ev = report.final_eval
        parts = [f"{k} {_f(ev.get(k))}" for k in ("auc", "accuracy", "sensitivity", "specificity") if k in ev]
        H.append(f'<p class="note">Model after round {report.final_round} on the server\'s held-out set: '
                 f'{e(", ".join(parts))}.</p>')

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
                     f"{h.max_rounds_planned or '?'} rounds; N = {h.num_examples or '?'} training images; noise source: "
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
    from . import plots as P

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rendered = P.render_all(report) if {"md", "html"} & set(formats) else {}
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


# ============================================================================ CLI
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="privacy-budget report of a federation run or of a hospital's ledger",
        description="Write a privacy-budget report (Markdown, self-contained HTML with plots, JSON): ε spent and "
                    "left per hospital, a second opinion on every ε from an independent accountant, warnings, and "
                    "model AUC per round. RUN_DIR: the operator's run directory; --ledger: a hospital's own ledger.")
    p.add_argument("run_dir", nargs="?", type=Path, metavar="RUN_DIR",
                   help="federation run directory (metrics.jsonl; hospital ledgers under hospitals/ are included)")
    p.add_argument("--ledger", type=Path, action="append", default=[], metavar="FILE",
                   help=f"a hospital's {LEDGER_FILE} (or its state folder); repeatable")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default: RUN_DIR/report, or privacy-report/ next to the ledger)")
    p.add_argument("--format", default="all", metavar="LIST", help="md,html,json or all (default: all)")
    p.add_argument("--schema", action="store_true", help="print the JSON schema of report.json and exit")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when the report has critical findings")
    from xrayfed.common.atrest import add_key_argument

    add_key_argument(p, help="key of ledgers encrypted at rest")
    p.add_argument("--ledger-key-file", type=Path, metavar="FILE",
                   help="the ledger's HMAC key ([hospital] ledger_key_file) when it is not the ledger.key beside "
                        "the ledger or derived from the at-rest key")
    p.set_defaults(func=report_cmd)


def report_cmd(args: argparse.Namespace) -> int:
    if args.schema:
        print(json.dumps(json_schema(), indent=2, ensure_ascii=False))
        return 0
    formats = parse_formats(args.format)
    if args.run_dir is None and not args.ledger:
        raise UserError("report: give a run directory (xrayfed report RUN_DIR) or a ledger (--ledger FILE)")
    from xrayfed.common.atrest import load_key

    key = load_key(getattr(args, "atrest_key_file", None))
    if args.run_dir is not None:
        report = build_federation_report(args.run_dir, args.ledger, atrest_key=key,
                                         ledger_key_file=args.ledger_key_file)
        out = args.out or Path(args.run_dir) / "report"
    else:
        report = build_hospital_report(list(args.ledger), atrest_key=key, ledger_key_file=args.ledger_key_file)
        out = args.out or resolve_ledger(args.ledger[0]).parent / "privacy-report"
    files = write_report(report, out, formats)
    print(f"# {report.title}\n")
    print(summary_table(report))
    print()
    for line in _headline(report):
        print(line)
    for f in report.findings:
        if f.level != "info":
            print(f"  {f.level.upper()}: {f.hospital + ': ' if f.hospital else ''}{f.message}")
    print("wrote: " + ", ".join(str(p) for p in files if p.suffix != ".png"))
    return 1 if args.strict and report.count("critical") else 0
