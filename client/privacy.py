"""Where every differential-privacy guarantee of a hospital is enforced. Read this file first.

Guarantee: each hospital's model updates, over the whole federation run, are
(ε, δ)-differentially private with respect to its own training examples (example-level DP,
add/remove adjacency), for the (ε, δ) in the hospital's own ``hospital.toml`` — whatever the
server asks for. How:

* **Budget owned by the hospital.** ε, δ, C (clip norm), batch size, local epochs and the
  number of rounds the budget is planned for come only from the hospital's config
  (:class:`~xrayfed.common.config.HospitalConfig`). The server's round config carries the
  learning rate and FedProx μ, never a privacy parameter. Left unset, batch size and local
  epochs are derived here from the hospital's own N and ε (:func:`auto_training`), never
  from anything the server sends, and recorded in the ledger's budget line.
* **σ derived from the budget.** :func:`plan_dp` picks the noise multiplier σ so that
  ``max_rounds`` rounds of ``steps`` DP-SGD steps at Poisson sample rate q = B/N stay within
  (ε, δ) under the PRV accountant (RDP selectable), checked again by composing round by round.
* **Spend written before training, refusal before spending.** :class:`PrivacyLedger` is the
  hospital's persistent privacy state: JSON lines in a keyed hash chain (HMAC-SHA256 under the
  hospital's ledger key, :mod:`xrayfed.common.privacy.ledger`; one ``train`` line per round: round,
  steps, q, σ, C, ε at δ). Before a round trains, the ε after that round is computed from the
  whole ledger history; if it would exceed ε, the round is refused (nothing trains, nothing
  leaves). Otherwise the spend is appended and fsync'ed *before* training starts, so a crash
  can only over-count, never under-count. ε is cumulative over the whole run and survives
  restarts because it is recomputed from the ledger each time.
* **Every released update is charged once** (``xrayfed.client.hospital.train_round``). After
  training, the update's SHA-256 digest is recorded in a ``release`` line (fsync'ed) *before*
  the reply leaves, naming the ``train`` line that paid for it. A repeated request (same
  federation, round and global model: e.g. a server crash and resume, or a curious server
  replaying it) gets the byte-identical update again from the release cache — post-processing,
  no new spend — or, when that copy is gone, unreadable or altered, a refusal naming why;
  never a retrain. A request charged but never released (the hospital crashed while training)
  retrains under the spend already recorded, and exactly the plan that line charged (σ, q,
  steps, C: ``xrayfed.client.hospital.charged_plan``), whatever ``hospital.toml`` says after
  the restart. The whole decision runs under an exclusive lock
  on the state folder (:class:`StateLock`), so two concurrent requests cannot both use one
  charge. ``xrayfed report`` shows releases against charges and flags any release without its
  own charge.
* **A refused request costs nothing** (``xrayfed.client.hospital.check_request`` and
  ``checked_model``, before the charge): the round's settings (learning rate, FedProx μ, scan
  size within ``[hospital] max_*``), a model spec that names no file, and a global model with
  the architecture's names, shapes and dtypes and finite values. A server cannot spend a
  hospital's budget with requests the hospital would never train on.
* **Tamper-evident ledger.** Editing a line or re-chaining the file needs the ledger key;
  removing lines from the end is caught by the head anchor (``privacy-ledger.head``) and, if
  that is rolled back too, by the head the server recorded after the hospital's last reply,
  which it sends back with the next round: the hospital then refuses to train
  (``ledger.check_anchor``). The server's anchor never moves backwards
  (``xrayfed.server.strategy.ledger_anchors``), so the refusal lasts until the ledger is restored. With an at-rest key, every line must be encrypted.
* **Plans that cannot give a meaningful guarantee are refused before work starts**
  (:func:`plan_dp`, also run by ``xrayfed client`` before joining): δ ≥ 1/N, a budget no σ can
  meet, a plan longer than the accountant composes.
* **Per-sample clipping and Gaussian noise** by Opacus (``GradSampleModule`` + a
  ``DPOptimizer``), Poisson sampling with rate q, memory bounded by ``BatchMemoryManager``.
* **Noise source.** Opacus' ``secure_mode`` needs torchcsprng, which has no build for this
  torch. With ``secure_rng = true`` (default) the Gaussian noise is drawn from a
  cryptographically secure generator instead: AES-256-CTR keystream keyed from ``os.urandom``
  per step, Box–Muller in float64, and — as Opacus' secure mode does against floating-point
  attacks — the sum of 4 samples scaled by 1/2. The Poisson batch sampler is seeded from
  ``os.urandom`` but uses torch's (non-cryptographic) generator; the ledger and reports say
  ``secure_mode: false`` because Opacus' own secure mode is not used.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xrayfed.common.config import HospitalConfig
from xrayfed.common.errors import UserError
from xrayfed.common.model import feature_cache
from xrayfed.common.privacy.accounting import compute_epsilon
from xrayfed.common.privacy import NO_PATIENT_IDS
from xrayfed.common.privacy.ledger import LEDGER_FILE, append_record, read_ledger

log = logging.getLogger(__name__)

NOISE_SOURCE_SECURE = "csprng:aes256-ctr(os.urandom)+box-muller,sum-of-4"
NOISE_SOURCE_TORCH = "torch.normal (not cryptographically secure)"


class BudgetExceeded(UserError):
    """Another round would take the hospital past its (ε, δ) budget."""


@dataclass(frozen=True)
class DPPlan:
    """DP-SGD settings for one round of one hospital (units in the field names)."""

    noise_multiplier: float  # σ: noise std / clip norm
    sample_rate: float  # q: Poisson sampling probability per example per step
    steps: int  # DP-SGD steps per round
    max_grad_norm: float  # C: per-sample L2 clip norm
    expected_batch_size: int  # q·N
    num_examples: int  # N: training examples at this hospital
    epsilon_budget: float  # ε for the whole federation run
    delta: float  # δ
    max_rounds: int  # rounds the budget is planned for
    accountant: str
    local_epochs: float = 1.0  # passes over the data per round (steps = ⌈epochs / q⌉)
    settings_source: str = "hospital.toml"  # or "auto": B and epochs derived by auto_training
    unit: str = "scan"  # what N, B and the guarantee count: "patient" or "scan"
    num_scans: int = 0  # training scans behind the N units (= N for the scan unit)
    max_scans_per_patient: int = 1  # unit = patient: scans averaged into one contribution (≤ C)
    most_scans_of_one_patient: int | None = None  # when the data knows its patients (group privacy at the scan unit)

    @property
    def unit_plural(self) -> str:
        return "patients" if self.unit == "patient" else "scans"


#: The rule behind the automatic batch size and local epochs (chosen on validation sweeps with
#: the in-process simulation, docs/accuracy.md): large logical batches (a quarter of the
#: hospital's scans, at least 256 — all of them below that — at most 2048) and fewer passes
#: over the data per round at small ε, where each pass costs more noise.
AUTO_BATCH = {"fraction_of_n": 0.25, "min": 256, "max": 2048}
#: (ε below, local epochs over the whole plan): spread over ``max_rounds`` rounds, and over
#: :data:`AUTO_MIN_ROUNDS` when fewer are planned (a short plan does not train longer per round).
AUTO_EPOCHS = ((2.0, 10.0), (float("inf"), 25.0))
AUTO_MIN_ROUNDS = 5


def auto_training(num_examples: int, epsilon: float, batch_size: int | None = None,
                  local_epochs: float | None = None, max_rounds: int = AUTO_MIN_ROUNDS) -> tuple[int, float]:
    """``(batch size B, local epochs per round)`` for a hospital with ``num_examples`` training
    scans, budget ``epsilon`` planned for ``max_rounds`` rounds; a value the hospital set in
    ``hospital.toml`` is kept.

    A hospital states only its budget: B = clamp(N/4, 256, 2048) (≤ N), and 10 local epochs in
    all below ε = 2, else 25, spread evenly over the planned rounds (2 or 5 per round over 5
    rounds or fewer, 0.5 or 1.25 over 20). The same epochs over more rounds were better at
    ε = 1 and no worse at ε = 8 (docs/accuracy.md). Both are decided at the hospital, from its own
    N and plan, and recorded in every ``train`` line of the ledger (as q = B/N and steps)."""
    if batch_size is None:
        b = int(round(num_examples * AUTO_BATCH["fraction_of_n"]))
        batch_size = max(1, min(num_examples, max(AUTO_BATCH["min"], min(AUTO_BATCH["max"], b))))
    if local_epochs is None:
        total = next(e for below, e in AUTO_EPOCHS if epsilon < below)
        local_epochs = total / max(AUTO_MIN_ROUNDS, int(max_rounds))
    return int(batch_size), float(local_epochs)


#: Longest plan (max_rounds × steps per round) each accountant is asked to compose. Opacus' PRV
#: accountant's memory grows with the number of steps (1.4 GB at 60 k steps here); RDP's does not.
MAX_PLANNED_STEPS = {"prv": 50_000, "rdp": 10_000_000}


@functools.lru_cache(maxsize=64)
def _noise_for_budget(epsilon: float, delta: float, q: float, steps: int, max_rounds: int, accountant: str) -> float:
    """The smallest σ (searched to 1 %) for which ``max_rounds`` rounds of ``steps`` DP-SGD steps
    at sample rate ``q`` spend at most (``epsilon``, ``delta``), checked with the exact
    round-by-round composition the ledger uses. A pure function of its arguments, so cached: a
    hospital plans every round with the same inputs (the search costs seconds)."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha" (PRV is used)
            warnings.simplefilter("ignore")
            sigma = float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q,
                                               steps=steps * max_rounds, accountant=accountant,
                                               epsilon_tolerance=0.01))
    except (ValueError, OverflowError, MemoryError, FloatingPointError):
        raise UserError(
            f"privacy.epsilon = {epsilon:g} (δ = {delta:g}) cannot be met by {max_rounds} round(s) of "
            f"{steps} DP-SGD steps at q = {q:.3g}, even with noise σ = 10⁶; raise epsilon, or lower max_rounds "
            "or training.local_epochs") from None
    while compute_epsilon([(sigma, q, steps)] * max_rounds, delta, accountant) > epsilon:
        sigma *= 1.01
    return sigma


