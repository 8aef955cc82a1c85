"""``xrayfed audit``: an empirical lower bound on ε for this hospital's exact training code and
settings, and a membership-inference attack on the model it trains.

The hospital's plan (its ``hospital.toml``: ε, δ, C, batch, epochs, ``max_rounds``, privacy unit)
is trained once, in this process, by the same DP-SGD code a federation round runs
(:func:`xrayfed.client.dp.train_private_round`), for all ``max_rounds`` rounds the budget is
planned for. Nothing is charged and nothing leaves: no privacy ledger is opened, no update is
sent — the audit is a separate run, never a live federation's. Its result is written to
``state_dir/audit.json`` (or ``--out``), where the hospital's report finds it.

**White-box gradient canaries** (:class:`GradientCanaries`; the adversary sees every noised
step, which is what the accountant assumes is released — a round's update is post-processing of
them). m canaries, one per privacy unit (a scan, or a patient: one unit contributing one clipped
gradient per step whatever its scans), each in training with probability 1/2. An included canary
is Poisson-sampled at every step with the plan's rate q, like any unit; when sampled, its
gradient — a Dirac vector of norm :data:`CANARY_NORM` × C on its own model coordinate (m distinct
coordinates spread over every parameter) — is clipped by the optimizer's own clipping code and
summed with the step's units before the noise. After the noise the auditor reads each canary's
coordinate of the noised sum, minus the other units' clipped contributions (DP's adversary knows
every other unit): canary × sampled + noise. The score is the log-likelihood ratio of those
observations, sampled-at-rate-q against never, under the claimed σ.

**Two figures from the same guesses**, both at the stated confidence:

* the f-DP figure (:mod:`xrayfed.client.audit_fdp`, Mahloujifar, Melis & Chaudhuri):
  the ε of the DP-SGD (σ′, q, T) — the claimed mechanism's family, with the accountant's q and
  T — that this run is shown to be less private than. Above the claimed ε (by more than the
  accountants' tolerance) it proves the run is not the mechanism its ε was computed for. **This
  is the audit's test** (:func:`caught_by`).
* the (ε, δ) one-run lower bound (:mod:`xrayfed.common.privacy.audit`, Steinke, Nasr &
  Jagielski): a lower bound on the run's ε at the claimed δ, valid for any mechanism, but
  capped by δ (about 6.3 at δ = 10⁻⁵ and 95 %): it cannot catch anything at a claimed ε = 8. It
  is reported, not tested: a second test of the same guesses at the same β would raise the
  chance of a false alarm on correct code (up to 2β).

**Black-box input-space canaries** (``--auditor black-box``, :mod:`xrayfed.client.audit_input`;
the adversary sees only the final model). m of the hospital's own training units with their
labels changed, each in training with probability 1/2, the clean copies left out; the same plan
and training code, no gradient canaries; each canary scored by −loss on its changed label. A
weaker adversary, so a weaker bound: evidence about the released model, not about every step.

**Membership inference** (:func:`membership_auc`): the loss-based attack (score = −loss; per
patient the mean over their scans at the patient unit) on the trained model, training units
against the hospital's held-out validation units (patients the model never saw), beside the
same attack on a no-DP reference trained with the same plan and σ = 0. ``--attack lira`` adds the
few-shadow likelihood-ratio attack (:mod:`xrayfed.client.audit_shadows`: 2K more trainings).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xrayfed.client.audit_input import make_input_canaries, scan_losses, unit_groups, unit_means
from xrayfed.client.audit_shadows import DEFAULT_SHADOWS, check_shadows, run_lira
from xrayfed.client.dp import faults
from xrayfed.common.errors import UserError
from xrayfed.client import audit_fdp, audit_measured
from xrayfed.common.privacy.accounting import compute_epsilon, tolerance
from xrayfed.common.privacy.audit import AUDIT_FILE, AuditBound, attack_auc, audit, exceeds_claim, signal_check

log = logging.getLogger(__name__)

#: A canary's gradient before clipping, in units of C (≥ 1, so the clip is what bounds it).
CANARY_NORM = 10.0
#: Gradient canaries when ``--canaries`` is not given, or one per weight when the model has fewer.
#: More canaries: a tighter bound, more time (docs/privacy-audit.md: a run whose accountant was
#: told q/2 got an f-DP figure above its claim in 4 of 8 audits at 10 000, 9 of 10 at 40 000, for
#: about twice the time).
DEFAULT_CANARIES = 40_000
#: Canary rows clipped per call of the optimizer's clipping code (memory: rows × model weights floats).
CHUNK = 128
#: The auditors (``--auditor``) and what each adversary sees.
AUDITORS: dict[str, str] = {
    "white-box": "white-box gradient canaries (every noised DP-SGD step observed)",
    "black-box": "black-box input-space canaries (final model only)",
}
#: The membership attacks (``--attack``): ``lira`` runs the loss attack too.
ATTACKS: tuple[str, ...] = ("loss", "lira")


class GradientCanaries:
    """m Dirac gradient canaries on distinct coordinates of the optimizer's parameters.

    Attached to the hospital's DP optimizer (``train_private_round(..., canaries=...)``), which
    calls :meth:`insert` before its noise and :meth:`observe` after it, once per logical step.
    ``seed`` fixes which canaries are included, their coordinates and their sampling; the DP
    noise stays the product's own (CSPRNG)."""

    def __init__(self, m: int, sample_rate: float, seed: int | None = None) -> None:
        if m < 2:
            raise UserError(f"--canaries {m}: the audit needs at least 2 canaries")
        self.m = int(m)
        self.q = float(sample_rate)
        self.rng = np.random.default_rng(seed)
        self.included = self.rng.random(self.m) < 0.5
        self.llr = np.zeros(self.m)
        self.total = np.zeros(self.m)
        self.total_sq = np.zeros(self.m)
        self.steps = 0
        self.sampled = 0
        self._where: list[tuple[int, np.ndarray, np.ndarray]] | None = None  # (param, canary ids, flat index)
        self._before: np.ndarray | None = None

    def _place(self, params) -> None:
        sizes = [p.numel() for p in params]
        d = sum(sizes)
        if self.m > d:
            raise UserError(f"--canaries {self.m}: the model has only {d} weights (one canary per weight); use at "
                            f"most {d}")
        flat = np.sort(self.rng.choice(d, size=self.m, replace=False))
        self.rng.shuffle(flat)  # canary i ↦ coordinate flat[i], independent of inclusion
        starts = np.cumsum([0] + sizes)
        owner = np.searchsorted(starts, flat, side="right") - 1
        self._where = [(i, np.nonzero(owner == i)[0], flat[owner == i] - starts[i]) for i in range(len(params))]
        self._param, self._index = owner, flat - starts[owner]  # canary i: parameter and flat index there

    def _gather(self, tensors) -> np.ndarray:
        out = np.zeros(self.m)
        for (i, ids, idx), t in zip(self._where, tensors):
            if len(ids):
                out[ids] = t.detach().reshape(-1)[torch.as_tensor(idx, device=t.device)].double().cpu().numpy()
        return out

    def insert(self, opt) -> None:
        """Clip and add this step's sampled included canaries to ``opt``'s summed gradients with the
        optimizer's own clipping (``opt.clip_and_accumulate``)."""
        params = opt.params
        if self._where is None:
            self._place(params)
        self._before = self._gather([p.summed_grad for p in params])
        chosen = np.nonzero(self.included & (self.rng.random(self.m) < self.q))[0]
        self.sampled += len(chosen)
        if not len(chosen):
            return
        saved = [p.grad_sample for p in params]
        norm = CANARY_NORM * float(opt.max_grad_norm)
        try:
            for lo in range(0, len(chosen), CHUNK):
                part = chosen[lo:lo + CHUNK]
                for i, p in enumerate(params):
                    rows = torch.zeros(len(part), p.numel(), dtype=p.dtype, device=p.device)
                    mine = np.nonzero(self._param[part] == i)[0]
                    if len(mine):
                        rows[torch.as_tensor(mine, device=p.device),
                             torch.as_tensor(self._index[part[mine]], device=p.device)] = norm
                    p.grad_sample = rows.view(len(part), *p.shape)
                opt.clip_and_accumulate()
        finally:
            for p, g in zip(params, saved):
                p.grad_sample = g

    def observe(self, opt) -> None:
        """Read each canary's coordinate of the noised step (minus the other units' part): the
        canary's clipped contribution plus noise, in units of C."""
        x = (self._gather([p.grad for p in opt.params]) - self._before) / float(opt.max_grad_norm)
        sigma = float(opt.noise_multiplier)
        self.total += x
        self.total_sq += x * x
        if sigma > 0:
            self.llr += np.logaddexp(math.log1p(-self.q) if self.q < 1 else -np.inf,
                                     math.log(self.q) + (x - 0.5) / sigma**2)
        self.steps += 1

    def scores(self) -> np.ndarray:
        """One score per canary, higher = "more likely in": the log-likelihood ratio of its
        observations (σ > 0), else their sum."""
        return self.llr.copy() if np.any(self.llr) else self.total.copy()


