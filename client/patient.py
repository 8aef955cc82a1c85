"""``xrayfed predict``: a patient's encrypted prediction on their own chest X-ray.

The scan never leaves the patient's device in the clear and the patient never learns the
model's weights:

1. the scan is read and checked locally (PNG, JPEG or DICOM; a non-image or truncated file is
   refused before anything is sent), with the same preprocessing as training
   (:func:`xrayfed.common.preprocess.prepare_scan`);
2. ``ModelInfo`` (TLS, token) tells the image size the model takes; ``OpenSession`` sends the
   token and the scan's *description* (size, channels, and for DICOM the PatientID — the
   service refuses a scan that is not the token holder's own);
3. this process joins the MPC session as rank 1 (:func:`xrayfed.common.mpc.run_patient`):
   it secret-shares the scan, the hospital secret-shares the weights, the crypto provider
   deals the randomness, and the logits are revealed to this process only;
4. probabilities are computed here (sigmoid/softmax, :func:`xrayfed.common.prediction.probabilities`)
   and printed with the class names.

Every failure (bad file, wrong size/channels, unreachable service, refused token, broken
session) ends as one line ``xrayfed: error: ...``.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

from xrayfed.common.errors import UserError
from xrayfed.common.logs import RPC_EXPOSED, warn_insecure
from xrayfed.common.protocol.inference import INFERENCE_SERVICE, MODEL_INFO, OPEN_SESSION


def _read_scan_identity(path: Path) -> tuple[str, str | None]:
    """(format, DICOM PatientID or None) of the scan file."""
    from xrayfed.common import preprocess

    if not path.is_file():
        raise UserError(f"--scan: no file at {path}")
    if not preprocess.is_dicom(path):
        return "image", None
    pid = preprocess.read_dicom_patient_id(path)  # UserError for an unreadable DICOM file
    if pid is None or not str(pid).strip():
        raise UserError(f"--scan {path}: DICOM file without a PatientID; the service only serves a patient's own "
                        "scans, so it needs the PatientID")
    return "dicom", str(pid).strip()


def prepare(path: Path, image_size: int, in_channels: int):
    """The scan as the model's input tensor (1, C, S, S), or a one-line UserError."""
    import torch

    from xrayfed.common import preprocess

    try:
        x = preprocess.prepare_scan(path, image_size)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a preprocessing failure is the user's file
        raise UserError(f"--scan {path}: cannot read the image ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else 'unreadable'})") from None
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != 1:
        raise UserError(f"--scan {path}: preprocessing gave an unexpected shape {tuple(getattr(x, 'shape', ()))}")
    if x.shape[1] != in_channels and x.shape[1] == 1:
        x = x.repeat(1, in_channels, 1, 1)  # grayscale scan for a model with an RGB stem
    if tuple(x.shape) != (1, in_channels, image_size, image_size):
        raise UserError(f"--scan {path}: image is {x.shape[1]} channel(s) x {x.shape[2]}x{x.shape[3]} px; "
                        f"the model takes {in_channels} channel(s) x {image_size}x{image_size} px")
    if not torch.isfinite(x).all():
        raise UserError(f"--scan {path}: image has non-finite pixel values")
    return x.float().contiguous()