def plan_dp(cfg: HospitalConfig, num_examples: int, unit: str = "scan", num_scans: int | None = None) -> DPPlan:
    """σ, q and steps for one round so that ``max_rounds`` rounds fit the hospital's (ε, δ).

    ``num_examples`` is N in the privacy ``unit`` (patients or scans, :func:`privacy_units`):
    B, q = B/N, the epochs and δ < 1/N all count units. Refuses (one-line :class:`UserError`,
    before anything trains) a δ at or above 1/N, a plan longer than the accountant can compose
    (:data:`MAX_PLANNED_STEPS`) and a budget that no σ can meet.
    """
    word = "patients" if unit == "patient" else "scans"
    if num_examples < 2:
        raise UserError(f"data: {num_examples} training {word}; DP training needs at least 2")
    p, t = cfg.privacy, cfg.training
    if p.delta >= 1.0 / num_examples:
        suggest = 10 ** math.floor(math.log10(0.1 / num_examples))
        raise UserError(f"privacy.delta = {p.delta:g}: must be below 1/N = {1.0 / num_examples:.3g} for this "
                        f"hospital's N = {num_examples} training {word} (with δ ≥ 1/N the guarantee allows "
                        f"releasing a {word[:-1]} outright); use e.g. δ = {suggest:g}")
    batch_size, local_epochs = auto_training(num_examples, p.epsilon, t.batch_size, t.local_epochs, p.max_rounds)
    q = min(1.0, batch_size / num_examples)
    steps = max(1, math.ceil(local_epochs / q))
    total = steps * p.max_rounds
    if total > MAX_PLANNED_STEPS[p.accountant]:
        raise UserError(
            f"privacy.max_rounds = {p.max_rounds} × {steps} DP-SGD steps per round = {total} steps: more than the "
            f"{p.accountant.upper()} accountant composes here ({MAX_PLANNED_STEPS[p.accountant]}); lower "
            "max_rounds or training.local_epochs, raise training.batch_size"
            + (", or use privacy.accountant = \"rdp\"" if p.accountant == "prv" else ""))
    sigma = p.noise_multiplier
    if sigma is None:
        sigma = _noise_for_budget(float(p.epsilon), float(p.delta), float(q), int(steps), int(p.max_rounds),
                                  p.accountant)
    return DPPlan(
        noise_multiplier=float(sigma),
        sample_rate=float(q),
        steps=int(steps),
        max_grad_norm=float(p.max_grad_norm),
        expected_batch_size=max(1, int(round(q * num_examples))),
        num_examples=int(num_examples),
        epsilon_budget=float(p.epsilon),
        delta=float(p.delta),
        max_rounds=int(p.max_rounds),
        accountant=p.accountant,
        local_epochs=float(local_epochs),
        settings_source="auto" if (t.batch_size is None or t.local_epochs is None) else "hospital.toml",
        unit=unit,
        num_scans=int(num_scans if num_scans is not None else num_examples),
        max_scans_per_patient=int(p.max_scans_per_patient) if unit == "patient" else 1,
    )