def claimed_epsilon(plan) -> float:
    """The ε the hospital's accountant states for the whole plan (``max_rounds`` rounds)."""
    step = (plan.noise_multiplier, faults.accountant_rate(plan.sample_rate), plan.steps)
    return compute_epsilon([step] * plan.max_rounds, plan.delta, plan.accountant)


def fdp_bound(scores: np.ndarray, included: np.ndarray, plan, confidence: float) -> audit_fdp.FdpBound:
    """The f-DP one-run bound (:mod:`xrayfed.client.audit_fdp`) against the family of the
    claimed mechanism: DP-SGD with the accountant's σ, sample rate and total step count."""
    claimed = (plan.noise_multiplier, faults.accountant_rate(plan.sample_rate), plan.steps * plan.max_rounds)
    return audit_fdp.audit(scores, included, plan.delta, claimed, confidence)


def _unit_scores(model, dataset, unit: str, task, device) -> np.ndarray:
    """−loss per scan, or per patient (mean over their scans) at the patient unit."""
    return unit_means(-scan_losses(model, dataset, task, device), unit_groups(dataset, unit))


def _finite(scores: np.ndarray) -> np.ndarray:
    """Scores the bound can rank: a diverged model's NaN loss ranks lowest, ±inf at ±1e300."""
    return np.clip(np.nan_to_num(scores, nan=-1e300, posinf=1e300, neginf=-1e300), -1e300, 1e300)


