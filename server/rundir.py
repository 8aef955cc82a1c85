"""The operator's run directory: config copy, per-round checkpoints, per-round metrics.

Layout::

    RUN_DIR/federation.toml          the resolved config of the run
    RUN_DIR/checkpoints/round-NNNN.pt global model after round NNNN (xrayfed checkpoint format)
    RUN_DIR/checkpoints/best.pt       the round with the best validation AUC (with [eval] val_split)
    RUN_DIR/metrics.jsonl            one JSON line per round (schema in the README)
    RUN_DIR/server.log               full Flower log of the SuperLink and ServerApp

With an at-rest key (``xrayfed server --atrest-key-file`` or ``$XRAYFED_ATREST_KEY_FILE`` /
``$XRAYFED_ATREST_KEY``), checkpoints are written AES-256-GCM encrypted
(:mod:`xrayfed.common.security.atrest`, mode 0600) and only encrypted checkpoints are accepted when
resuming: a wrong key is a one-line error naming the file, and a plaintext checkpoint swapped
into an encrypted run is refused. ``metrics.jsonl`` and ``server.log`` stay plaintext (they
hold per-round figures and logs, no model weights).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xrayfed.common.config import dump_toml
from xrayfed.common.errors import UserError
from xrayfed.common.security import atrest

if TYPE_CHECKING:  # torch: `xrayfed server` starts the SuperLink before it imports torch (it writes the config only)
    from xrayfed.common.checkpoint import Checkpoint

_CKPT = re.compile(r"^round-(\d{4,})\.pt$")


class RunDir:
    def __init__(self, path: Path | str, key: "atrest.AtRestKey | None" = None) -> None:
        self.path = Path(path)
        self.key = key  # at-rest key: checkpoints are encrypted with it

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def create(self) -> "RunDir":
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        return self

    def checkpoint_path(self, server_round: int) -> Path:
        return self.checkpoints / f"round-{server_round:04d}.pt"

    def latest_checkpoint(self) -> Path | None:
        found = []
        if self.checkpoints.is_dir():
            for f in self.checkpoints.iterdir():
                m = _CKPT.match(f.name)
                if m:
                    found.append((int(m.group(1)), f))
        return max(found)[1] if found else None

    def load_latest(self) -> Checkpoint | None:
        p = self.latest_checkpoint()
        return self.load(p) if p else None

    def load(self, path: Path | str) -> Checkpoint:
        """A checkpoint of this run (decrypted with the run's key; plaintext refused when one is set)."""
        return atrest.load_checkpoint(path, self.key, require_encrypted=self.key is not None)

    def save(self, ckpt: Checkpoint) -> Path:
        p = self.checkpoint_path(ckpt.round)
        atrest.save_checkpoint(p, ckpt, self.key)
        return p

    def server_state_path(self, server_round: int) -> Path:
        return self.checkpoints / f"server-state-{server_round:04d}.pt"

    def save_server_state(self, server_round: int, state: dict[str, Any]) -> Path:
        """The strategy's own state after ``server_round`` (server momentum, Adam moments: tensors),
        encrypted like the checkpoints; only the latest round's is kept."""
        import torch

        buf = io.BytesIO()
        torch.save(state, buf)
        p = self.server_state_path(server_round)
        atrest.write_encrypted(p, buf.getvalue(), self.key, context=b"server-state")
        for old in self.checkpoints.glob("server-state-*.pt"):
            if old != p:
                old.unlink(missing_ok=True)
        return p

    def load_server_state(self, server_round: int) -> dict[str, Any] | None:
        """The strategy state saved after ``server_round``, or None when there is none."""
        import torch

        p = self.server_state_path(server_round)
        if not p.is_file():
            return None
        data = atrest.read_maybe_encrypted(p, self.key, context=b"server-state", require_encrypted=self.key is not None)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    @property
    def best_path(self) -> Path:
        """``checkpoints/best.pt``: the global model with the best validation AUC so far."""
        return self.checkpoints / "best.pt"

    def save_best(self, ckpt: Checkpoint) -> Path:
        atrest.save_checkpoint(self.best_path, ckpt, self.key)
        return self.best_path

    def best_so_far(self) -> tuple[int, float] | None:
        """``(round, val AUC)`` of the best global model recorded in metrics.jsonl, if any."""
        best = None
        for row in self.read_metrics():
            v = (row.get("eval") or {}).get("val_auc")
            if v is not None and v == v and (best is None or v > best[1]):
                best = (int(row["round"]), float(v))
        return best

    def append_metrics(self, row: dict[str, Any]) -> None:
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True, allow_nan=True) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """Metrics rows, the last row per round winning (:func:`read_metrics`); none yet: []."""
        return read_metrics(self.metrics_path) if self.metrics_path.is_file() else []

    @property
    def config_path(self) -> Path:
        return self.path / "federation.toml"

    def write_config(self, cfg) -> Path:
        """The run's resolved config (what its ServerApp reads and its reports name)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(dump_toml(cfg), encoding="utf-8")
        return self.config_path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl, the last row per round winning (a resumed round may appear
    twice); a line that is not a row is a one-line ``UserError`` naming it."""
    rows: dict[int, dict[str, Any]] = {}
    with Path(path).open("r", encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                rows[int(r["round"])] = r
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise UserError(f"{path}: line {n}: not a metrics row (JSON object with a 'round')") from None
    return [rows[k] for k in sorted(rows)]