# ----------------------------------------------------------------------------- the privacy unit

class PatientUnits(torch.utils.data.Dataset):
    """A hospital's training scans seen as patients, for patient-level DP-SGD.

    Item ``i`` is patient ``i``'s contribution to a step: with ``max_scans`` = 1 one of their
    scans (chosen at random each time the patient is sampled) and its label, exactly like a scan
    dataset's item; with ``max_scans`` = m > 1 a stack of m of their scans (all of them, chosen
    without repetition while enough remain, then cycled) and their labels. The training loop
    averages the per-scan gradients of one item before Opacus clips it
    (:func:`average_views`), so one patient moves each step's pre-noise sum by at most C,
    however many scans they have. The random choice is not part of the privacy analysis."""

    def __init__(self, scans, patient_ids, max_scans: int = 1, seed: int | None = None) -> None:
        groups: dict[str, list[int]] = {}
        for i, pid in enumerate(patient_ids):
            groups.setdefault(str(pid), []).append(i)
        self.scans = scans
        self.groups = list(groups.values())
        self.max_scans = int(max_scans)
        self.num_scans = len(patient_ids)
        self._rng = np.random.default_rng(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def scans_per_item(self) -> int:
        return self.max_scans

    def scans_per_patient(self) -> list[int]:
        return [len(g) for g in self.groups]

    def __getitem__(self, i: int):
        g = self.groups[i]
        if self.max_scans == 1:
            return self.scans[g[int(self._rng.integers(len(g)))]]
        order = list(self._rng.permutation(len(g)))
        picks = [g[order[j % len(g)]] for j in range(self.max_scans)]
        xs, ys = zip(*(self.scans[j] for j in picks))
        return torch.stack([torch.as_tensor(x) for x in xs]), torch.stack([torch.as_tensor(y) for y in ys])


def resolve_unit(cfg: HospitalConfig, patient_ids) -> str:
    """The privacy unit this hospital trains under: ``[privacy] unit``, or ``patient`` when it is
    unset and the data carries patient identities. Data without them is refused (one line,
    :data:`NO_PATIENT_IDS`) unless the hospital chose ``unit = "scan"``."""
    unit = cfg.privacy.unit
    if unit == "scan":
        return "scan"
    if patient_ids is None:
        raise UserError(f"the hospital's training data {NO_PATIENT_IDS}")
    return "patient"


def privacy_units(cfg: HospitalConfig, train) -> tuple[Any, str]:
    """``(dataset, unit)``: what DP-SGD samples at this hospital — its training scans (unit
    ``scan``) or its training patients (:class:`PatientUnits`, unit ``patient``) — so that N, q
    and the guarantee all count the same unit."""
    pids = getattr(train, "patient_ids", None) if getattr(train, "patient_ids_known", False) else None
    unit = resolve_unit(cfg, pids)
    if unit == "scan":
        return train, unit
    return PatientUnits(train, pids, cfg.privacy.max_scans_per_patient), unit


def plan_for(cfg: HospitalConfig, train) -> tuple[DPPlan, Any]:
    """``(plan, dataset)``: :func:`privacy_units` then :func:`plan_dp` on them (what
    `xrayfed client`, `data check` and every round plan from)."""
    from dataclasses import replace

    units, unit = privacy_units(cfg, train)
    plan = plan_dp(cfg, len(units), unit, num_scans=len(train))
    if getattr(train, "patient_ids_known", False):
        from collections import Counter

        plan = replace(plan, most_scans_of_one_patient=max(Counter(train.patient_ids).values()))
    return plan, units


# ----------------------------------------------------------------------------- ledger
def request_key(federation: str, server_round: int, weights_version: str) -> str:
    """Identifies one training request: same federation, round and global model → same key."""
    return hashlib.sha256(f"{federation}|{server_round}|{weights_version}".encode()).hexdigest()[:32]


class PrivacyLedger:
    """The hospital's persistent privacy state (a keyed hash chain of JSON lines in ``state_dir``).

    Line kinds (``event``): ``budget`` (first line; budget and settings), ``train`` (the charge
    of one round, written *before* it trains: round, steps, sample_rate q, noise_multiplier σ,
    max_grad_norm C, epsilon = cumulative ε at delta), ``release`` (an update left the
    hospital: the request it answers, the ``train`` line that paid for it, and the SHA-256
    ``digest`` of the weights), ``resend`` (a byte-identical update sent again, no spend),
    ``retry`` (retraining after a crash before anything was released, under the same charge),
    ``refused`` (a round refused because it would exceed the budget) and ``refused_resend`` (a
    repeated request whose update was already released and can no longer be sent again
    byte-identically: nothing left the hospital).

    Invariant (checked by :meth:`releases_without_charge` and ``xrayfed report``): every
    ``release`` names a distinct ``train`` line of the same request, so every update that ever
    left the hospital was charged once.
    """

    FILE = LEDGER_FILE
    #: The ledger format written in each budget line: 2 = every update that leaves has a release line.
    FORMAT = 2

    def __init__(self, state_dir: Path, cfg: HospitalConfig, key=None) -> None:
        from xrayfed.common.privacy.ledger import ledger_key

        self.path = Path(state_dir) / self.FILE
        self.cfg = cfg
        self.key = key  # AtRestKey: lines are written encrypted (the chain stays over the plaintext)
        self.mac_key = ledger_key(self.path, key, cfg.hospital.ledger_key_file, create=True)
        self.records = read_ledger(self.path, key, mac_key=self.mac_key)  # verifies chain + head anchor

    # -- reading
    def train_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == "train"]

    def history(self) -> list[tuple[float, float, int]]:
        return [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in self.train_records()]

    def spent(self) -> float:
        """Cumulative ε at the hospital's δ over every round recorded so far."""
        return compute_epsilon(self.history(), self.cfg.privacy.delta, self.cfg.privacy.accountant)

    def find(self, key: str) -> dict[str, Any] | None:
        """The ``train`` line (charge) of request ``key``, if any."""
        for r in reversed(self.train_records()):
            if r.get("request") == key:
                return r
        return None

    def release_of(self, key: str) -> dict[str, Any] | None:
        """The ``release`` line of request ``key``: its update has left the hospital."""
        for r in reversed(self.records):
            if r.get("event") == "release" and r.get("request") == key:
                return r
        return None

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last line: what the server anchors after each reply."""
        if not self.records:
            return -1, ""
        return int(self.records[-1]["seq"]), str(self.records[-1]["hash"])

    def releases_without_charge(self) -> list[dict[str, Any]]:
        """``release`` lines not paid for by their own ``train`` line (must be empty)."""
        from xrayfed.common.privacy.ledger import unpaid_releases

        return unpaid_releases(self.records)

    # -- writing
    def _append(self, rec: dict[str, Any]) -> dict[str, Any]:
        rec = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "hospital": self.cfg.hospital.name, **rec}
        full = append_record(self.path, rec, self.key, mac_key=self.mac_key)  # fsync'ed before it returns
        self.records.append(full)
        return full

    def ensure_header(self, plan: DPPlan) -> None:
        header = {
            "event": "budget",
            "format": self.FORMAT,
            "epsilon_budget": plan.epsilon_budget,
            "delta": plan.delta,
            "max_rounds": plan.max_rounds,
            "accountant": plan.accountant,
            "num_examples": plan.num_examples,
            "max_grad_norm": plan.max_grad_norm,
            "secure_mode": False,
            "secure_rng": self.cfg.privacy.secure_rng,
            "noise_source": NOISE_SOURCE_SECURE if self.cfg.privacy.secure_rng else NOISE_SOURCE_TORCH,
            "batch_size": plan.expected_batch_size,
            "local_epochs": plan.local_epochs,
            "training_settings": plan.settings_source,
            "unit": plan.unit,
            "num_scans": plan.num_scans,
            "max_scans_per_patient": plan.max_scans_per_patient,
            "most_scans_of_one_patient": plan.most_scans_of_one_patient,
        }
        last = next((r for r in reversed(self.records) if r.get("event") == "budget"), None)
        if last is None or any(last.get(k) != v for k, v in header.items()):
            self._append(header)

    def charge(self, plan: DPPlan, *, federation: str, server_round: int, key: str) -> dict[str, Any]:
        """Refuse (``BudgetExceeded``) or record the spend of one round, before it trains."""
        eps_after = compute_epsilon(
            self.history() + [(plan.noise_multiplier, plan.sample_rate, plan.steps)], plan.delta, plan.accountant
        )
        if eps_after > plan.epsilon_budget:
            spent = self.spent()
            self._append(
                {
                    "event": "refused",
                    "federation": federation,
                    "round": server_round,
                    "request": key,
                    "epsilon": spent,
                    "epsilon_if_trained": eps_after,
                    "epsilon_budget": plan.epsilon_budget,
                    "delta": plan.delta,
                }
            )
            raise BudgetExceeded(
                f"hospital {self.cfg.hospital.name}: round {server_round} refused: it would spend ε = {eps_after:.3f} "
                f"in total, over this hospital's budget ε = {plan.epsilon_budget:g} (δ = {plan.delta:g}); "
                f"already spent ε = {spent:.3f} in {len(self.train_records())} round(s)"
            )
        return self._append(
            {
                "event": "train",
                "federation": federation,
                "round": server_round,
                "request": key,
                "steps": plan.steps,
                "sample_rate": plan.sample_rate,
                "noise_multiplier": plan.noise_multiplier,
                "max_grad_norm": plan.max_grad_norm,
                "expected_batch_size": plan.expected_batch_size,
                "num_examples": plan.num_examples,
                "unit": plan.unit,
                "num_scans": plan.num_scans,
                "max_scans_per_patient": plan.max_scans_per_patient,
                "delta": plan.delta,
                "epsilon": eps_after,
                "epsilon_budget": plan.epsilon_budget,
                "accountant": plan.accountant,
                "secure_rng": self.cfg.privacy.secure_rng,
            }
        )

    def record_release(self, charge: dict[str, Any], digest: str) -> dict[str, Any]:
        """Durably record that the update of ``charge``'s request leaves the hospital (call
        before replying; at most once per charge)."""
        if self.release_of(charge["request"]) is not None:
            raise RuntimeError("an update was already released for this request")  # a bug, never an input
        return self._append({"event": "release", "federation": charge.get("federation"), "round": charge.get("round"),
                             "request": charge["request"], "charge_seq": int(charge["seq"]), "digest": digest,
                             "epsilon": self.spent()})

    def note(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append an informational line (``resend``/``retry``/...); it carries the current ε."""
        return self._append({"event": event, "epsilon": self.spent(), **fields})