def check_choices(auditor: str, attack: str, shadows: int) -> None:
    """One :class:`UserError` line for an unknown auditor or attack or an unusable shadow count."""
    if auditor not in AUDITORS:
        raise UserError(f"--auditor {auditor}: choose white-box (gradient canaries, every noised step seen) or "
                        "black-box (input-space canaries, the final model only)")
    if attack not in ATTACKS:
        raise UserError(f"--attack {attack}: choose loss or lira (the loss attack plus a few-shadow LiRA)")
    if attack == "lira":
        check_shadows(shadows)


def membership_auc(model, train, held_out, unit: str, task, device) -> dict[str, Any]:
    """Loss-based membership inference: AUC of −loss separating training from held-out units
    (0.5 = no better than a coin)."""
    a = _unit_scores(model, train, unit, task, device)
    b = _unit_scores(model, held_out, unit, task, device)
    return {"auc": attack_auc(a, b), "members": int(len(a)), "non_members": int(len(b))}


#: The names :func:`caught_by` gives the audit's tests.
FDP_TEST, MEASURED_TEST, SIGNAL_TEST = "f-DP figure", "measured ε", "signal check"


def caught_by(claimed: float, fdp_epsilon: float | None, ratio_lower: float | None = None,
              measured_epsilon: float | None = None) -> list[str]:
    """The audit's decision: the tests that caught the run (empty: not caught). :data:`FDP_TEST`
    when the f-DP figure exceeds the claim (:func:`~xrayfed.common.privacy.audit.exceeds_claim`); white-box only (``None``
    for black-box): :data:`MEASURED_TEST` when the measured-mechanism figure
    (:mod:`xrayfed.client.audit_measured`) exceeds it by the same rule, :data:`SIGNAL_TEST` when
    the canary signal-to-noise check's lower bound is above what the accountant's inputs imply
    (``ratio_lower`` > 1). The (ε, δ) lower bound is not an input on purpose: testing it too, on
    the same guesses at the same β, would raise the false-alarm rate on correct code (up to 2β);
    it is reported beside the decision."""
    out = [FDP_TEST] if exceeds_claim(claimed, fdp_epsilon) else []
    if exceeds_claim(claimed, measured_epsilon):
        out.append(MEASURED_TEST)
    if ratio_lower is not None and ratio_lower > 1.0:
        out.append(SIGNAL_TEST)
    return out


