"""The one training loop and the one evaluation loop (used by hospitals, server-side
evaluation and the benchmarks, with or without DP)."""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Callable, Iterable

import numpy as np
import torch

from xrayfed.common.errors import UserError
from xrayfed.common.prediction import TaskSpec, compute_metrics, loss_fn, prepare_targets

log = logging.getLogger(__name__)

# Opacus' hooks on the first layer fire although the input needs no gradient: harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when a GPU is present, else CPU. ``cuda`` without a GPU is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to this process (use auto or cpu)")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: allowed are auto, cpu, cuda")
    return torch.device(name)


def progress(it: Iterable, total: int | None, desc: str | None):
    if desc is None:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True,
                disable=None)


def train_epoch(model, loader, optimizer, task: TaskSpec, device: torch.device, desc: str | None = None, *,
                expand: Callable | None = None, after_backward: Callable[[], None] | None = None,
                after_step: Callable[[], None] | None = None) -> dict:
    """One pass over ``loader`` (for DP: one round's Poisson-sampled logical batches).

    Hooks (DP-SGD uses them, :func:`xrayfed.client.dp.train_private_round`):
    ``expand(x, y) → (x, y)`` turns a batch into the batch the model sees (e.g. several augmented
    views of each example); ``after_backward()`` runs before the optimizer step;
    ``after_step()`` after every step, the noise-only step of an empty batch included.

    Returns ``{"loss": mean training loss, "examples": samples seen}`` (examples of ``loader``,
    before ``expand``).
    """
    criterion = loss_fn(task)
    model.train()
    total_loss, seen = 0.0, 0
    try:
        total = len(loader)
    except TypeError:
        total = None
    for x, y in progress(loader, total, desc):
        optimizer.zero_grad(set_to_none=True)
        if len(x) == 0:  # an empty Poisson batch: DP-SGD still takes its (noise-only) step
            x = x.to(device)
            if expand is not None:
                x, _ = expand(x, y)
            (model(x).sum() * 0.0).backward()
        else:
            n = len(x)
            x = x.to(device, non_blocking=True)
            y = prepare_targets(task, y.to(device, non_blocking=True))
            if expand is not None:
                x, y = expand(x, y)
            loss = criterion(model(x), y)
            loss.backward()
            if after_backward is not None:
                after_backward()
            total_loss += float(loss.detach()) * n
            seen += n
        optimizer.step()
        if after_step is not None:
            after_step()
    return {"loss": total_loss / max(seen, 1), "examples": seen}


@torch.no_grad()
def predict_logits(model, dataset, device: torch.device, batch_size: int = 256,
                   generator: torch.Generator | None = None,
                   after_batch: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, outputs) and targets for a whole dataset, in order. The loader draws its seed
    from ``generator`` (default: torch's global generator); ``after_batch()`` runs after each
    batch (e.g. :meth:`xrayfed.common.cores.CoreShare.adjust`)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=generator)
    model.eval()
    outs, ys = [], []
    for x, y in loader:
        outs.append(model(x.to(device)).float().cpu())
        ys.append(y)
        if after_batch is not None:
            after_batch()
    return torch.cat(outs).numpy(), torch.cat(ys).numpy()


def evaluate(model, dataset, task: TaskSpec, device: torch.device, batch_size: int = 256,
             threshold: float | list[float] | None = None) -> dict[str, float]:
    """Task metrics (see :func:`xrayfed.common.prediction.compute_metrics`, at ``threshold``)
    plus ``loss`` and ``examples``."""
    logits, targets = predict_logits(model, dataset, device, batch_size)
    return scored(task, logits, targets, threshold)


def scored(task: TaskSpec, logits: np.ndarray, targets: np.ndarray,
           threshold: float | list[float] | None = None) -> dict[str, float]:
    """:func:`evaluate`'s figures from logits (N, outputs) and targets already computed."""
    metrics = compute_metrics(task, logits, targets, threshold=threshold)
    crit = loss_fn(task)
    metrics["loss"] = float(crit(torch.from_numpy(logits), prepare_targets(task, torch.from_numpy(targets))))
    metrics["examples"] = int(len(targets))
    return metrics


def make_optimizer(model, name: str, lr: float, momentum: float = 0.9):
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