def update_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes (what "byte-identical" means)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class StateLock:
    """An exclusive lock on a hospital's state folder for one round's decisions (check the
    ledger → charge → train → release), so two concurrent requests cannot both retrain under
    one charge. ``fcntl.flock`` (POSIX); released when the process dies."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "StateLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: one ClientApp process at a time is Flower's default
            return self
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


class ReleaseCache:
    """The last released updates, keyed by request, so a repeated request costs no new ε.

    It is only a convenience: what was released is recorded in the ledger (``release`` lines
    with the update's digest). A cached entry is sent again only when its digest equals the
    ledger's; an evicted, deleted, corrupt or swapped entry makes the repeated request a
    refusal, never a retrain. With an at-rest ``key``
    (:class:`~xrayfed.common.security.atrest.AtRestKey`) the files are written AES-256-GCM encrypted; an
    entry that does not decrypt or that is plaintext while a key is configured is an error.
    """

    CONTEXT = b"release-cache"

    def __init__(self, state_dir: Path, keep: int = 3, key=None) -> None:
        self.dir = Path(state_dir) / "released"
        self.keep = keep
        self.key = key

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.pt"

    def get(self, key: str) -> dict | None:
        import io

        from xrayfed.common.security.atrest import read_maybe_encrypted

        p = self.path(key)
        if not p.is_file():
            return None
        data = read_maybe_encrypted(p, self.key, context=self.CONTEXT, require_encrypted=self.key is not None)
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception:
            log.warning("cached update %s unreadable; ignoring it", p.name)
            return None

    def put(self, key: str, payload: dict) -> None:
        import io

        from xrayfed.common.security.atrest import write_encrypted

        buf = io.BytesIO()
        torch.save(payload, buf)
        write_encrypted(self.path(key), buf.getvalue(), self.key, context=self.CONTEXT, mode=0o600)
        files = sorted(self.dir.glob("*.pt"), key=lambda f: f.stat().st_mtime)
        for old in files[: -self.keep]:
            old.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- DP-SGD
def csprng_standard_normal(numel: int) -> torch.Tensor:
    """``numel`` standard-normal float64 samples from a cryptographically secure generator.

    AES-256-CTR keystream (key and nonce fresh from ``os.urandom``) → 53-bit uniforms →
    Box–Muller.
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    pairs = (numel + 1) // 2
    enc = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    raw = np.frombuffer(enc.update(bytes(16 * pairs)) + enc.finalize(), dtype=np.uint64).reshape(2, pairs)
    u = ((raw >> np.uint64(11)).astype(np.float64) + 1.0) / float(2**53)  # (0, 1]
    r = np.sqrt(-2.0 * np.log(u[0]))
    theta = 2.0 * np.pi * u[1]
    z = np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:numel]
    return torch.from_numpy(z)