def decision(claimed: float, fdp_epsilon: float | None, eps_delta_bound: float,
             ratio_lower: float | None = None, measured_epsilon: float | None = None) -> dict[str, Any]:
    """The result's decision fields: ``exceeds_claim`` (the f-DP test's outcome),
    ``measured_exceeds_claim`` (the measured figure's, white-box), ``eps_delta_exceeds_claim``
    (the (ε, δ) bound's own comparison, reported only), ``caught`` and ``caught_by``
    (:func:`caught_by`)."""
    tests = caught_by(claimed, fdp_epsilon, ratio_lower, measured_epsilon)
    return {"exceeds_claim": exceeds_claim(claimed, fdp_epsilon),
            "measured_exceeds_claim": exceeds_claim(claimed, measured_epsilon),
            "eps_delta_exceeds_claim": bool(eps_delta_bound > claimed), "caught": bool(tests), "caught_by": tests}


def verdict(claimed: float, fdp_epsilon: float, bound: float, confidence: float, ratio_lower: float | None = None,
            check_confidence: float = 0.999, measured_epsilon: float | None = None) -> str:
    """The audit's result in plain words: the f-DP figure ``fdp_epsilon`` decides (with, white-box,
    the measured figure ``measured_epsilon`` and the signal check's ``ratio_lower``, both at
    ``check_confidence``; :func:`caught_by`); the (ε, δ) lower bound ``bound`` is stated beside it."""
    pct = f"{100 * confidence:g} %"
    tests = caught_by(claimed, fdp_epsilon, ratio_lower, measured_epsilon)
    figures = f"f-DP figure {fdp_epsilon:.2f}, (ε, δ) lower bound {bound:.2f} at {pct} confidence"
    measured_note = ("" if measured_epsilon is None else
                     f"; measured ε ≥ {measured_epsilon:.2f} at {100 * check_confidence:g} % confidence")
    if FDP_TEST in tests:
        return (f"the audit found evidence that ε is LARGER than claimed: the training is LESS private than DP-SGD "
                f"at ε = {fdp_epsilon:.2f} would be ({pct} confidence), against the claimed ε = {claimed:.2f} "
                f"(the (ε, δ) lower bound is {bound:.2f}{measured_note}); the training does not keep its privacy "
                "promise (a bug or a misconfiguration): do not train with it")
    if MEASURED_TEST in tests:
        return (f"the audit MEASURED the training spending more privacy than claimed: its canaries show DP-SGD at "
                f"ε ≥ {measured_epsilon:.2f} (at {100 * check_confidence:g} % confidence) against the claimed "
                f"ε = {claimed:.2f} (a bug or a misconfiguration; {figures}): do not train with it")
    if SIGNAL_TEST in tests:
        return (f"the audit found that training gives a canary at least {ratio_lower:.2f}× the weight its "
                f"accountant was told (at {100 * check_confidence:g} % confidence): the claimed ε = {claimed:.2f} "
                f"understates the privacy cost (a bug or a misconfiguration; {figures}): do not train with it")
    if measured_epsilon is not None:
        figures += f", measured ε ≥ {measured_epsilon:.2f} at {100 * check_confidence:g} %"
    s = (f"the audit found no evidence ε is larger than claimed: {figures} vs claimed {claimed:.2f}")
    if fdp_epsilon > claimed:
        s += f" (the f-DP figure is above the claim by less than the accountants' tolerance {tolerance(claimed):.2f})"
    if bound > claimed:
        s += ("; the (ε, δ) lower bound is above the claim, but it is not one of the audit's tests (another test "
              "of the same guesses would raise the false-alarm rate): rerun the audit with another --seed")
    return s + "; a lower bound can reveal a bug, never prove its absence"


