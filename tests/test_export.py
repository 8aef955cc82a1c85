"""`xrayfed export`: the exported model equals the checkpoint and carries
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
from xrayfed.common.synthetic import FOUR_CLASS


def _ckpt(task: TaskSpec, seed: int, size: int = 32, **spec) -> Checkpoint:
    torch.manual_seed(seed)
    ms = ModelSpec(num_outputs=task.num_outputs, width=8, **{"weight_standardization": True, **spec})
    model = build_model(ms)
    with torch.no_grad():  # weights that are not an init pattern: outputs differ between scans
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return Checkpoint(model=ms, task=task, image_size=size, state_dict=model.state_dict(), round=3)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("task,scattering", [
    (TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")), True),
    (TaskSpec(kind="multiclass", class_names=("bacterial", "covid", "healthy", "viral")), False)])
def test_export_equals_checkpoint_and_carries_metadata(tmp_path, fmt, task, scattering):
    """Also for a ScatterNet model: its front end is exported as real matrix products (the
    checkpoint runs it with FFTs), still within the 1e-4 check."""
    ck = _ckpt(task, seed=1, scattering=scattering, depth=2)
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
    assert meta["input"]["shape"] == ["batch", 1, 32, 32] and meta["preprocessing"]["resize"]["size"] == [32, 32]
    assert meta["decision_threshold"] == (0.5 if task.kind == "binary" else None)  # multiclass: the argmax


def _input_from_metadata(path, pre: dict) -> np.ndarray:
    """The model input of the scan file ``path`` built from the exported metadata alone (Pillow,
    numpy and pydicom as a hospital's own tools would use them; nothing of xrayfed)."""
    from PIL import Image

    size = pre["resize"]["size"]
    if str(path).endswith(".dcm"):
        import pydicom
        from pydicom.pixels import apply_modality_lut

        dicom = pre["decode"]["dicom"]["steps"]
        assert dicom.index("round half to even to integers 0..255") < dicom.index("MONOCHROME1: y = 255 - y")
        ds = pydicom.dcmread(path)
        x = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
        c, w = float(ds.WindowCenter), float(ds.WindowWidth)  # LINEAR, as the metadata states it
        assert "LINEAR y = clip(((x - (c - 0.5)) / (w - 1) + 0.5) * 255, 0, 255)" in "; ".join(dicom)
        u8 = np.rint(np.clip(((x - (c - 0.5)) / (w - 1) + 0.5) * 255, 0, 255)).astype(np.uint8)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            u8 = 255 - u8
    else:
        with Image.open(path) as im:
            if im.format == "JPEG":
                k = pre["decode"]["jpeg_dct_scaling"]["factor"]
                im.draft("L", (min(k * size[0], im.size[0]), min(k * size[1], im.size[1])))
            u8 = np.asarray(im.convert("L"))
    r = pre["resize"]
    assert r["filter"] == "bilinear" and r["antialias"] and not r["keep_aspect_ratio"]
    u8 = np.asarray(Image.fromarray(u8).resize(tuple(size), Image.Resampling.BILINEAR, reducing_gap=None))
    n = pre["normalize"]
    x = (u8.astype(np.float32) / np.float32(pre["scale"]) - np.float32(n["mean"])) / np.float32(n["std"])
    return np.repeat(x[None, None], pre["channels"]["count"], axis=1)


def test_the_metadata_alone_reproduces_the_model_input(tmp_path):
    """A hospital's own pipeline, written from the exported metadata, feeds the exported model
    exactly what xrayfed feeds it: for a PNG, a JPEG and a windowed 16-bit MONOCHROME1 DICOM."""
    from PIL import Image

    from dicom_files import write_dicom
    from xrayfed.common.preprocess import prepare_scan

    ck = _ckpt(TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")), seed=4, size=24)
    E.export_model(ck, "onnx", tmp_path / "m.onnx")
    pre = E.read_metadata(tmp_path / "m.onnx", "onnx")["preprocessing"]
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(110, 40, (90, 70)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img).save(tmp_path / "b.jpg", quality=90)
    px = (rng.integers(0, 4096, (60, 50))).astype(np.uint16)
    write_dicom(tmp_path / "c.dcm", px, photometric="MONOCHROME1", window=(2100, 3000), slope=1.5, intercept=-200)
    for name in ("a.png", "b.jpg", "c.dcm"):
        ours = prepare_scan(tmp_path / name, 24).numpy()
        theirs = _input_from_metadata(tmp_path / name, pre)
        assert theirs.shape == ours.shape == (1, 1, 24, 24) and np.array_equal(theirs, ours), name
        got = E.run_exported(tmp_path / "m.onnx", "onnx", torch.from_numpy(theirs))
        with torch.no_grad():
            want = ck.build().eval()(torch.from_numpy(ours)).numpy()
        assert np.abs(got - want).max() <= E.TOLERANCE, name


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


# --------------------------------------------------------------------------- INT8
MULTI = TaskSpec(kind="multiclass", class_names=FOUR_CLASS)


@pytest.fixture(scope="module", params=[False, True], ids=["xraynet", "scatternet"])
def int8_setup(tmp_path_factory, request):
    """A 4-class synthetic .npz and a small XrayNet trained on its train split (a few seconds);
    also with the ScatterNet front end (which stays FP32 in the INT8 model)."""
    from xrayfed.common.data import load_dataset
    from xrayfed.common.synthetic import write_npz

    d = tmp_path_factory.mktemp("int8")
    data = write_npz(d / "scans.npz", n_train=600, n_val=60, n_test=300, size=32, task="multiclass",
                     class_names=FOUR_CLASS, seed=4)
    ds = load_dataset(data, "train", image_size=32)
    x, y = torch.stack([ds[i][0] for i in range(len(ds))]), ds.targets.long()
    torch.manual_seed(0)
    ms = ModelSpec(num_outputs=4, width=8, weight_standardization=True, scattering=request.param,
                   depth=2 if request.param else 3)
    model = build_model(ms)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    trained, inputs = (model[1:], model[0](x)) if request.param else (model, x)  # the fixed front once
    for _ in range(10):
        for idx in torch.randperm(len(x)).split(50):
            loss = torch.nn.functional.cross_entropy(trained(inputs[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = d / "round-0005.pt"
    save_checkpoint(path, Checkpoint(model=ms, task=ds.task, image_size=32, state_dict=model.state_dict(), round=5))
    return data, path


def _quantized_ops(path, fmt) -> set[str]:
    if fmt == "onnx":
        import onnx

        return {n.op_type for n in onnx.load(str(path)).graph.node}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.jit.load(str(path)).inlined_graph
    return {n.kind() for n in graph.nodes()}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_int8_export_is_quantized_measured_and_within_the_bar(tmp_path, int8_setup, fmt, capsys):
    from xrayfed.client.quantize import MAX_AUC_DROP
    from xrayfed.common.security.atrest import load_checkpoint

    data, ckpt_path = int8_setup
    out = tmp_path / f"m8.{fmt}"
    assert cli.main(["export", "--model", str(ckpt_path), "--format", fmt, "--int8", "--data", str(data),
                     "--calibration-scans", "200", "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "static INT8" in line and "on 300 scans of your test split" in line and "calibrated on 200" in line
    ops = _quantized_ops(out, fmt)
    assert ({"QuantizeLinear", "DequantizeLinear"} <= ops) if fmt == "onnx" else any(o.startswith("quantized::conv2d") for o in ops), ops
    meta = E.read_metadata(out, fmt)
    q = meta["quantization"]
    assert meta["task"] == MULTI.to_dict() and q["calibration_scans"] == 200 and q["held_out"]["split"] == "test"
    # measured independently: the file on disk against the checkpoint on the held-out scans
    from xrayfed.common.data import load_dataset
    from xrayfed.common.prediction import compute_metrics

    ck = load_checkpoint(ckpt_path, None)
    test = load_dataset(data, "test", image_size=32)
    x = torch.stack([test[i][0] for i in range(len(test))])
    with torch.no_grad():
        want = ck.build()(x).numpy()
    got = E.run_exported(out, fmt, x)
    auc32 = compute_metrics(MULTI, want, test.targets.numpy())["auc"]
    auc8 = compute_metrics(MULTI, got, test.targets.numpy())["auc"]
    assert auc32 > 0.75  # a model that learned something, so the AUROC change means something
    assert auc32 - auc8 <= MAX_AUC_DROP and abs(auc8 - q["held_out"]["auc_int8"]) < 1e-9
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95 and np.abs(got - want).max() > 0  # really quantized
    if fmt == "onnx":  # the weights themselves are stored as INT8
        import onnx
        from onnx import TensorProto

        inits = onnx.load(str(out)).graph.initializer
        int8 = sum(int(np.prod(t.dims)) for t in inits if t.data_type == TensorProto.INT8)
        assert int8 >= 0.95 * sum(p.numel() for p in build_model(ck.model).parameters() if p.dim() > 1)


def test_int8_refusals_are_one_line_and_write_nothing(tmp_path, int8_setup, monkeypatch, capsys):
    from xrayfed.client import quantize as Q

    data, ckpt_path = int8_setup
    out = tmp_path / "m8.onnx"
    assert cli.main(["export", "--model", str(ckpt_path), "--format", "onnx", "--int8", "--out", str(out)]) == 2
    assert "pass --data" in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr(Q, "MAX_AUC_DROP", -1.0)  # a bar no model can meet: the measured check must refuse
    assert cli.main(["export", "--model", str(ckpt_path), "--format", "onnx", "--int8", "--data", str(data),
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "AUROC" in err and "nothing was written" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