def secure_gaussian_like(reference: torch.Tensor, std: float) -> torch.Tensor:
    """Gaussian noise N(0, std²) shaped like ``reference``: sum of 4 CSPRNG normals × std/2."""
    n = reference.numel()
    z = csprng_standard_normal(4 * n).view(4, n).sum(dim=0) / 2.0
    return (z * std).to(dtype=reference.dtype).view(reference.shape).to(reference.device)


def _optimizer_class():
    from opacus.optimizers import DPOptimizer

    class HospitalDPOptimizer(DPOptimizer):
        """Opacus DPOptimizer with CSPRNG noise (optional) and a FedProx term added after
        noising (the proximal gradient μ(w − w_global) is data-independent: post-processing)."""

        def __init__(self, *args, secure_rng: bool = True, prox_mu: float = 0.0, prox_ref=None, **kw):
            super().__init__(*args, **kw)
            self.secure_rng = secure_rng
            self.prox_mu = prox_mu
            self.prox_ref = prox_ref

        def add_noise(self):
            if not self.secure_rng:
                return super().add_noise()
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                noise = secure_gaussian_like(p.summed_grad, std) if std > 0 else torch.zeros_like(p.summed_grad)
                p.grad = (p.summed_grad + noise).view_as(p)

        def scale_grad(self):
            super().scale_grad()
            if self.prox_mu > 0 and self.prox_ref is not None:
                for p, ref in zip(self.params, self.prox_ref):
                    p.grad += self.prox_mu * (p.detach() - ref)

    return HospitalDPOptimizer


