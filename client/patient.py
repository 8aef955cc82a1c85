"""``xrayfed predict``: a patient's encrypted prediction on their own chest X-ray.

The scan never leaves the patient's device in the clear and the patient never learns the
model's weights. The process opens two outbound TLS connections, to the hospital's inference
service and to the crypto provider (both on the ports those services listen on), never listens
on a socket, and imports neither torch nor CrypTen (it starts in a fraction of a second):

1. the scan is read and checked locally (PNG, JPEG or DICOM; a non-image or truncated file is
   refused before anything is sent), with the same preprocessing as training
   (:func:`xrayfed.common.preprocess.prepare_scan_array`);
2. ``ModelInfo`` (TLS, token) tells the image size, the model's public first layer (input pool,
   ScatterNet front end) and the MPC tape;
3. the patient shares its scan after that first layer, ``x = x0 + x1``, and deals the correlated
   randomness of the whole forward pass (:mod:`xrayfed.common.mpc.dealer`);
4. ``OpenSession`` sends the token and the scan's *description* (size, channels, and for DICOM
   the PatientID — the service refuses a scan that is not the token holder's own); the hospital
   starts its party and the crypto provider's, which connect to each other over TLS;
5. ``Evaluate`` to both (in parallel): ``x0`` + a seed to the hospital, ``x1`` + a seed + the
   dealt corrections to the crypto provider (whose certificate must carry the name
   ``xrayfed-crypto-provider``); each answers its re-randomised share of the logits;
6. the logits are the sum of the two shares; probabilities are computed here and printed.

Every failure (bad file, wrong size/channels, unreachable service, refused token, broken
session) ends as one line ``xrayfed: error: ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from xrayfed.client.inference.tokens import read_token_file
from xrayfed.common import preprocess, rpc
from xrayfed.common.addresses import parse_hostport
from xrayfed.common.errors import UserError
from xrayfed.common.logs import RPC_EXPOSED, warn_insecure
from xrayfed.common.mpc import dealer
from xrayfed.common.prediction import TaskSpec, decide, probabilities
from xrayfed.common.protocol.inference import (
    CRYPTO_PROVIDER_NAME,
    CRYPTO_PROVIDER_SERVICE,
    EVALUATE,
    INFERENCE_SERVICE,
    MODEL_INFO,
    OPEN_SESSION,
)


def _read_scan_identity(path: Path) -> tuple[str, str | None]:
    """(format, DICOM PatientID or None) of the scan file."""
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
    """The scan as the model's input array (1, C, S, S) float32 (numpy), or a one-line UserError."""
    import numpy as np

    try:
        x = preprocess.prepare_scan_array(path, image_size)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a preprocessing failure is the user's file
        raise UserError(f"--scan {path}: cannot read the image ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else 'unreadable'})") from None
    if x.ndim != 4 or x.shape[0] != 1:
        raise UserError(f"--scan {path}: preprocessing gave an unexpected shape {tuple(x.shape)}")
    if x.shape[1] != in_channels and x.shape[1] == 1:
        x = np.repeat(x, in_channels, axis=1)  # grayscale scan for a model with an RGB stem
    if tuple(x.shape) != (1, in_channels, image_size, image_size):
        raise UserError(f"--scan {path}: image is {x.shape[1]} channel(s) x {x.shape[2]}x{x.shape[3]} px; "
                        f"the model takes {in_channels} channel(s) x {image_size}x{image_size} px")
    if not np.isfinite(x).all():
        raise UserError(f"--scan {path}: image has non-finite pixel values")
    return np.ascontiguousarray(x, dtype=np.float32)