def run_audit(cfg, *, image_size: int, model_spec=None, lr: float = 0.125, canaries: int | None = None,
              confidence: float = 0.95, mia: bool = True, seed: int | None = None, ds=None,
              device: str | None = None, attack_model=None, attack_model_name: str = "",
              auditor: str = "white-box", attack: str = "loss", shadows: int = DEFAULT_SHADOWS) -> dict[str, Any]:
    """Train ``cfg``'s whole plan once with ``auditor``'s canaries (:data:`AUDITORS`; ``canaries``
    None: :data:`DEFAULT_CANARIES` gradient canaries, one per weight at most, or the input-space
    default) and return the
    audit result (the content of ``audit.json``). ``ds``: the ``data.split`` scans at
    ``image_size`` when already loaded. ``attack_model``: a finished run's global model (a torch
    module) for the membership attack, instead of the model the audit trains; ``attack``
    (:data:`ATTACKS`) ``lira`` adds LiRA with ``shadows`` shadow models. Nothing is charged: no
    ledger is opened, nothing is written."""
    from xrayfed.client.dp import plan_for, privacy_units, train_private_round
    from xrayfed.client.hospital import hospital_split
    from xrayfed.common import data as data_mod
    from xrayfed.common.model import build_model
    from xrayfed.common.modelspec import default_model
    from xrayfed.common.train import resolve_device

    check_choices(auditor, attack, shadows)
    if not 0.5 <= confidence < 1:
        raise UserError(f"--confidence {confidence:g}: must be in [0.5, 1)")
    if cfg.data.path is None:
        raise UserError("data.path: not set (give --data PATH or [data] path in hospital.toml)")
    t0 = time.time()
    if ds is None:
        d = cfg.data  # the scans the hospital's rounds train on (classes, local test split)
        ds = data_mod.load_dataset(Path(d.path), split=d.split, image_size=image_size, label_set=d.labels, seed=d.seed,
                                   test_fraction=d.local_test_fraction)
    _, train, val = hospital_split(cfg, ds)
    plan, units = plan_for(cfg, train)
    task = ds.task
    dev = resolve_device(device or cfg.hospital.device)
    spec = model_spec or default_model(image_size, task.num_outputs)
    if seed is not None:
        torch.manual_seed(seed)
    model = build_model(spec)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    claimed = claimed_epsilon(plan)
    total_steps = plan.steps * plan.max_rounds
    n_units = len(unit_groups(train, plan.unit))
    members_mask = np.ones(n_units, dtype=bool)  # the units the audited model trained on as they are
    members = train
    if auditor == "white-box":
        if canaries is None:
            canaries = min(DEFAULT_CANARIES, sum(p.numel() for p in model.parameters() if p.requires_grad))
        probe = GradientCanaries(canaries, plan.sample_rate, seed)
        for r in range(1, plan.max_rounds + 1):
            train_private_round(model, units, cfg, plan, task, dev, lr=lr, canaries=probe,
                                desc=f"audit round {r}/{plan.max_rounds}")
        scores = probe.scores()
        bound: AuditBound = audit(scores, probe.included, plan.delta, confidence)
        fdp = fdp_bound(scores, probe.included, plan, confidence)
        implied = faults.accountant_rate(plan.sample_rate) * math.sqrt(total_steps) / plan.noise_multiplier
        check = signal_check(probe.total, probe.included, implied)
        measured = audit_measured.measure(probe.total, probe.total_sq, probe.included, probe.steps, plan.delta,
                                          check.confidence)
        extra: dict[str, Any] = {"signal_check": check.to_dict(), "canary_samples": probe.sampled, "steps": probe.steps}
        ratio, check_conf = check.ratio_lower, check.confidence
        measured_eps: float | None = measured.epsilon_lower_bound
    else:
        inputs = make_input_canaries(train, plan.unit, canaries, seed)
        audited, unit = privacy_units(cfg, inputs.training)
        assert unit == plan.unit
        for r in range(1, plan.max_rounds + 1):
            train_private_round(model, audited, cfg, plan, task, dev, lr=lr,
                                desc=f"black-box audit round {r}/{plan.max_rounds}")
        scores = _finite(inputs.scores(model, task, dev))
        bound = audit(scores, inputs.included, plan.delta, confidence)
        fdp = fdp_bound(scores, inputs.included, plan, confidence)
        extra = {"steps": total_steps, "canary_scans": int(len(inputs.owner)),
                 "units_trained": len(audited)}
        ratio, check_conf = None, 0.999  # no signal check, no measured figure: the f-DP test alone decides
        measured, measured_eps = None, None
        if attack_model is None:
            members_mask[inputs.chosen] = False
            members = inputs.members
    decided = decision(claimed, fdp.epsilon_lower_bound, bound.epsilon_lower_bound, ratio, measured_eps)
    out: dict[str, Any] = {
        "hospital": cfg.hospital.name, "data": str(cfg.data.path), "unit": plan.unit,
        "claimed_epsilon": claimed, "delta": plan.delta,
        "audited_lower_bound": bound.epsilon_lower_bound, "confidence": confidence,
        "audited_lower_bound_fdp": fdp.epsilon_lower_bound, "fdp": fdp.to_dict(),
        **({"audited_lower_bound_measured": measured_eps, "measured": measured.to_dict()} if measured else {}),
        **{k: decided[k] for k in ("exceeds_claim", "measured_exceeds_claim", "eps_delta_exceeds_claim")},
        **({"signal_check": extra.pop("signal_check")} if "signal_check" in extra else {}),
        **{k: decided[k] for k in ("caught", "caught_by")}, "auditor": AUDITORS[auditor],
        "canaries": bound.canaries, "canaries_included": bound.included, "guesses": bound.guesses,
        "correct_guesses": bound.correct, **extra,
        "plan": {"noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
                 "accountant_sample_rate": faults.accountant_rate(plan.sample_rate), "steps_per_round": plan.steps,
                 "max_rounds": plan.max_rounds, "max_grad_norm": plan.max_grad_norm,
                 "units": plan.num_examples, "scans": plan.num_scans, "accountant": plan.accountant},
        "image_size": image_size, "lr": lr, "broken": faults.active(),
    }
    if mia:
        if val is None or len(val) == 0:
            out["mia"] = {"skipped": f"no held-out units (data.val_fraction = {cfg.data.val_fraction:g})"}
        elif len(members) == 0:
            out["mia"] = {"skipped": f"every training {plan.unit} is a canary: no member left to attack"}
        else:
            attacked = model if attack_model is None else attack_model.to(dev)
            dp_mia = membership_auc(attacked, members, val, plan.unit, task, dev)

            def fresh():
                m = build_model(spec)
                m.load_state_dict(init)
                return m

            ref = fresh()
            for r in range(1, plan.max_rounds + 1):  # the no-DP reference: same plan, σ = 0, no canaries
                train_private_round(ref, units, cfg, replace(plan, noise_multiplier=0.0), task, dev, lr=lr,
                                    desc=f"no-DP reference round {r}/{plan.max_rounds}")
            out["mia"] = {"attack": "loss", "auc_dp": dp_mia["auc"],
                          "model": attack_model_name or "the model the audit trained",
                          "auc_no_dp": membership_auc(ref, train, val, plan.unit, task, dev)["auc"],
                          "members": dp_mia["members"], "non_members": dp_mia["non_members"]}
            if attack == "lira":
                out["mia"]["lira"] = run_lira(
                    cfg, plan, fresh, task, dev, lr, train, val, plan.unit,
                    {"dp": (attacked, members_mask), "no_dp": (ref, np.ones(n_units, dtype=bool))}, shadows, seed)
    out["wall_s"] = round(time.time() - t0, 1)
    out["verdict"] = verdict(claimed, fdp.epsilon_lower_bound, bound.epsilon_lower_bound, confidence, ratio,
                             check_conf, measured_eps)
    return out


