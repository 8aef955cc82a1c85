"""Synthetic federation run directories for report tests (no patient data, no training).

The hospital ledgers are written with the real :class:`PrivacyLedger` API (``ensure_header``,
``charge``, ``record_release``, ``note``), and ``metrics.jsonl`` follows the server's schema (one
row per round, every hospital's reported ε, what protected the run), so a report built from them
sees exactly what a real run produces.

``restart_round``: the server is killed in that round after every hospital released its update,
and restarted from the previous round's checkpoint; each hospital gets the same request again and
resends the update it was charged for. That is what a real restart writes
(tests/test_faults.py): the ledger's lines for the round are ``train``, ``release``, ``resend``,
and metrics.jsonl has one row for the round (the interrupted attempt wrote none) with status
``resent``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from xrayfed.client.dp import BudgetExceeded, PrivacyLedger, plan_dp, request_key
from xrayfed.common.config import FederationConfig, HospitalConfig, dump_toml, load_config


@dataclass
class Site:
    name: str
    n: int  # training images
    epsilon: float = 8.0
    max_rounds: int = 5
    delta: float = 1e-5
    batch_size: int = 64
    noise_multiplier: float | None = None  # None: derived from the budget (slower)
    secure_rng: bool = True
    accountant: str = "prv"


def hospital_config(site: Site, state_dir: Path) -> HospitalConfig:
    return load_config(HospitalConfig, None, {
        "hospital.name": site.name, "hospital.state_dir": str(state_dir),
        "privacy.epsilon": site.epsilon, "privacy.delta": site.delta, "privacy.max_rounds": site.max_rounds,
        "privacy.noise_multiplier": site.noise_multiplier, "privacy.secure_rng": site.secure_rng,
        "privacy.accountant": site.accountant, "training.batch_size": site.batch_size, "training.local_epochs": 1.0,
    })


def default_auc(r: int) -> float:
    return round(0.93 - 0.33 * 0.62 ** r, 4)


SECURITY = {"transport": "grpc", "tls": True, "hospital_auth": True, "secure_aggregation": False,
            "encrypted_at_rest": True}


def make_run(run_dir: Path, sites: list[Site], rounds: int, federation: str = "synthetic",
             auc=default_auc, ledgers: bool = True, restart_round: int | None = None,
             security: dict | None = SECURITY) -> Path:
    """Write RUN_DIR (federation.toml, metrics.jsonl, checkpoints/, hospitals/NAME/ ledgers)."""
    run_dir = Path(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    fed = FederationConfig.model_validate({"federation": {"name": federation, "run_dir": str(run_dir),
                                                          "rounds": rounds, "min_clients": len(sites)}})
    (run_dir / "federation.toml").write_text(dump_toml(fed), encoding="utf-8")
    state = {}
    for i, s in enumerate(sites):
        cfg = hospital_config(s, run_dir / "hospitals" / s.name)
        plan = plan_dp(cfg, s.n)
        ledger = PrivacyLedger(cfg.hospital.state_dir, cfg)
        ledger.ensure_header(plan)
        state[s.name] = (cfg, plan, ledger, 1000 + i)
    t0 = datetime(2025, 3, 1, 9, 0, tzinfo=timezone.utc)
    rows = []
    for r in range(1, rounds + 1):
        hs = []
        for s in sites:
            cfg, plan, ledger, node = state[s.name]
            key = request_key(federation, r, "v")
            try:
                charge = ledger.charge(plan, federation=federation, server_round=r, key=key)
                ledger.record_release(charge, f"{s.name}-{r}".encode().hex())
                status = "trained"
                if r == restart_round:  # the same request after the restart: the same update again
                    ledger.note("resend", federation=federation, round=r, request=key)
                    status = "resent"
            except BudgetExceeded:
                status = "refused"
            hs.append({
                "hospital": s.name, "node_id": node, "status": status,
                "epsilon": ledger.records[-1]["epsilon"],  # = ledger.spent(), what the hospital reports
                "delta": plan.delta, "epsilon_budget": plan.epsilon_budget, "num_examples": plan.num_examples,
                "train_loss": round(0.69 - 0.04 * r, 4) if status == "trained" else 0.0,
                "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate, "steps": plan.steps,
                "max_grad_norm": plan.max_grad_norm, "secure_rng": bool(cfg.privacy.secure_rng),
                "accountant": plan.accountant,
            })
        a = auc(r)
        rows.append({
            "round": r, "time": (t0 + timedelta(minutes=7 * r)).isoformat(timespec="seconds"),
            "run_id": "synthetic-0001", "federation": federation, "duration_s": 412.5,
            "hospitals": hs, "participants": [h["hospital"] for h in hs if h["status"] in ("trained", "resent")],
            "max_epsilon": max(h["epsilon"] for h in hs),
            "eval": {"auc": a, "accuracy": round(a - 0.08, 4), "sensitivity": round(a - 0.03, 4),
                     "specificity": round(a - 0.12, 4), "loss": round(1.1 - a, 4)},
            "client_eval": {"auc": round(a - 0.02, 4), "accuracy": round(a - 0.1, 4)},
            **({"security": dict(security)} if security is not None else {}),
        })
    with (run_dir / "metrics.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    if not ledgers:
        import shutil

        shutil.rmtree(run_dir / "hospitals")
    return run_dir
