"""`xrayfed export` (issue 13, second part): the exported model equals the checkpoint and carries
what a consumer needs (preprocessing, classes, threshold)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xrayfed.client import export as E
from xrayfed.common import cli
from xrayfed.common.checkpoint import Checkpoint, save_checkpoint
from xrayfed.common.model import ModelSpec, build_model
from xrayfed.common.prediction import TaskSpec


def _ckpt(task: TaskSpec, seed: int, size: int = 32, **spec) -> Checkpoint:
    torch.manual_seed(seed)
    ms = ModelSpec(num_outputs=task.num_outputs, width=8, **{"weight_standardization": True, **spec})
    model = build_model(ms)
    with torch.no_grad():  # weights that are not an init pattern: outputs differ between scans
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return Checkpoint(model=ms, task=task, image_size=size, state_dict=model.state_dict(), round=3)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("task", [TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")),
                                  TaskSpec(kind="multiclass", class_names=("bacterial", "covid", "healthy", "viral"))])
def test_export_equals_checkpoint_and_carries_metadata(tmp_path, fmt, task):
    ck = _ckpt(task, seed=1)
    res = E.export_model(ck, fmt, tmp_path / f"model.{fmt}")
    assert res["max_abs_diff"] <= E.TOLERANCE and res["scans"] == E.VERIFY_SCANS
    # independently of the self-check: other inputs, batch size 5, read back from disk
    x = torch.randn(5, 1, 32, 32)
    model = build_model(ck.model).eval()
    model.load_state_dict(ck.state_dict)
    with torch.no_grad():
        want = model(x).numpy()
    got = E.run_exported(tmp_path / f"model.{fmt}", fmt, x)
    assert got.shape == (5, task.num_outputs) and np.abs(got - want).max() <= 1e-4 and want.std() > 1e-3
    meta = E.read_metadata(tmp_path / f"model.{fmt}", fmt)
    assert meta["task"] == task.to_dict() and meta["model_version"] == ck.model_version
    assert meta["input"]["shape"] == ["batch", 1, 32, 32] and "255" in meta["preprocessing"]
    assert meta["decision_threshold"] == (0.5 if task.kind == "binary" else None)  # multiclass: the argmax


def test_export_cli_on_a_checkpoint_with_the_hospitals_scans(tmp_path, capsys):
    from xrayfed.common.synthetic import write_npz

    data = tmp_path / "scans.npz"
    write_npz(data, n_train=40, n_val=4, n_test=4, size=32, task="binary", seed=2)
    path = tmp_path / "round-0003.pt"
    save_checkpoint(path, _ckpt(TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")), seed=2))
    out = tmp_path / "model.onnx"
    args = ["export", str(path), "--format", "onnx", "--out", str(out), "--data", str(data)]
    assert cli.main(args) == 0
    assert "verified on 32 of your scans" in capsys.readouterr().out and out.stat().st_mode & 0o077 == 0
    assert cli.main(args) == 2  # no silent overwrite
    assert "already exists" in capsys.readouterr().err


def test_a_failing_check_keeps_nothing(tmp_path, monkeypatch):
    ck = _ckpt(TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")), seed=3)
    monkeypatch.setattr(E, "run_exported", lambda path, fmt, x: np.zeros((len(x), 1)))  # a broken exporter
    with pytest.raises(E.UserError, match="failed its check"):
        E.export_model(ck, "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