def fdp_line(res: dict[str, Any]) -> str:
    """The f-DP figure's line of :func:`summary_lines`: the family, the curve it rejected, the
    confidence and the guesses (r, v) that rejected it."""
    f = res["fdp"]
    family = {"dp-sgd": "DP-SGD"}.get(f["family"], f["family"])
    pct = f"{100 * f['confidence']:g} %"
    head = f"claimed ε = {res['claimed_epsilon']:.2f} (δ = {res['delta']:g}); f-DP figure "
    c = f.get("curve")
    if not c:
        return (head + f"{f['epsilon_lower_bound']:.2f}: no {family} curve rejected at {pct} confidence "
                "(the guesses show nothing the claimed mechanism could not produce)")
    return (head + f"{f['epsilon_lower_bound']:.2f} at {pct} confidence: the run is less private than "
            f"{family} with σ′ = {c['noise_multiplier']:.3g}, q = {c['sample_rate']:.3g}, {c['steps']} steps "
            f"would be (that curve rejected by {f['correct']} of {f['guesses']} guesses right)")


def measured_line(res: dict[str, Any]) -> str:
    """The measured-mechanism figure's line of :func:`summary_lines` (white-box)."""
    me = res["measured"]
    pct = f"{100 * me['confidence']:g} %"
    if me["epsilon_lower_bound"] <= 0:
        head = f"measured ε: no lower bound above 0 at {pct} confidence (the canaries' signal is within its noise)"
    else:
        head = f"measured ε ≥ {me['epsilon_lower_bound']:.2f} at {pct} confidence"
    p = res["plan"]
    told_q = p.get("accountant_sample_rate", p["sample_rate"])
    return (head + f"; the canaries measured DP-SGD with noise {me['noise']:.3g}·C on a clipped contribution of "
            f"{me['contribution']:.3g}·C (noise multiplier {me['noise_multiplier']:.3g}, the accountant's "
            f"{p['noise_multiplier']:.3g}), sample rate {me['sample_rate']:.3g} (the accountant's {told_q:.3g}), "
            f"{me['steps']} steps: ε ≈ {me['epsilon_estimate']:.2f}")


