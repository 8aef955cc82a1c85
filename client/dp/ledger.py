"""The hospital's persistent privacy state: the ledger that charges every round before it trains
(:class:`PrivacyLedger`), the lock that serialises one round's decisions (:class:`StateLock`) and
the cache that resends a released update byte for byte (:class:`ReleaseCache`)."""

from __future__ import annotations

import hashlib
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from xrayfed.client.dp.noise import NOISE_SOURCE_SECURE, NOISE_SOURCE_TORCH
from xrayfed.client.dp.planning import BudgetExceeded, DPPlan
from xrayfed.common.config import HospitalConfig
from xrayfed.common.privacy.accounting import compute_epsilon
from xrayfed.common.privacy.ledger import LEDGER_FILE, append_record, read_ledger

log = logging.getLogger(__name__)


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
