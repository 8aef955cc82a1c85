"""Model checkpoints: weights plus everything needed to rebuild and check the model.

A checkpoint is a ``torch.save`` of plain data (loadable with ``weights_only=True``)::

    {"format": "xrayfed-checkpoint/1", "model": ModelSpec dict, "task": TaskSpec dict,
     "image_size": int (px, 8..MAX_IMAGE_SIZE), "round": int, "run_id": str, "created": ISO-8601 UTC,
     "model_version": sha256 of the weights (hex, 16 chars), "state_dict": {name: tensor},
     "threshold": [float, ...] or absent, "performance": {...} or absent}

``threshold`` is the operating point the server chose on its validation set (probability of
the positive class for a binary task, one per label for a multi-label task; absent: 0.5, and
always absent for a multi-class task, whose prediction is the most probable class).
``performance`` is how often the model is right at that operating point on the held-out scans
the server evaluated (per class sensitivity and specificity, the split's name and size:
:func:`xrayfed.common.prediction.measured_performance`); absent: not measured (no evaluation
data, or an older checkpoint). The patient is told these figures next to a prediction.

Checkpoint files are read by one function, :func:`xrayfed.common.security.atrest.load_checkpoint`,
for every command: it decrypts a file encrypted at rest with the key given, and without the key
an encrypted file is the one line ``<file>: the file is encrypted; pass --atrest-key-file ...``.

``state_dict`` keys are the plain model's keys (no Opacus ``_module.`` prefix). Files are
written atomically (temp file + rename), so a crash never leaves a half-written checkpoint.
Loading checks every field: ``image_size`` outside 8..MAX_IMAGE_SIZE px (2048, the bound of a
config's ``image_size``), a missing or malformed field is a one-line UserError, so a hostile
checkpoint cannot make a scan be resized to a size no memory holds.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from xrayfed.common.errors import UserError
from xrayfed.common.files import atomic_write
from xrayfed.common.model import ModelSpec, build_model, fold_standardization, plain_spec
from xrayfed.common.prediction import TaskSpec, check_performance
from xrayfed.common.preprocess import MAX_IMAGE_SIZE, MIN_SIZE

FORMAT = "xrayfed-checkpoint/1"


def strip_prefix(state_dict: dict) -> dict:
    """Drop wrappers' key prefixes (Opacus ``_module.``) so keys match the plain model."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith("_module."):
            k = k[len("_module.") :]
        out[k] = v.detach().cpu() if isinstance(v, torch.Tensor) else v
    return out