def predict(scan: Path, service: str, token_path: Path, *, ca_cert: Path | None = None,
            crypto_provider_ca_cert: Path | None = None, insecure: bool = False, rpc_timeout: float = 30.0,
            observe=None) -> dict:
    """Run one encrypted prediction; returns ``{class_names, probabilities, model_version, ...}``.

    Imports neither torch nor CrypTen: the patient's part (sharing the scan, dealing the
    randomness, adding the two output shares) is numpy (:mod:`xrayfed.common.mpc.dealer`).
    ``observe(event)`` (tests only) is called at ``"dealt"`` and ``"sent_hospital"``.
    """
    t_start = time.perf_counter()
    parse_hostport(service, "--service")
    scan = Path(scan)
    token = read_token_file(token_path)
    fmt, dicom_pid = _read_scan_identity(scan)
    try:
        preprocess.load_image(scan)  # a non-image or truncated file fails here, before any network
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--scan {scan}: not a readable PNG, JPEG or DICOM image ({type(e).__name__})") from None

    if insecure:
        warn_insecure("predict", RPC_EXPOSED)
    hospital = rpc.make_channel(service, ca_cert=ca_cert, insecure=insecure)
    provider = None
    try:
        info = rpc.call(rpc.method(hospital, INFERENCE_SERVICE, MODEL_INFO), {"token": token}, timeout=rpc_timeout,
                        what="the inference service", target=service)
        model, task = info["model"], TaskSpec.from_dict(info["task"])
        size, chans = int(info["image_size"]), int(model.get("in_channels", 1))
        x = prepare(scan, size, chans)
        try:
            tape = dealer.check_tape(info["mpc"]["tape"])
            front = info["mpc"]
            dealer.front_plan(front)  # refuses a plan the patient will not run
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"the inference service sent no usable MPC plan ({e}); is it an older version?") from None

        # The patient's part, before the session opens: share the scan (after the model's public
        # first layer) and deal the randomness of the whole forward pass.
        t_deal = time.perf_counter()
        to_h, to_c = dealer.contributions(x, front, tape)
        deal_s = time.perf_counter() - t_deal
        if observe is not None:
            observe("dealt")

        t_open = time.perf_counter()
        sess = rpc.call(rpc.method(hospital, INFERENCE_SERVICE, OPEN_SESSION),
                        {"token": token, "scan": {"image_size": size, "channels": chans, "format": fmt,
                                                  "dicom_patient_id": dicom_pid}},
                        timeout=rpc_timeout, what="the inference service", target=service)
        if sess.get("model_version") != info.get("model_version") or sess.get("model") != model \
                or sess.get("mpc", {}).get("tape_digest") != dealer.tape_digest(tape):
            raise UserError("the service changed its model between requests; run predict again")
        cp = sess.get("crypto_provider") or {}
        cp_addr = str(cp.get("address", ""))
        parse_hostport(cp_addr, "the crypto provider's address (from the service)")
        provider = rpc.make_channel(cp_addr, ca_cert=crypto_provider_ca_cert or ca_cert, insecure=insecure,
                                    server_name=None if insecure else str(cp.get("server_name") or CRYPTO_PROVIDER_NAME))
        sid = str(sess["session_id"])
        req_h = ({"token": token, "session_id": sid}, dealer.to_blobs(to_h))
        req_c = ({"session_id": sid}, dealer.to_blobs(to_c))
        sent = sum(len(v) for v in req_h[1].values()) + sum(len(v) for v in req_c[1].values())

        wait_s = float(sess.get("timeout_s", 120)) + 5
        with ThreadPoolExecutor(2) as ex:
            fh = ex.submit(rpc.call, rpc.method(hospital, INFERENCE_SERVICE, EVALUATE), req_h, timeout=wait_s,
                           what="the inference service", target=service)
            if observe is not None:
                observe("sent_hospital")
            fc = ex.submit(rpc.call, rpc.method(provider, CRYPTO_PROVIDER_SERVICE, EVALUATE), req_c, timeout=wait_s,
                           what="the crypto provider", target=cp_addr)
            (hh, hb), (ch, cb) = fh.result(), fc.result()
    finally:
        hospital.close()
        if provider is not None:
            provider.close()
    try:
        y0, y1 = dealer.unpack(hb["y"], hh["shape"]), dealer.unpack(cb["y"], ch["shape"])
        logits = dealer.reconstruct(y0, y1).reshape(1, -1)
    except (KeyError, ValueError) as e:
        raise UserError(f"the parties' answers do not fit together ({type(e).__name__})") from None
    if logits.shape[1] != task.num_outputs:
        raise UserError(f"the parties answered {logits.shape[1]} outputs; the model has {task.num_outputs}")
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
                   "deal_s": deal_s},
        "communication": {"bytes_sent": int(sent), "bytes_received": len(hb["y"]) + len(cb["y"])},
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


def predict_cmd(args: argparse.Namespace) -> int:
    logging.getLogger().setLevel(logging.WARNING if not args.verbose else logging.DEBUG)  # CrypTen logs at INFO
    res = predict(args.scan, args.service, args.token, ca_cert=args.ca_cert,
                  crypto_provider_ca_cert=args.crypto_provider_ca_cert,
                  insecure=args.insecure, rpc_timeout=args.timeout)
    if args.json:
        print(json.dumps(res))
    else:
        print(format_result(res))
    sys.stdout.flush()
    return 0
