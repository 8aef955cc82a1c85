"""The operator's run directory: config copy, per-round checkpoints, per-round metrics.

Layout::

    RUN_DIR/federation.toml          the resolved config of the run
    RUN_DIR/checkpoints/round-NNNN.pt global model after round NNNN (xrayfed checkpoint format)
    RUN_DIR/metrics.jsonl            one JSON line per round (schema in the README)
    RUN_DIR/server.log               full Flower log of the SuperLink and ServerApp
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from xrayfed.common.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

_CKPT = re.compile(r"^round-(\d{4,})\.pt$")


class RunDir:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

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
        return load_checkpoint(p) if p else None

    def save(self, ckpt: Checkpoint) -> Path:
        p = self.checkpoint_path(ckpt.round)
        save_checkpoint(p, ckpt)
        return p

    def append_metrics(self, row: dict[str, Any]) -> None:
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True, allow_nan=True) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """Metrics rows, the last row per round winning (a resumed round may appear twice)."""
        rows: dict[int, dict[str, Any]] = {}
        if self.metrics_path.is_file():
            for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    r = json.loads(line)
                    rows[int(r["round"])] = r
        return [rows[k] for k in sorted(rows)]
