"""One round of DP-SGD at a hospital with Opacus: per-unit clipping to C, Gaussian noise σC,
Poisson sampling at rate q, memory bounded by ``BatchMemoryManager`` (:func:`train_private_round`);
the per-sample gradients of one unit's rows (a patient's scans, an example's augmented views)
are folded into their mean before clipping (:func:`average_views`)."""

from __future__ import annotations

import logging
import math
import os
import time

import torch

from xrayfed.client.augment import EMA, random_view
from xrayfed.client.dp import faults
from xrayfed.client.dp.noise import secure_gaussian_like
from xrayfed.client.dp.planning import DPPlan
from xrayfed.common.config import HospitalConfig
from xrayfed.common.errors import UserError
from xrayfed.common.model import feature_cache

log = logging.getLogger(__name__)


def _optimizer_class():
    from opacus.optimizers import DPOptimizer

    class HospitalDPOptimizer(DPOptimizer):
        """Opacus DPOptimizer with CSPRNG noise (optional) and a FedProx term added after
        noising (the proximal gradient μ(w − w_global) is data-independent: post-processing).
        ``canaries`` (the privacy audit only, :class:`xrayfed.client.audit.GradientCanaries`):
        gradient canaries clipped and summed with the step's units before the noise, and the
        noised step observed after it."""

        def __init__(self, *args, secure_rng: bool = True, prox_mu: float = 0.0, prox_ref=None, canaries=None,
                     **kw):
            super().__init__(*args, **kw)
            self.secure_rng = secure_rng
            self.prox_mu = prox_mu
            self.prox_ref = prox_ref
            self.canaries = canaries

        def clip_and_accumulate(self):
            if faults.clipping_on():
                return super().clip_and_accumulate()
            c, self.max_grad_norm = self.max_grad_norm, float("inf")  # benchmark-only fault: factor 1 for all
            try:
                return super().clip_and_accumulate()
            finally:
                self.max_grad_norm = c

        def add_noise(self):
            if self.canaries is not None:
                self.canaries.insert(self)
            self._add_noise()
            if self.canaries is not None:
                self.canaries.observe(self)

        def _add_noise(self):
            if not self.secure_rng:
                if faults.noise_scale() == 1.0:
                    return super().add_noise()
                m, self.noise_multiplier = self.noise_multiplier, self.noise_multiplier * faults.noise_scale()
                try:
                    return super().add_noise()
                finally:
                    self.noise_multiplier = m
            std = self.noise_multiplier * self.max_grad_norm * faults.noise_scale()
            for p in self.params:
                noise = secure_gaussian_like(p.summed_grad, std) if std > 0 else torch.zeros_like(p.summed_grad)
                p.grad = (p.summed_grad + noise).view_as(p)

        def scale_grad(self):
            super().scale_grad()
            if self.prox_mu > 0 and self.prox_ref is not None:
                for p, ref in zip(self.params, self.prox_ref):
                    p.grad += self.prox_mu * (p.detach() - ref)

    return HospitalDPOptimizer


def make_private(model, optimizer, dataset, plan: DPPlan, *, secure_rng: bool = True, prox_mu: float = 0.0,
                 canaries=None):
    """Wrap model/optimizer/data for DP-SGD under ``plan``.

    Returns ``(dp_model, dp_optimizer, make_loader)``; ``make_loader(steps)`` is a data loader
    yielding exactly ``steps`` Poisson-sampled logical batches (rate q), all loaders drawing
    from one generator seeded from ``os.urandom``.
    """
    from opacus import GradSampleModule
    from opacus.data_loader import wrap_collate_with_empty
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from opacus.validators import ModuleValidator

    from xrayfed.common.model.standardization import register_ws_grad_sampler

    register_ws_grad_sampler()
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
        canaries=canaries,
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
                        prox_mu: float = 0.0, desc: str | None = None, canaries=None) -> dict:
    """One round of DP-SGD at this hospital (the caller has already charged the ledger).

    ``model`` is updated in place (plain module, no Opacus wrapper left behind).
    The round's ``plan.steps`` DP-SGD steps are run as local epochs of ⌈1/q⌉ steps (the last
    one shorter), with a progress bar per epoch on a terminal and a log line per epoch.
    ``canaries``: the privacy audit's gradient canaries (:mod:`xrayfed.client.audit`), never set in
    a hospital's round. Returns ``{"loss", "examples", "steps", "seconds"}``.
    """
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    from xrayfed.common.cores import CoreShare
    from xrayfed.common.train import make_optimizer, train_epoch

    t0 = time.time()
    model.to(device)
    opt = make_optimizer(model, cfg.training.optimizer, lr, cfg.training.momentum)
    dp_model, dp_opt, make_loader = make_private(model, opt, dataset, plan, secure_rng=cfg.privacy.secure_rng,
                                                 prox_mu=prox_mu, canaries=canaries)
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
    share = CoreShare()  # co-located hospitals take the cores the others leave idle (xrayfed.common.cores)

    def after_step() -> None:
        if ema is not None and not dp_opt._is_last_step_skipped:  # a real step, not BatchMemoryManager's partial one
            ema.update(dp_model)
        share.adjust()

    hooks["after_step"] = after_step
    total_loss, seen = 0.0, 0
    with share:
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
