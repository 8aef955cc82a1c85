"""The privacy unit: what DP-SGD samples and what the guarantee protects — a hospital's patients
(:class:`PatientUnits`, all of a patient's scans together) or its scans (:func:`privacy_units`,
:func:`plan_for`)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from xrayfed.client.dp.planning import DPPlan, plan_dp
from xrayfed.common.config import HospitalConfig
from xrayfed.common.errors import UserError
from xrayfed.common.privacy import NO_PATIENT_IDS


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
    units, unit = privacy_units(cfg, train)
    plan = plan_dp(cfg, len(units), unit, num_scans=len(train))
    if getattr(train, "patient_ids_known", False):
        plan = replace(plan, most_scans_of_one_patient=max(Counter(train.patient_ids).values()))
    return plan, units
