"""``xrayfed explain --model CHECKPOINT --scan FILE [--scan FILE ...] --out heatmap.png|page.html``:
where the model looked, for a clinician at the hospital (plaintext, hospital side only).

Grad-CAM (Selvaraju et al. 2017) on the model's last convolution (the first one behind a
ScatterNet front end, :func:`explained_conv`): the gradients of the chosen
class's logit with respect to that layer's activations, averaged over space, weight its channels;
the ReLU of the weighted sum, upsampled to the scan, is the heatmap. The class is the predicted
one unless ``--class`` names another (binary: ``PNEUMONIA`` is the logit, ``NORMAL`` its
negative; multi-class: the class's logit; multi-label: the label's logit). Every supported scan
format goes through the same preprocessing as training and prediction
(:func:`xrayfed.common.preprocess.prepare_scan`).

One scan → a PNG (the scan, the heatmap over it, the probabilities); several → a self-contained
HTML page with one such figure per scan.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xrayfed.common.checkpoint import Checkpoint
from xrayfed.common.errors import UserError
from xrayfed.common.files import atomic_write
from xrayfed.common.model.scatter_front import ScatterFront
from xrayfed.common.prediction import probabilities
from xrayfed.common.preprocess import prepare_scan
from xrayfed.common.security.atrest import load_checkpoint, load_key


def explained_conv(model: torch.nn.Module) -> torch.nn.Module:
    """The convolution Grad-CAM reads: the model's last ``Conv2d`` (XrayNet's last stage; a
    torchvision backbone's last block) — except behind a ScatterNet front end, where the first
    convolution already sees the scattering features (7 × 7 at 28 px) and the last one only a
    3 × 3 grid, too coarse to point at a finding: there it is the first."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise UserError("this model has no convolution to explain")
    return convs[0] if any(isinstance(m, ScatterFront) for m in model.modules()) else convs[-1]


def class_index(ckpt: Checkpoint, name: str | None, logits: torch.Tensor) -> tuple[int, str]:
    """``(output index or -1 for binary's negative class, class name)``: ``name``, else the prediction."""
    names = list(ckpt.task.class_names)
    if name is not None and name not in names:
        raise UserError(f"--class {name!r}: the model's classes are {names}")
    if ckpt.task.kind == "binary":
        positive = name == names[1] if name is not None else bool(logits[0, 0] > 0)
        return (0, names[1]) if positive else (-1, names[0])
    k = names.index(name) if name is not None else int(torch.argmax(logits[0]))
    return k, names[k]


def grad_cam(model: torch.nn.Module, x: torch.Tensor, output: int) -> np.ndarray:
    """Grad-CAM heatmap (H, W) in [0, 1] of ``x`` (1, C, H, W) for output ``output`` (−1: minus
    output 0, binary's negative class)."""
    layer = explained_conv(model)
    seen: dict[str, torch.Tensor] = {}
    def keep(module, inputs, out):  # the activations, and (a tensor hook) their gradient
        seen["a"] = out
        out.register_hook(lambda g: seen.__setitem__("g", g))

    fwd = layer.register_forward_hook(keep)
    try:
        model.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)
        logits = model(x)
        score = -logits[0, 0] if output < 0 else logits[0, output]
        score.backward()
    finally:
        fwd.remove()
    a, g = seen["a"].detach(), seen["g"].detach()
    cam = F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    top = float(cam.max())
    return (cam / top).numpy() if top > 0 else cam.numpy()


def explain_scan(ckpt: Checkpoint, model: torch.nn.Module, scan: Path, class_name: str | None = None) -> dict:
    """``{"scan", "image" (H, W) in [0, 1], "heatmap", "class", "probabilities": {name: p}}``."""
    x = prepare_scan(scan, int(ckpt.image_size))
    if ckpt.model.in_channels == 3:
        x = x.repeat(1, 3, 1, 1)
    with torch.no_grad():
        logits = model(x)
    output, name = class_index(ckpt, class_name, logits)
    probs = probabilities(ckpt.task, logits.numpy())[0]
    return {"scan": str(scan), "image": (x[0, 0].numpy() + 1.0) / 2.0, "heatmap": grad_cam(model, x, output),
            "class": name, "probabilities": dict(zip(ckpt.task.class_names, (float(p) for p in probs)))}


def render_png(result: dict) -> bytes:
    """The scan with the heatmap over it, titled with the class explained and the probabilities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.9), dpi=110)
    axes[0].imshow(result["image"], cmap="gray", vmin=0, vmax=1)
    axes[0].set_title(Path(result["scan"]).name, fontsize=9)
    axes[1].imshow(result["image"], cmap="gray", vmin=0, vmax=1)
    axes[1].imshow(result["heatmap"], cmap="jet", alpha=0.45, vmin=0, vmax=1)
    axes[1].set_title(f"Grad-CAM: {result['class']}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    probs = ", ".join(f"{k} {v:.1%}" for k, v in result["probabilities"].items())
    fig.suptitle(probs, fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def render_html(results: list[dict], ckpt: Checkpoint) -> str:
    rows = []
    for r in results:
        png = base64.b64encode(render_png(r)).decode("ascii")
        probs = "".join(f"<li>{html.escape(k)}: {v:.1%}</li>" for k, v in r["probabilities"].items())
        rows.append(f'<section><h2>{html.escape(Path(r["scan"]).name)}</h2><img alt="Grad-CAM of '
                    f'{html.escape(r["class"])}" src="data:image/png;base64,{png}"><ul>{probs}</ul></section>')
    return ("<!doctype html><html><head><meta charset='utf-8'><title>xrayfed: where the model looked</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:auto}img{max-width:100%}</style></head>"
            f"<body><h1>Where the model looked</h1><p>Model {ckpt.model_version} ({ckpt.task.kind}, "
            f"{html.escape(', '.join(ckpt.task.class_names))}); Grad-CAM on its last convolution. For the "
            "hospital's clinicians only: it shows which parts of the image drove the prediction, not a "
            "diagnosis.</p>" + "".join(rows) + "</body></html>")


def run_explain_cmd(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.model, load_key(args.atrest_key_file))
    model = ckpt.build()
    results = [explain_scan(ckpt, model, Path(s), args.class_name) for s in args.scan]
    out = Path(args.out)
    if out.suffix.lower() in (".html", ".htm"):
        atomic_write(out, render_html(results, ckpt).encode("utf-8"), mode=0o600)
    elif len(results) == 1:
        atomic_write(out, render_png(results[0]), mode=0o600)
    else:
        raise UserError(f"--out {out}: several scans make an HTML page; name a .html file")
    for r in results:
        probs = ", ".join(f"{k} {v:.1%}" for k, v in r["probabilities"].items())
        print(f"{Path(r['scan']).name}: explained {r['class']} ({probs})")
    print(f"wrote {out}")
    return 0