def make_private(model, optimizer, dataset, plan: DPPlan, *, secure_rng: bool = True, prox_mu: float = 0.0):
    """Wrap model/optimizer/data for DP-SGD under ``plan``.

    Returns ``(dp_model, dp_optimizer, make_loader)``; ``make_loader(steps)`` is a data loader
    yielding exactly ``steps`` Poisson-sampled logical batches (rate q), all loaders drawing
    from one generator seeded from ``os.urandom``.
    """
    from opacus import GradSampleModule
    from opacus.data_loader import wrap_collate_with_empty
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from opacus.validators import ModuleValidator

    model.train()
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise UserError(f"model is not DP-compatible: {errors[0]}")
    dp_model = GradSampleModule(model)
    prox_ref = [p.detach().clone() for p in dp_model.parameters()] if prox_mu > 0 else None
    dp_opt = _optimizer_class()(
        optimizer,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=plan.expected_batch_size,
        secure_rng=secure_rng,
        prox_mu=prox_mu,
        prox_ref=prox_ref,
    )
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    x0, y0 = dataset[0]

    def make_loader(steps: int):
        sampler = UniformWithReplacementSampler(
            num_samples=len(dataset), sample_rate=plan.sample_rate, generator=gen, steps=steps
        )
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=wrap_collate_with_empty(
                collate_fn=torch.utils.data.default_collate,
                sample_empty_shapes=[(0, *x0.shape), (0, *torch.as_tensor(y0).shape)],
                dtypes=[x0.dtype, torch.as_tensor(y0).dtype],
            ),
        )

    return dp_model, dp_opt, make_loader