def summary_lines(res: dict[str, Any]) -> list[str]:
    """What ``xrayfed audit`` prints."""
    p = res["plan"]
    kind = str(res.get("auditor", AUDITORS["white-box"])).split()[0]
    how = (f"the black-box auditor: {res['canaries']} input-space canaries (final model only)" if kind == "black-box"
           else f"the white-box auditor: {res['canaries']} gradient canaries (every noised step observed)")
    lines = [
        f"hospital {res['hospital']}: audited its plan ({p['max_rounds']} round(s) × {p['steps_per_round']} DP-SGD "
        f"steps, σ = {p['noise_multiplier']:.3g}, q = {p['sample_rate']:.3g}, C = {p['max_grad_norm']:g}, "
        f"unit {res['unit']}) with {how}; nothing was charged",
        fdp_line(res),
        f"(ε, δ) one-run lower bound {res['audited_lower_bound']:.2f} at δ = {res['delta']:g}, "
        f"{100 * res['confidence']:g} % confidence ({res['correct_guesses']} of {res['guesses']} guesses right; "
        "reported, not one of the audit's tests)",
    ]
    me = res.get("measured")
    if me:
        lines.append(measured_line(res))
    sc = res.get("signal_check")
    if sc:
        lines.append(f"canary signal-to-noise: measured {sc['measured']:.3g} (at least {sc['measured_lower']:.3g} at "
                     f"{100 * sc['confidence']:g} % confidence); the accountant's σ and q imply {sc['implied']:.3g}")
    mia = res.get("mia") or {}
    if "auc_dp" in mia:
        on = "the DP model" if mia.get("model", "").startswith("the model") else f"the DP model {mia['model']}"
        lines.append(f"membership inference (loss attack, {mia['members']} training vs {mia['non_members']} held-out "
                     f"{res['unit']}s): AUC {mia['auc_dp']:.3f} on {on}, {mia['auc_no_dp']:.3f} without DP "
                     "(0.5 = a coin)")
        lira = mia.get("lira")
        if lira:
            lines.append(f"membership inference (LiRA, {lira['shadows']} shadow models with DP and {lira['shadows']} "
                         f"without: {lira['trainings']} more trainings of the plan): AUC {lira['auc_dp']:.3f} on "
                         f"{on}, {lira['auc_no_dp']:.3f} without DP; true-positive rate at 1 % false positives "
                         f"{lira['tpr_at_1pct_fpr_dp']:.3f} with DP, {lira['tpr_at_1pct_fpr_no_dp']:.3f} without")
    elif "skipped" in mia:
        lines.append(f"membership inference skipped: {mia['skipped']}")
    lines.append(res["verdict"])
    return lines