def predict(scan: Path, service: str, token_path: Path, *, ca_cert: Path | None = None, insecure: bool = False,
            rpc_timeout: float = 30.0, observe=None) -> dict:
    """Run one encrypted prediction; returns ``{class_names, probabilities, model_version, ...}``.

    ``observe`` (tests only) is passed to :func:`xrayfed.common.mpc.run_patient`.
    """
    from xrayfed.common import rpc
    from xrayfed.common.addresses import parse_hostport
    from xrayfed.common.model import ModelSpec
    from xrayfed.common.prediction import TaskSpec, decide, probabilities
    from xrayfed.common.security.tokens import read_token_file

    t_start = time.perf_counter()
    parse_hostport(service, "--service")
    scan = Path(scan)
    token = read_token_file(token_path)
    fmt, dicom_pid = _read_scan_identity(scan)
    from xrayfed.common import preprocess

    try:
        preprocess.load_image(scan)  # a non-image or truncated file fails here, before any network
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--scan {scan}: not a readable PNG, JPEG or DICOM image ({type(e).__name__})") from None

    if insecure:
        warn_insecure("predict", RPC_EXPOSED)
    channel = rpc.make_channel(service, ca_cert=ca_cert, insecure=insecure)
    try:
        info = rpc.call(rpc.method(channel, INFERENCE_SERVICE, MODEL_INFO), {"token": token}, timeout=rpc_timeout,
                        what="the inference service", target=service)
        spec = ModelSpec(**info["model"])
        task = TaskSpec.from_dict(info["task"])
        size = int(info["image_size"])
        x = prepare(scan, size, spec.in_channels)

        from xrayfed.common import mpc

        mpc.import_crypten()  # torch + CrypTen (seconds): before the session opens, not inside it

        t_open = time.perf_counter()
        sess = rpc.call(rpc.method(channel, INFERENCE_SERVICE, OPEN_SESSION),
                        {"token": token, "scan": {"image_size": size, "channels": int(x.shape[1]), "format": fmt,
                                                  "dicom_patient_id": dicom_pid}},
                        timeout=rpc_timeout, what="the inference service", target=service)
    finally:
        channel.close()
    if sess.get("model_version") != info.get("model_version") or sess.get("model") != info.get("model"):
        raise UserError("the service changed its model between requests; run predict again")
    rv = sess["rendezvous"]
    params = mpc.SessionParams(session_id=str(sess["session_id"]), host=str(rv["host"]), port=int(rv["port"]),
                               timeout_s=float(sess["timeout_s"]))
    try:  # fail fast (not after the whole session timeout) when the MPC path is blocked
        socket.create_connection((params.host, params.port), timeout=10).close()
        store = mpc.make_store(params, master=False)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot reach the MPC rendezvous at {params.host}:{params.port} "
                        f"({type(e).__name__}); is the MPC network path (tunnel) up?") from None
    try:
        logits, stats = mpc.run_patient(params, store, spec, size, x, observe=observe, stats=True)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken session is one line for the patient
        raise UserError(f"the encrypted session failed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'})") from None
    probs = probabilities(task, logits)[0]
    threshold = info.get("threshold")
    return {
        "class_names": list(task.class_names),
        "probabilities": [float(p) for p in probs],
        "task": task.kind,
        "threshold": threshold,
        "prediction": decide(task, probs, threshold),
        "model_version": sess["model_version"],
        "timing": {"total_s": time.perf_counter() - t_start, "session_s": time.perf_counter() - t_open,
                   "mpc_s": stats.get("mpc_s"), "init_s": stats.get("init_s")},
        "communication": {"rounds": stats.get("rounds"), "bytes": stats.get("bytes")},
    }


def format_result(res: dict) -> str:
    width = max(len(n) for n in res["class_names"])
    kind = {"binary": "binary", "multiclass": "one of the classes", "multilabel": "independent findings"}[res["task"]]
    lines = [f"Encrypted prediction (model {res['model_version']}, {kind}); only you can see this result:"]
    for name, p in zip(res["class_names"], res["probabilities"]):
        lines.append(f"  {name:<{width}}  {p:.4f}")
    thr = res.get("threshold")
    point = ("the model's operating point: threshold " + ", ".join(f"{t:.3f}" for t in thr)) if thr else \
        ("the most probable class" if res["task"] == "multiclass" else "threshold 0.5 (the model has no operating point)")
    lines.append(f"Prediction: {', '.join(res.get('prediction') or []) or 'no finding'} (at {point})")
    lines.append(f"({res['timing']['total_s']:.1f}s end to end, {res['timing']['session_s']:.1f}s encrypted session)")
    return "\n".join(lines)


def _cmd_predict(args: argparse.Namespace) -> int:
    import logging

    logging.getLogger().setLevel(logging.WARNING if not args.verbose else logging.DEBUG)  # CrypTen logs at INFO
    res = predict(args.scan, args.service, args.token, ca_cert=args.ca_cert, insecure=args.insecure,
                  rpc_timeout=args.timeout)
    if args.json:
        print(json.dumps(res))
    else:
        print(format_result(res))
    sys.stdout.flush()
    return 0
