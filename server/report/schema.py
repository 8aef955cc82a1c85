"""The report's JSON schema (pydantic models, ``schema_version`` 1) and ε reference points."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from xrayfed.server.report.audit_section import EmpiricalCheck

SCHEMA_VERSION = "1"
FORMATS = ("md", "html", "json")
# |logged ε − recomputed ε| above this (relative to max(1, ε)) means the ledger contradicts itself.
LEDGER_RECOMPUTE_TOL = 1e-6
# |ε reported to the server − ε in the hospital's ledger| above this is a mismatch.
REPORTED_TOL = 1e-6

Level = Literal["strong", "common", "reasonable", "weak"]


# ============================================================================ schema
class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReferencePoint(_Schema):
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


class Finding(_Schema):
    """A warning for the privacy officer. ``critical``: the guarantee or the numbers cannot be
    trusted as stated; ``warning``: needs attention; ``info``: worth knowing."""

    level: Literal["critical", "warning", "info"]
    code: str = Field(description="stable identifier, e.g. delta_ge_1_over_n, budget_exhausted")
    hospital: str | None = None
    round: int | None = None
    message: str


class SecondOpinion(_Schema):
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


class HospitalRound(_Schema):
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


class LedgerInfo(_Schema):
    path: str
    lines: int
    head_hash: str = Field(description="hash of the last line (commits to the whole verified chain)")
    verified: bool = True


class HospitalReport(_Schema):
    hospital: str
    source: Literal["ledger", "metrics", "ledger+metrics"]
    epsilon_budget: float
    delta: float
    epsilon_spent: float = Field(description="cumulative ε at δ over every round trained (training accountant)")
    epsilon_left: float = Field(description="max(0, budget − spent)")
    rounds_trained: int = Field(description="rounds whose update the hospital trained and was charged for (a "
                                            "round resent after a restart counts once, here and in rounds_resent)")
    rounds_refused: int
    rounds_resent: int = Field(0, description="of rounds_trained: rounds whose already-charged update was sent "
                                              "again after a crash or restart (no new charge)")
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
    num_examples: int | None = Field(None, description="N, training units (patients or scans) at the hospital")
    unit: Literal["patient", "scan"] = Field("scan", description="what the guarantee protects: a patient (all of "
                                                                  "their scans together) or one scan")
    num_scans: int | None = Field(None, description="training scans behind the N units")
    most_scans_of_one_patient: int | None = Field(None, description="scans of the hospital's most-scanned patient, "
                                                                    "when its data knows its patients")
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


class RoundSummary(_Schema):
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
    timing: dict[str, float | str] | None = Field(
        None, description="where the round's seconds went (metrics.jsonl 'timing'): wait_s, exchange_s, the slowest "
                          "hospital's startup_s/data_s/train_s/local_s, transfer_s, aggregate_s, eval_s, other_s")


class RunSecurity(_Schema):
    """What protected the run. Federation: as the server recorded it with each round (None: not
    recorded, from an older run, or from federation.toml); hospital: what its ledger shows."""

    transport: Literal["grpc", "simulation"] | None = Field(None, description="grpc (a real network) | "
                                                                            "simulation (one machine)")
    tls: bool | None = None
    hospital_auth: bool | None = Field(None, description="only registered hospital keys could connect")
    secure_aggregation: bool | None = Field(None, description="SecAgg+: the server saw only the sum of updates")
    encrypted_at_rest: bool | None = Field(None, description="federation: the server's checkpoints; hospital: "
                                                             "its ledger")
    source: Literal["metrics", "config", "ledger"] = "metrics"
    rounds_recorded: int | None = Field(None, description="metrics: rounds whose row records it (older rows do not)")
    mixed: list[str] = Field(default_factory=list, description="settings that differed between rounds (a restart "
                                                               "with another configuration): the weakest is shown")


class Accounting(_Schema):
    training_accountants: list[str]
    independent_library: str
    pld_discretization: float
    tolerance_abs: float
    tolerance_rel: float
    tolerance_rule: str
    checks: int = Field(description="ε values given a second opinion")
    disagreements: int


class PlotRef(_Schema):
    name: str
    file: str = Field(description="PNG written beside the report (none when only JSON is written)")
    caption: str


class Report(_Schema):
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
    security: RunSecurity | None = None
    released_without_dp: list[str] = Field(default_factory=list, description="what left the hospitals without "
                                                                               "differential privacy (not covered by ε)")
    findings: list[Finding] = Field(default_factory=list)
    reference_points: list[ReferencePoint] = Field(default_factory=lambda: list(REFERENCE_POINTS))
    accounting: Accounting
    plots: list[PlotRef] = Field(default_factory=list)
    empirical_checks: list[EmpiricalCheck] = Field(default_factory=list, description="privacy audits (xrayfed audit) "
                                                   "found beside the sources: the Empirical check section")

    def count(self, level: str) -> int:
        return sum(1 for f in self.findings if f.level == level)


def json_schema() -> dict[str, Any]:
    return Report.model_json_schema()