def run_audit_cmd(args: argparse.Namespace) -> int:
    """``xrayfed audit --config hospital.toml [--auditor white-box|black-box] [--canaries M]
    [--attack loss|lira] [--shadows K] [--out audit.json]``."""
    from xrayfed.common.config import FederationConfig, HospitalConfig, load_config

    check_choices(args.auditor, args.attack, args.shadows)
    if args.canaries is not None and args.canaries < 2:
        raise UserError(f"--canaries {args.canaries}: the audit needs at least 2 canaries")
    cfg = load_config(HospitalConfig, args.config, {"data.path": args.data, "hospital.device": args.device})
    spec, image_size, lr = None, 224, 0.125
    if args.federation is not None:
        fed = load_config(FederationConfig, args.federation)
        spec, image_size, lr = fed.model, fed.image_size, fed.federation.lr
    attack, attack_name = None, ""
    if args.model is not None:  # a finished run's global model: the membership attack's target
        from xrayfed.common.checkpoint import load_weights
        from xrayfed.common.model import build_model
        from xrayfed.common.security.atrest import load_checkpoint, load_key

        ckpt = load_checkpoint(args.model, load_key(getattr(args, "atrest_key_file", None)))
        attack, attack_name = build_model(ckpt.model), f"{args.model.name} (round {ckpt.round})"
        load_weights(attack, ckpt.state_dict, what=f"checkpoint {args.model}")
        spec, image_size = ckpt.model, ckpt.image_size
    if args.image_size is not None:
        if attack is not None and args.image_size != image_size:
            raise UserError(f"--image-size {args.image_size}: the model {args.model} takes {image_size} px scans")
        if not 8 <= args.image_size <= 2048:
            raise UserError(f"--image-size {args.image_size}: must be in 8..2048")
        if spec is not None and args.image_size != image_size:
            spec = None  # the federation's model is for its own image size: the recommended one for this size
        image_size = args.image_size
    if args.lr is not None:
        if not (math.isfinite(args.lr) and args.lr > 0):
            raise UserError(f"--lr {args.lr:g}: must be positive")
        lr = args.lr
    out = args.out if args.out is not None else Path(cfg.hospital.state_dir) / AUDIT_FILE
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name such as audit.json")
    res = run_audit(cfg, image_size=image_size, model_spec=spec, lr=lr, canaries=args.canaries,
                    confidence=args.confidence, mia=not args.no_mia, seed=args.seed, attack_model=attack,
                    attack_model_name=attack_name, auditor=args.auditor, attack=args.attack, shadows=args.shadows)
    for line in summary_lines(res):
        print(line)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
    return 0
