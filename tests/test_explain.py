"""`xrayfed explain`: the Grad-CAM heatmap concentrates on the finding the
synthetic generator drew, and the command writes a PNG for one scan or an HTML page for several."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from xrayfed.client.explain import grad_cam
from xrayfed.common import cli
from xrayfed.common.checkpoint import Checkpoint, save_checkpoint
from xrayfed.common.model import ModelSpec, build_model, default_model
from xrayfed.common.prediction import TaskSpec
from xrayfed.common.preprocess import normalize
from xrayfed.common.synthetic import make_synthetic

SIZE = 64
BINARY = TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA"))


@pytest.fixture(scope="module", params=["xraynet", "scatternet"])
def trained(request):
    """A small XrayNet trained (plainly, a few seconds) to find the synthetic opacity; also the
    ScatterNet design (the default below 56 px; here pooled to 32 px, so its last convolution
    sees only 4 × 4 positions)."""
    torch.manual_seed(0)
    imgs, y = make_synthetic(800, SIZE, "binary", seed=1)
    x, yt = normalize(torch.as_tensor(imgs)), torch.as_tensor(y).float()
    spec = (ModelSpec(num_outputs=1, width=8, depth=3) if request.param == "xraynet"
            else default_model(32, 1).model_copy(update={"width": 8, "input_pool": 2}))
    assert spec.scattering or request.param == "xraynet"
    model = build_model(spec)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(8):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx])[:, 0], yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return spec, model.eval()


def test_heatmap_points_at_the_synthetic_finding(trained):
    _, model = trained
    found: list = []
    imgs, y = make_synthetic(60, SIZE, "binary", seed=7, findings=found)
    x = normalize(torch.as_tensor(imgs))
    with torch.no_grad():
        assert ((model(x)[:, 0] > 0).long().numpy() == y).mean() > 0.8  # it learned the finding
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    hits, elsewhere, ratios = [], [], []
    for i, _, py, px, r in found:
        h = grad_cam(model, x[i:i + 1], 0)
        assert h.shape == (SIZE, SIZE) and 0 <= h.min() and h.max() <= 1
        peak = np.array(np.unravel_index(np.argmax(h), h.shape)) / (SIZE - 1)
        hits.append(np.hypot(peak[0] - py, peak[1] - px) <= r)
        elsewhere.append(np.hypot(peak[0] - py, peak[1] - (1 - px)) <= r)  # the same spot, other lung
        disk = np.hypot(yy - py, xx - px) <= r
        ratios.append((h[disk].sum() / h.sum()) / disk.mean())
    assert len(found) > 20
    assert np.mean(hits) >= 0.6 and np.mean(elsewhere) <= 0.2, (np.mean(hits), np.mean(elsewhere))
    assert np.mean(ratios) >= 1.3  # the heatmap's mass is concentrated on the finding


def test_explain_cli_png_and_html(trained, tmp_path, capsys):
    import dicom_files

    spec, model = trained
    ck = tmp_path / "global.pt"
    save_checkpoint(ck, Checkpoint(model=spec, task=BINARY, image_size=SIZE, state_dict=model.state_dict(), round=5))
    imgs, _ = make_synthetic(2, 128, "binary", seed=11)
    png = tmp_path / "scan.png"
    Image.fromarray(imgs[0]).save(png)
    dcm = dicom_files.write_dicom(tmp_path / "scan.dcm", imgs[1], patient_id="PAT-1")
    assert cli.main(["explain", "--model", str(ck), "--scan", str(png), "--out", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    assert "scan.png: explained" in out and ("PNEUMONIA" in out or "NORMAL" in out)
    with Image.open(tmp_path / "h.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    assert cli.main(["explain", "--model", str(ck), "--scan", str(png), "--scan", str(dcm), "--class", "PNEUMONIA",
                     "--out", str(tmp_path / "page.html")]) == 0
    page = (tmp_path / "page.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "scan.dcm" in page and "Grad-CAM of PNEUMONIA" in page
    assert cli.main(["explain", "--model", str(ck), "--scan", str(png), "--class", "COVID",
                     "--out", str(tmp_path / "x.png")]) == 2
    assert "the model's classes are ['NORMAL', 'PNEUMONIA']" in capsys.readouterr().err


def test_multiclass_and_multilabel_models_are_explained(tmp_path):
    for task in (TaskSpec(kind="multiclass", class_names=("bacterial", "covid", "healthy", "viral")),
                 TaskSpec(kind="multilabel", class_names=("Effusion", "Mass", "Pneumonia"))):
        torch.manual_seed(3)
        spec = ModelSpec(num_outputs=task.num_outputs, width=8)
        model = build_model(spec).eval()
        for k in range(task.num_outputs):
            h = grad_cam(model, torch.randn(1, 1, 32, 32), k)
            assert h.shape == (32, 32) and np.isfinite(h).all()
