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
6. the logits are the sum of the two shares; the scores and the decision at the model's
   operating point are computed here and printed in plain words (:func:`result_lines`): the
   decision once, a score only next to the threshold it is compared with (never "1.0000"), the
   model's sensitivity/specificity on held-out scans as it came with the model ("not measured"
   when the checkpoint has none), and that it is not a diagnosis. ``--json`` for software,
   ``--html FILE`` for a page (mode 0600).

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
from xrayfed.common.files import atomic_write
from xrayfed.common.logs import RPC_EXPOSED, warn_insecure
from xrayfed.common.mpc import dealer
from xrayfed.common.prediction import TaskSpec, check_performance, decide, probabilities
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
    """Run one encrypted prediction; returns what ``predict --json`` prints (keys: ``format``
    (``"xrayfed-prediction/1"``), ``task``, ``class_names``, ``probabilities`` (the model's score per
    class, in ``class_names`` order), ``threshold`` (the operating point, or None), ``prediction``
    (the decided class names; empty: no finding), ``performance`` (the model's measured
    sensitivity/specificity, or None), ``model_version``, ``timing``, ``communication``).

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
        try:
            model, task = info["model"], TaskSpec.from_dict(info["task"])
            if not all(isinstance(n, str) and 0 < len(n) <= 64 and n.isprintable() for n in task.class_names):
                raise ValueError("class names")  # printed to the patient: no control/escape characters
            version = info.get("model_version")
            if not (isinstance(version, str) and 0 < len(version) <= 64 and version.isprintable()):
                raise ValueError("model_version")  # printed on the result's last line
            size, chans = int(info["image_size"]), int(model.get("in_channels", 1))
            performance = check_performance(info.get("performance"), task)
            threshold = info.get("threshold")
            if threshold is not None:
                threshold = [float(t) for t in threshold]
                if len(threshold) != (1 if task.kind == "binary" else len(task.class_names)) \
                        or task.kind == "multiclass" or not all(0.0 <= t <= 1.0 for t in threshold):
                    raise ValueError("threshold")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"the inference service at {service} sent no usable model description "
                            f"({type(e).__name__}); is it an xrayfed inference service of this version?") from None
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
        cp_flag = "--crypto-provider-ca-cert" if crypto_provider_ca_cert is not None else "--ca-cert"
        provider = rpc.make_channel(cp_addr, ca_cert=crypto_provider_ca_cert or ca_cert, insecure=insecure,
                                    server_name=None if insecure else str(cp.get("server_name") or CRYPTO_PROVIDER_NAME),
                                    ca_flag=cp_flag)
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
                           what="the crypto provider", target=cp_addr, ca_flag=cp_flag)
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
    return {
        "format": RESULT_FORMAT,
        "class_names": list(task.class_names),
        "probabilities": [float(p) for p in probs],
        "task": task.kind,
        "threshold": threshold,
        "prediction": decide(task, probs, threshold),
        "performance": performance,
        "model_version": sess["model_version"],
        "timing": {"total_s": time.perf_counter() - t_start, "session_s": time.perf_counter() - t_open,
                   "deal_s": deal_s},
        "communication": {"bytes_sent": int(sent), "bytes_received": len(hb["y"]) + len(cb["y"])},
    }


RESULT_FORMAT = "xrayfed-prediction/1"  # the "format" key of `predict --json`; bumped only for incompatible changes
NOT_A_DIAGNOSIS = "This is not a diagnosis. Please discuss this result with your doctor."


def _digits(a: float, b: float) -> int:
    """Decimals (2..4) at which ``a`` and ``b`` print on the same sides of each other as they are."""
    for d in (2, 3, 4):
        ra, rb = round(a, d), round(b, d)
        if (ra > rb) == (a > b) and (ra < rb) == (a < b) and (ra != rb or a == b):
            return d
    return 4


def _num(p: float, d: int = 2) -> str:
    """A score at ``d`` decimals that never reads as certainty: ``more than 0.99`` / ``less than 0.01``."""
    step = 10.0 ** -d
    if round(p, d) >= 1.0:
        return f"more than {1 - step:.{d}f}"
    if round(p, d) <= 0.0:
        return f"less than {step:.{d}f}"
    return f"{p:.{d}f}"


def _score_line(name: str, p: float, t: float, default: bool) -> str:
    d = _digits(p, t)
    where = "at or above" if p >= t else "below"
    if round(p, d) == round(t, d) and p != t:  # too close to tell apart at 4 decimals: say which side
        where = "just " + ("above" if p > t else "below")
    which = "the default threshold" if default else "the model's threshold"
    return f"Score for {name}: {_num(p, d)}, {where} {which} {t:.{d}f} for {name}."


def _about(x: float) -> int:
    return int(round(100 * x))


def _performance_lines(res: dict, names: list[str], verb: str) -> list[str]:
    """How often the model is right for ``names`` (the classes the result is about), in words."""
    perf = res.get("performance")
    if not perf:
        return ["How often the model is right: not measured (this model was saved without a test on "
                "held-out scans)."]
    classes = perf["classes"]
    where = (f"tested on {perf['scans']} held-out scans it never trained on (the federation's "
             f"{perf['split']} set)")
    lines = [f"How often the model is right, {where}:"]
    shown = [n for n in names if n in classes]
    if not shown:
        return [f"How often the model is right: not measured for {', '.join(names)}."]
    for n in shown:
        c = classes[n]
        if c["sensitivity"] is None:
            lines.append(f"  There were no scans with {n} among them, so how often it finds {n} was not measured.")
        else:
            lines.append(f"  Of 100 scans with {n}, it {verb} {n} for about {_about(c['sensitivity'])} "
                         f"and missed it for about {100 - _about(c['sensitivity'])} ({c['with']} such scans tested).")
        if c["specificity"] is None:
            lines.append(f"  There were no scans without {n} among them, so its false alarms were not measured.")
        else:
            lines.append(f"  Of 100 scans without {n}, it wrongly {verb} {n} for about "
                         f"{100 - _about(c['specificity'])} ({c['without']} such scans tested).")
    return lines


def result_lines(res: dict) -> list[str]:
    """The patient's result in plain words: the decision once, any score next to the point at
    which the model decides, how often the model is right on held-out scans, that it is not a
    diagnosis; the model version and timing on the last line."""
    names, probs, kind = list(res["class_names"]), [float(p) for p in res["probabilities"]], res["task"]
    decided = list(res.get("prediction") or [])
    thr = res.get("threshold")
    lines = ["Your encrypted prediction (only you can see this result)", ""]
    if kind == "binary":
        neg, pos = names
        t, default = (float(thr[0]), False) if thr else (0.5, True)
        if decided == [pos]:
            lines.append(f"Result: {pos}. The model flagged this scan for {pos}.")
        else:
            lines.append(f"Result: {neg}. The model did not flag this scan for {pos}.")
        lines.append(_score_line(pos, probs[1], t, default))
        about, verb = [pos], "flagged"
    elif kind == "multiclass":
        order = sorted(range(len(names)), key=lambda k: -probs[k])
        top = names[order[0]]
        d = _digits(probs[order[0]], probs[order[1]])
        second = names[order[1]]
        if probs[order[0]] == probs[order[1]]:  # an exact tie: the answer is the first class listed
            how = f"{top} and {second} scored the same; the model answers the first of them, {top}"
        elif round(probs[order[0]], d) == round(probs[order[1]], d):
            how = f"{top} scored highest, only just above {second}"
        else:
            how = f"{top} scored highest"
        lines.append(f"Result: {top}. Of the {len(names)} answers the model can give ({', '.join(names)}), {how}.")
        lines.append("Scores (they add up to 1; the highest is the result): "
                     + ", ".join(f"{names[k]} {_num(probs[k], d)}" for k in order) + ".")
        about, verb = [top], "answered"
    else:
        ts = [float(x) for x in thr] if thr else [0.5] * len(names)
        if decided:
            lines.append(f"Result: the model flagged {' and '.join(decided)} on this scan "
                         f"(of the {len(names)} findings it looks for).")
            for n in decided:
                k = names.index(n)
                lines.append("  " + _score_line(n, probs[k], ts[k], not thr))
        else:
            lines.append(f"Result: no finding. The model flagged none of the {len(names)} findings it looks for "
                         f"on this scan.")
        about, verb = decided, "flagged"
    lines.append("")
    if kind == "multilabel" and not decided:
        lines += _missed_findings(res)
    else:
        lines += _performance_lines(res, about, verb)
    lines += ["", NOT_A_DIAGNOSIS]
    lines.append(f"(model version {res['model_version']}; {res['timing']['total_s']:.1f} s)")
    return lines


def _missed_findings(res: dict) -> list[str]:
    """For a multi-label result with no finding: how often the model misses a finding, on average."""
    perf = res.get("performance")
    sens = [c["sensitivity"] for c in (perf or {}).get("classes", {}).values() if c["sensitivity"] is not None]
    if not sens:
        return ["How often the model misses a finding: not measured (this model was saved without a test on "
                "held-out scans)."]
    m = sum(sens) / len(sens)
    return [f"How often the model is right, tested on {perf['scans']} held-out scans it never trained on (the "
            f"federation's {perf['split']} set):",
            f"  Of 100 scans with a finding, it flagged that finding for about {_about(m)} on average over its "
            f"{len(sens)} findings, so it can miss one."]


def format_result(res: dict) -> str:
    """:func:`result_lines` as text."""
    return "\n".join(result_lines(res))


def format_html(res: dict) -> str:
    """:func:`result_lines` as a small self-contained HTML page (no scripts, no external files)."""
    import html

    lines = result_lines(res)
    body = []
    for ln in lines[1:]:
        if not ln:
            continue
        tag = "strong" if ln.startswith("Result:") or ln == NOT_A_DIAGNOSIS else "span"
        indent = ' style="margin-left:1.5em"' if ln.startswith("  ") else ""
        body.append(f"<p{indent}><{tag}>{html.escape(ln.strip())}</{tag}></p>")
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Your prediction</title>"
            "<style>body{font:16px/1.5 sans-serif;max-width:40em;margin:2em auto;padding:0 1em}"
            "p{margin:.4em 0}</style></head><body>"
            f"<h1>{html.escape(lines[0])}</h1>{''.join(body)}</body></html>\n")


def predict_cmd(args: argparse.Namespace) -> int:
    logging.getLogger().setLevel(logging.WARNING if not args.verbose else logging.DEBUG)  # CrypTen logs at INFO
    page = getattr(args, "html", None)
    if page is not None and (Path(page).is_dir() or not Path(page).parent.is_dir()):
        raise UserError(f"--html {page}: not a file in an existing folder")  # said before anything is sent
    res = predict(args.scan, args.service, args.token, ca_cert=args.ca_cert,
                  crypto_provider_ca_cert=args.crypto_provider_ca_cert,
                  insecure=args.insecure, rpc_timeout=args.timeout)
    print(json.dumps(res) if args.json else format_result(res))  # the result first: a failed page loses nothing
    sys.stdout.flush()
    if page is not None:
        try:
            atomic_write(page, format_html(res).encode("utf-8"), mode=0o600)  # the result is the patient's alone
        except OSError as e:
            raise UserError(f"--html {page}: cannot write the page ({e.strerror or type(e).__name__}); "
                            "the result above is complete") from None
        if not args.json:
            print(f"(also written to {page})")
    return 0