def weights_version(state_dict: dict) -> str:
    """A short content hash of the weights (order-independent over keys)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        v = state_dict[k]
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Checkpoint:
    model: ModelSpec
    task: TaskSpec
    image_size: int
    state_dict: dict
    round: int = 0
    run_id: str = ""
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    threshold: list[float] | None = None
    performance: dict | None = None

    @property
    def model_version(self) -> str:
        return weights_version(self.state_dict)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "model": self.model.model_dump(),
            "task": self.task.to_dict(),
            "image_size": int(self.image_size),
            "round": int(self.round),
            "run_id": str(self.run_id),
            "created": self.created,
            "model_version": self.model_version,
            "state_dict": strip_prefix(self.state_dict),
            **({"threshold": [float(t) for t in self.threshold]} if self.threshold is not None else {}),
            **({"performance": self.performance} if self.performance is not None else {}),
        }

    def build(self, plain: bool = False):
        """The plaintext torch model with these weights (eval mode). ``plain``: weight
        standardisation folded into plain convolutions (same outputs; what MPC and export run)."""
        model = build_model(self.model)
        load_weights(model, self.state_dict, what=f"checkpoint (model {self.model_version})")
        if plain and self.model.weight_standardization:
            flat = build_model(plain_spec(self.model))
            flat.load_state_dict(fold_standardization(self.model, model.state_dict()))
            model = flat
        model.eval()
        return model


def load_weights(model, state_dict: dict, what: str = "weights") -> None:
    """Load ``state_dict`` into ``model``; a mismatching architecture is a clear UserError."""
    sd = strip_prefix(state_dict)
    own = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    bad = sorted(k for k in set(own) & set(sd) if tuple(own[k]) != tuple(sd[k].shape))
    if missing or extra or bad:
        detail = []
        if missing:
            detail.append(f"missing {missing[:3]}")
        if extra:
            detail.append(f"unexpected {extra[:3]}")
        if bad:
            detail.append(f"shape mismatch at {bad[0]}: {tuple(sd[bad[0]].shape)} vs model {tuple(own[bad[0]])}")
        raise UserError(f"{what} does not match the model architecture ({'; '.join(detail)})")
    model.load_state_dict(sd)


def to_bytes(ckpt: Checkpoint) -> bytes:
    buf = io.BytesIO()
    torch.save(ckpt.to_dict(), buf)
    return buf.getvalue()


def from_bytes(data: bytes, source: str = "checkpoint") -> Checkpoint:
    """The checkpoint in ``data`` (plaintext bytes; files are read with
    :func:`xrayfed.common.security.atrest.load_checkpoint`)."""
    try:
        d = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated/corrupt/not a torch file
        raise UserError(f"{source}: not a readable xrayfed checkpoint ({type(e).__name__})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise UserError(f"{source}: not an xrayfed checkpoint (expected format {FORMAT!r})")
    model = _field(d, "model", lambda v: ModelSpec(**v), source)
    task = _field(d, "task", TaskSpec.from_dict, source)
    image_size = _field(d, "image_size", lambda v: checked_image_size(v, source), source)
    state_dict = _field(d, "state_dict", _mapping, source)
    rnd = _field(d, "round", int, source) if "round" in d else 0
    return Checkpoint(
        model=model,
        task=task,
        image_size=image_size,
        state_dict=state_dict,
        round=rnd,
        run_id=str(d.get("run_id", "")),
        created=str(d.get("created", "")),
        threshold=_threshold(d.get("threshold"), source),
        performance=_field(d, "performance", lambda v: check_performance(v, task), source)
        if "performance" in d else None,
    )


def _field(d: dict, name: str, parse, source: str):
    """``parse(d[name])``; a missing or malformed field is a one-line UserError naming it."""
    if name not in d:
        raise UserError(f"{source}: not a valid xrayfed checkpoint (no {name!r} field)")
    try:
        return parse(d[name])
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # pydantic's ValidationError is a ValueError
        raise UserError(f"{source}: not a valid xrayfed checkpoint (its {name} field is malformed: "
                        f"{type(e).__name__})") from None


def _mapping(v) -> dict:
    if not isinstance(v, dict):
        raise TypeError("not a mapping")
    return v


def checked_image_size(v, source: str) -> int:
    """A checkpoint's ``image_size`` (px) as an int in 8..MAX_IMAGE_SIZE; one-line UserError
    otherwise (the scans a model reads are resized to it, so an absurd size would exhaust memory)."""
    if isinstance(v, bool) or not isinstance(v, int) or not MIN_SIZE <= v <= MAX_IMAGE_SIZE:
        shown = repr(v) if isinstance(v, (int, float, str)) and len(repr(v)) <= 40 else type(v).__name__
        raise UserError(f"{source}: image_size {shown}: allowed are whole numbers of px from {MIN_SIZE} to "
                        f"{MAX_IMAGE_SIZE}")
    return int(v)


def _threshold(v, source: str) -> list[float] | None:
    if v is None:
        return None
    try:
        out = [float(t) for t in v]
    except (TypeError, ValueError):
        raise UserError(f"{source}: its decision threshold is not a list of numbers") from None
    if not all(0.0 <= t <= 1.0 for t in out):
        raise UserError(f"{source}: decision thresholds must be probabilities in [0, 1], got {out}")
    return out


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    atomic_write(Path(path), to_bytes(ckpt), mode=0o644)