def train_private_round(model, dataset, cfg: HospitalConfig, plan: DPPlan, task, device, lr: float,
                        prox_mu: float = 0.0, desc: str | None = None) -> dict:
    """One round of DP-SGD at this hospital (the caller has already charged the ledger).

    ``model`` is updated in place (plain module, no Opacus wrapper left behind).
    The round's ``plan.steps`` DP-SGD steps are run as local epochs of ⌈1/q⌉ steps (the last
    one shorter), with a progress bar per epoch on a terminal and a log line per epoch.
    Returns ``{"loss", "examples", "steps", "seconds"}``.
    """
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    from xrayfed.common.train import make_optimizer, train_epoch

    t0 = time.time()
    model.to(device)
    opt = make_optimizer(model, cfg.training.optimizer, lr, cfg.training.momentum)
    dp_model, dp_opt, make_loader = make_private(model, opt, dataset, plan, secure_rng=cfg.privacy.secure_rng,
                                                 prox_mu=prox_mu)
    per_epoch = max(1, math.ceil(1.0 / plan.sample_rate))
    chunks = [per_epoch] * (plan.steps // per_epoch) + ([plan.steps % per_epoch] if plan.steps % per_epoch else [])
    t = cfg.training
    k = t.augment_multiplicity
    m = int(getattr(dataset, "scans_per_item", 1))  # a patient's scans per item (unit = patient)
    group = k * m  # rows of one clipped unit: m scans × k views
    ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
    hooks: dict = {}
    augmenting = k > 1 or t.augment

    def expand(x, y):
        if m > 1:  # (P, m, …) patients → (P·m, …) scans, each patient's rows together
            x = x.flatten(0, 1)
            y = y.reshape(x.shape[0], -1) if y.shape[0] != x.shape[0] else y
        if augmenting:  # K random views per scan (K = 1: plain augmentation)
            x = random_view(x.repeat_interleave(k, dim=0) if k > 1 else x, t)
            y = y.repeat_interleave(k, dim=0) if k > 1 else y
        return x, y

    if m > 1 or augmenting:
        hooks["expand"] = expand
    if group > 1:  # one averaged gradient per patient / example is clipped
        hooks["after_backward"] = lambda: average_views(dp_model, group)
    if ema is not None:  # after every real (not skipped: BatchMemoryManager's partial) step
        hooks["after_step"] = lambda: None if dp_opt._is_last_step_skipped else ema.update(dp_model)
    total_loss, seen = 0.0, 0
    for e, steps in enumerate(chunks, start=1):
        label = f"{desc} epoch {e}/{len(chunks)}" if desc else None
        with BatchMemoryManager(
            data_loader=make_loader(steps), max_physical_batch_size=max(1, t.max_physical_batch_size // group),
            optimizer=dp_opt,
        ) as mem_loader, feature_cache(not augmenting):  # an augmented view is never seen twice
            ep = train_epoch(dp_model, mem_loader, dp_opt, task, device, desc=label, **hooks)
        total_loss += ep["loss"] * ep["examples"]
        seen += ep["examples"]
        if label:
            log.info("%s: %d DP-SGD steps, loss %.4f", label, steps, ep["loss"])
    if ema is not None:
        ema.copy_to(model)  # release the average of the iterates: post-processing, no privacy cost
    dp_model.zero_grad(set_to_none=True)
    dp_model.cleanup()  # remove Opacus hooks and attributes; `model` is the trained plain module
    assert sum(chunks) == plan.steps
    return {"loss": total_loss / max(seen, 1), "examples": seen, "steps": plan.steps, "seconds": time.time() - t0}


# ----------------------------------------------------------------------------- DP-SGD techniques
def random_shift(x: torch.Tensor, max_frac: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image translated by its own random offset of up to ``max_frac`` of its side (edge
    pixels repeated). The augmentation behind augmentation multiplicity; no flips (a chest
    X-ray's left and right are not interchangeable)."""
    n, _, h, w = x.shape
    m = int(round(max_frac * min(h, w)))
    if m == 0 or n == 0:
        return x
    dy = torch.randint(-m, m + 1, (n, 1), generator=generator).to(x.device)
    dx = torch.randint(-m, m + 1, (n, 1), generator=generator).to(x.device)
    rows = (torch.arange(h, device=x.device)[None, :] + dy).clamp(0, h - 1)  # (n, h)
    cols = (torch.arange(w, device=x.device)[None, :] + dx).clamp(0, w - 1)  # (n, w)
    idx = torch.arange(n, device=x.device)[:, None, None]
    return x[idx, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def random_view(x: torch.Tensor, t, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of a batch (N, C, H, W) in model units ([−1, 1]) under its own random transform,
    with the ranges of a :class:`~xrayfed.common.config.TrainingSection` ``t``: translation up to
    ``augment_shift`` of the side, zoom in [1 − z, 1 + z], an aspect change (width × s, height
    ÷ s, log s uniform in ±log(1 + ``augment_aspect``): scans squashed to a square from films of
    another shape), rotation up to ``augment_rotate`` degrees (bilinear, edge pixels repeated),
    then contrast in [1 − c, 1 + c] about the image's mean and a brightness offset up to ±c, clipped to [−1, 1]. No flips (a chest X-ray's left and
    right are not interchangeable). With zoom, aspect, rotation and contrast all 0 it is
    :func:`random_shift` (whole-pixel translation)."""
    import torch.nn.functional as F

    if not (t.augment_zoom or t.augment_aspect or t.augment_rotate or t.augment_contrast):
        return random_shift(x, t.augment_shift, generator)
    n = x.shape[0]
    if n == 0:
        return x

    def uniform() -> torch.Tensor:  # U(−1, 1), one per image
        return (torch.rand(n, generator=generator, dtype=torch.float32) * 2 - 1).to(x.device)

    angle = uniform() * math.radians(t.augment_rotate)
    zoom = 1 + uniform() * t.augment_zoom
    shift = 2 * t.augment_shift  # affine_grid's coordinates span [−1, 1]: a side is 2 units
    stretch = torch.exp(uniform() * math.log1p(t.augment_aspect))  # content width × s, height ÷ s
    c, s = torch.cos(angle), torch.sin(angle)
    # affine_grid maps output to input coordinates: the inverse of (rotate · scale(zoom·s, zoom/s))
    sx, sy = zoom * stretch, zoom / stretch
    theta = torch.stack([torch.stack([c / sx, -s / sx, uniform() * shift], 1),
                         torch.stack([s / sy, c / sy, uniform() * shift], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if t.augment_contrast:
        c = t.augment_contrast
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * (1 + uniform() * c).view(n, 1, 1, 1) + mean + (uniform() * c).view(n, 1, 1, 1)
        out = out.clamp(-1.0, 1.0)
    return out


def average_views(dp_model, views: int) -> None:
    """Fold per-sample gradients of ``views`` consecutive augmented copies of each example into
    their mean, before Opacus clips them: the clipped unit is still one training example, so the
    sensitivity (and the privacy accounting) is unchanged."""
    if views <= 1:
        return
    for p in dp_model.parameters():
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            continue
        if isinstance(gs, list):  # several backward passes before a step: not how train_epoch runs
            raise RuntimeError("grad_sample accumulated over several backward passes")
        p.grad_sample = gs.view(-1, views, *gs.shape[1:]).mean(dim=1)


class EMA:
    """Exponential moving average of a model's parameters over DP-SGD steps (with the usual
    warm-up ``min(decay, (1 + t) / (10 + t))``)."""

    def __init__(self, model, decay: float) -> None:
        self.decay, self.t = decay, 0
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model) -> None:
        d = min(self.decay, (1 + self.t) / (10 + self.t))
        self.t += 1
        for n, p in model.named_parameters():
            n = n.removeprefix("_module.")
            self.shadow[n].mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, model) -> None:
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n])
