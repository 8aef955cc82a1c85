"""What ``xrayfed client`` checks and says about this hospital before and after a federation: that
its data and DP plan can be used (:func:`check_data`), and what it spent (:func:`spent_line`).
Used by ``xrayfed client`` (:mod:`xrayfed.client.supernode`) and by the hospital's warm worker
(:mod:`xrayfed.client.worker`), which runs them where torch and the accountant are already loaded."""

from __future__ import annotations

from pathlib import Path

from xrayfed.common.errors import UserError


def check_data(cfg, say=None):
    """Fail before joining when the data or the privacy plan cannot be used; returns the DP plan
    (:class:`~xrayfed.client.dp.DPPlan`) for this hospital's training scans after its partition
    and validation split. ``say``: where its lines go (default: printed).

    Refused here, with one line: no usable scan, δ ≥ 1/N, a budget no noise level can meet,
    a plan longer than the accountant composes (:func:`xrayfed.client.dp.plan_for`).
    """

    from xrayfed.client.dp import plan_for  # torch: not in the ClientApp's run-finished stage
    from xrayfed.client.hospital import hospital_split

    if cfg.data.path is None:
        raise UserError("data: no path (give --data PATH or [data] path in hospital.toml)")
    if not Path(cfg.data.path).exists():
        raise UserError(f"data: no such file or folder {cfg.data.path}")
    d = cfg.data
    ds, train, val = hospital_split(cfg)
    skipped = len(getattr(ds, "skipped", []))
    plan, _ = plan_for(cfg, train)
    say = say or (lambda line: print(line, flush=True))
    where = f"part {d.partition} ({d.partition_scheme}) of {d.path}" if d.partition else str(d.path)
    say(f"[xrayfed] {cfg.hospital.name}: {len(ds)} usable scans in {where} ({d.split})"
        + (f", {skipped} unreadable file(s) skipped" if skipped else "")
        + f"; {len(train)} for DP training, {0 if val is None else len(val)} for validation; "
        f"privacy unit: {plan.unit} (N = {plan.num_examples} {plan.unit_plural}); "
        f"plan: σ = {plan.noise_multiplier:.3f}, q = {plan.sample_rate:.4g}, {plan.steps} steps/round, "
        f"{plan.max_rounds} rounds for ε = {plan.epsilon_budget:g} at δ = {plan.delta:g}")
    if val is None:
        say(f"[xrayfed] {cfg.hospital.name}: no validation scans (data.val_fraction = {d.val_fraction:g}): this "
            "hospital sends no evaluation metrics (it never evaluates on its DP-protected training scans)")
    return plan


def spent_line(records: list[dict], cfg) -> str:
    """What this hospital spent, in words, from its own ledger ``records``: ε of the budget, the
    privacy unit, and whether the budget can pay for another round like its last one."""
    from xrayfed.common.privacy.accounting import compute_epsilon

    header = next((r for r in reversed(records) if r.get("event") == "budget"), {})
    budget = float(header.get("epsilon_budget", cfg.privacy.epsilon))
    delta = float(header.get("delta", cfg.privacy.delta))
    unit = header.get("unit") or getattr(cfg.privacy, "unit", None) or "patient"
    trains = [r for r in records if r.get("event") == "train"]
    if not trains:
        return f"this hospital trained no round (ε = 0 of {budget:.2f}, per {unit})"
    history = [(float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"])) for r in trains]
    accountant = str(trains[-1].get("accountant") or cfg.privacy.accountant)
    eps = compute_epsilon(history, delta, accountant)
    line = (f"this hospital spent ε = {eps:.2f} of {budget:.2f} (per {unit}, δ = {delta:g}) in "
            f"{len(trains)} round{'' if len(trains) == 1 else 's'}")
    if compute_epsilon(history + history[-1:], delta, accountant) > budget:
        line += "; its budget cannot pay for another round"
    return line
