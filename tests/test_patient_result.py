"""What a patient reads from ``xrayfed predict``, and the figures it rests on.

The result states the decision once, shows a score only next to the threshold it is compared
with and never as certainty, says how often the model is right on held-out scans (measured by
the server and carried by the checkpoint and ``ModelInfo``, or "not measured"), and that it is
not a diagnosis. A wrong CA certificate is one line on stderr. Every command that reads a
checkpoint refuses an encrypted one without the key with the same line, and reads it with the key.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from xrayfed.client.patient import NOT_A_DIAGNOSIS, format_html, format_result
from xrayfed.common import cli
from xrayfed.common.checkpoint import Checkpoint, from_bytes, to_bytes
from xrayfed.common.errors import UserError
from xrayfed.common.model import build_model, default_model
from xrayfed.common.prediction import (
    TaskSpec,
    check_performance,
    compute_metrics,
    decide,
    measured_performance,
    probabilities,
)
from xrayfed.common.procs import free_port, venv_bin
from xrayfed.common.security.atrest import load_checkpoint

BINARY = TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA"))
FOUR = TaskSpec(kind="multiclass", class_names=("COVID-19", "bacterial", "healthy", "viral"))
LABELS = TaskSpec(kind="multilabel", class_names=("Effusion", "Mass", "Nodule"))
PERF = {"split": "test", "scans": 624, "classes": {"PNEUMONIA": {"sensitivity": 0.941, "specificity": 0.70,
                                                                 "with": 390, "without": 234}}}
SIZE = 32


def result(task: TaskSpec, probs, threshold, performance=None) -> dict:
    return {"format": "xrayfed-prediction/1", "class_names": list(task.class_names), "probabilities": list(probs),
            "task": task.kind, "threshold": threshold, "prediction": decide(task, probs, threshold),
            "performance": performance, "model_version": "1f0c2a9e8b7d6c54",
            "timing": {"total_s": 0.8, "session_s": 0.3}}


def numbers(text: str) -> list[str]:
    import re

    return re.findall(r"\d+\.\d+", text)


# --------------------------------------------------------------------------- the text
def test_a_score_below_the_operating_point_reads_as_the_decision_it_gave():
    """A score of 0.80 under a threshold of 0.952 is NORMAL: stated once, the score shown against
    the threshold, no raw probability of the other class, no jargon, the version last."""
    text = format_result(result(BINARY, [0.20, 0.80], [0.952], PERF))
    lines = text.splitlines()
    assert [ln for ln in lines if ln.startswith("Result:")] == [
        "Result: NORMAL. The model did not flag this scan for PNEUMONIA."]
    assert "Score for PNEUMONIA: 0.80, below the model's threshold 0.95 for PNEUMONIA." in lines
    assert "0.20" not in text and "Prediction" not in text
    assert "binary" not in text.lower() and "1f0c2a9e8b7d6c54" in lines[-1]
    assert sum("1f0c2a9e8b7d6c54" in ln for ln in lines) == 1
    assert NOT_A_DIAGNOSIS in lines


def test_no_score_reads_as_certainty_and_close_calls_keep_their_order():
    text = format_result(result(BINARY, [1e-6, 1 - 1e-6], [0.952], PERF))
    assert "Result: PNEUMONIA. The model flagged this scan for PNEUMONIA." in text
    assert "Score for PNEUMONIA: more than 0.99, at or above the model's threshold 0.95" in text
    assert not any(n in ("1.00", "1.0000", "0.00", "0.0000") for n in numbers(text))
    # 0.9515 under 0.952 must not print as "0.95, below ... 0.95"
    close = format_result(result(BINARY, [0.0485, 0.9515], [0.952], PERF))
    assert "Score for PNEUMONIA: 0.9515, below the model's threshold 0.9520" in close
    low = format_result(result(BINARY, [0.999, 0.001], None, None))
    assert "Score for PNEUMONIA: less than 0.01, below the default threshold 0.50" in low


def test_a_score_or_answer_too_close_to_print_apart_still_says_which_side_it_is_on():
    # 0.79999 under 0.8 prints as 0.8000 at the most decimals shown: the words say "just below"
    under = format_result(result(BINARY, [0.20001, 0.79999], [0.8], PERF))
    assert "Score for PNEUMONIA: 0.8000, just below the model's threshold 0.8000" in under
    assert "Result: NORMAL." in under
    over = format_result(result(BINARY, [0.19999, 0.80001], [0.8], PERF))
    assert "Score for PNEUMONIA: 0.8000, just above the model's threshold 0.8000" in over
    assert "Result: PNEUMONIA." in over
    # a multi-class answer whose lead does not show in the printed scores says so
    near = format_result(result(FOUR, [0.1, 0.300001, 0.3, 0.299999], None, None))
    assert "bacterial scored highest, only just above healthy." in near
    tie = format_result(result(FOUR, [0.1, 0.3, 0.3, 0.3], None, None))
    assert "bacterial and healthy scored the same; the model answers the first of them, bacterial." in tie


def test_the_models_measured_performance_in_plain_words_or_not_measured():
    text = format_result(result(BINARY, [0.2, 0.8], [0.952], PERF))
    assert "tested on 624 held-out scans it never trained on (the federation's test set)" in text
    assert "Of 100 scans with PNEUMONIA, it flagged PNEUMONIA for about 94 and missed it for about 6" in text
    assert "Of 100 scans without PNEUMONIA, it wrongly flagged PNEUMONIA for about 30" in text
    old = format_result(result(BINARY, [0.2, 0.8], [0.952], None))
    assert "How often the model is right: not measured" in old and "Of 100" not in old


def test_multiclass_and_multilabel_results():
    perf = {"split": "test", "scans": 400, "classes": {n: {"sensitivity": 0.8, "specificity": 0.9, "with": 100,
                                                           "without": 300} for n in FOUR.class_names}}
    text = format_result(result(FOUR, [0.001, 0.71, 0.05, 0.239], None, perf))
    assert [ln for ln in text.splitlines() if ln.startswith("Result:")] == [
        "Result: bacterial. Of the 4 answers the model can give (COVID-19, bacterial, healthy, viral), "
        "bacterial scored highest."]
    assert "bacterial 0.71, viral 0.24, healthy 0.05, COVID-19 less than 0.01" in text
    assert "Of 100 scans without bacterial, it wrongly answered bacterial for about 10" in text
    # two close scores keep the answer visibly on top
    tie = format_result(result(FOUR, [0.0, 0.4051, 0.189, 0.4059], None, perf))
    assert "viral 0.406, bacterial 0.405" in tie

    thr = [0.41, 0.5, 0.45]
    perf = {"split": "test", "scans": 400, "classes": {n: {"sensitivity": s, "specificity": 0.9, "with": 50,
                                                           "without": 350}
                                                       for n, s in zip(LABELS.class_names, (0.7, 0.5, None))}}
    flagged = format_result(result(LABELS, [0.62, 0.1, 0.44], thr, perf))
    assert "Result: the model flagged Effusion on this scan (of the 3 findings it looks for)." in flagged
    assert "Score for Effusion: 0.62, at or above the model's threshold 0.41 for Effusion." in flagged
    assert "0.44" not in flagged and "Mass" not in flagged  # unflagged labels' scores are not shown as findings
    none = format_result(result(LABELS, [0.1, 0.1, 0.1], thr, perf))
    assert "Result: no finding. The model flagged none of the 3 findings it looks for on this scan." in none
    assert "it flagged that finding for about 60 on average over its 2 findings" in none
    assert NOT_A_DIAGNOSIS in none and NOT_A_DIAGNOSIS in flagged


def test_html_page_escapes_and_says_the_same():
    evil = TaskSpec(kind="binary", class_names=("NORMAL", "<script>x</script>"))
    page = format_html(result(evil, [0.3, 0.7], [0.5], None))
    assert "<script>" not in page and "&lt;script&gt;" in page and "not a diagnosis" in page


def test_an_unwritable_html_page_is_one_line_and_never_costs_the_result(tmp_path, monkeypatch, capsys):
    import xrayfed.client.patient as patient

    calls = []
    monkeypatch.setattr(patient, "predict", lambda *a, **k: calls.append(1) or result(BINARY, [0.2, 0.8], [0.5]))
    argv = ["predict", "--scan", "x.png", "--service", "127.0.0.1:1", "--token", "t.tok"]
    # a folder, or a folder that does not exist: refused before anything is sent
    for bad in (tmp_path, tmp_path / "missing" / "r.html"):
        assert cli.main(argv + ["--html", str(bad)]) == 2 and calls == []
        assert capsys.readouterr().err.count("\n") == 1
    # a page that cannot be written after the prediction: the result is printed, then one line
    def fail(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(patient, "atomic_write", fail)
    assert cli.main(argv + ["--html", str(tmp_path / "r.html")]) == 2
    out = capsys.readouterr()
    assert "Result: PNEUMONIA." in out.out and NOT_A_DIAGNOSIS in out.out
    assert out.err.startswith("xrayfed: error: --html ") and "Permission denied" in out.err
    assert out.err.count("\n") == 1 and "Traceback" not in out.err


# --------------------------------------------------------------------------- the figures
def test_extreme_logits_give_scores_without_a_warning_line():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "overflow encountered in exp" would be a stray stderr line
        p = probabilities(BINARY, np.array([[-1000.0]]))[0]
        q = probabilities(LABELS, np.array([[-1000.0, 1000.0, 0.0]]))[0]
    assert p.tolist() == [1.0, 0.0] and q.tolist() == [0.0, 1.0, 0.5]
    text = format_result(result(BINARY, list(p), [0.5], None))
    assert "Score for PNEUMONIA: less than 0.01, below the model's threshold 0.50" in text


def test_measured_performance_counts_what_decide_flags():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    logits = (2.0 * y - 1 + rng.normal(0, 1.5, 300))[:, None]
    p = measured_performance(BINARY, logits, y, [0.6], "test")
    flagged = np.array([decide(BINARY, q, [0.6]) == ["PNEUMONIA"] for q in probabilities(BINARY, logits)])
    c = p["classes"]["PNEUMONIA"]
    assert (p["scans"], c["with"], c["without"]) == (300, int(y.sum()), int((1 - y).sum()))
    assert c["sensitivity"] == pytest.approx(flagged[y == 1].mean())
    assert c["specificity"] == pytest.approx(1 - flagged[y == 0].mean())
    m = compute_metrics(BINARY, logits, y, threshold=0.6)
    assert (c["sensitivity"], c["specificity"]) == pytest.approx((m["sensitivity"], m["specificity"]))
    ml = measured_performance(LABELS, rng.normal(size=(50, 3)), np.zeros((50, 3)), [0.5] * 3, "val")
    assert ml["classes"]["Mass"]["sensitivity"] is None and ml["classes"]["Mass"]["with"] == 0


def test_server_evaluation_measures_the_performance_the_checkpoint_carries():
    from torch.utils.data import TensorDataset

    from xrayfed.common.config import FederationConfig
    from xrayfed.server.federation import evaluate_global

    torch.manual_seed(0)
    cfg = FederationConfig(image_size=SIZE)
    model = build_model(cfg.model).eval()
    x = torch.randn(40, 1, SIZE, SIZE)
    y = torch.tensor([0, 1] * 20)
    ev = evaluate_global(model, cfg, TensorDataset(x, y), TensorDataset(x[:20], y[:20]), torch.device("cpu"))
    perf = ev["performance"]
    assert perf["split"] == "test" and perf["scans"] == 40
    with torch.no_grad():
        logits = model(x).numpy()
    assert perf == measured_performance(cfg.task, logits, y.numpy(), ev["threshold"], "test")
    assert evaluate_global(model, cfg, None, TensorDataset(x, y), torch.device("cpu"))["performance"] is None


def _ckpt(task: TaskSpec = BINARY, performance=None, threshold=None) -> Checkpoint:
    torch.manual_seed(1)
    spec = default_model(SIZE, task.num_outputs).model_copy(update={"width": 8, "depth": 2})
    return Checkpoint(model=spec, task=task, image_size=SIZE, state_dict=build_model(spec).state_dict(),
                      threshold=threshold, performance=performance)


def test_checkpoint_and_model_info_carry_the_performance():
    from xrayfed.client.inference.service import model_metadata

    ck = from_bytes(to_bytes(_ckpt(performance=PERF, threshold=[0.952])))
    assert ck.performance == PERF and model_metadata(ck)["performance"] == PERF
    assert from_bytes(to_bytes(_ckpt())).performance is None  # an older checkpoint: not measured
    for bad in ({"split": "test", "scans": 5, "classes": {"COVID": {}}},
                {"split": "test\x1b[2J", "scans": 5, "classes": {}},
                {"split": "test", "scans": 5, "classes": {"PNEUMONIA": {"sensitivity": 1.7, "specificity": 0.5,
                                                                        "with": 1, "without": 1}}}):
        d = _ckpt().to_dict()
        d["performance"] = bad
        import io

        buf = io.BytesIO()
        torch.save(d, buf)
        with pytest.raises(UserError, match="performance field is malformed"):
            from_bytes(buf.getvalue(), source="x.pt")
        with pytest.raises(ValueError):
            check_performance(bad, BINARY)


# --------------------------------------------------------------------------- a wrong CA certificate
@pytest.fixture
def tls_service(tmp_path):
    """A TLS gRPC server on 127.0.0.1 with a certificate of one PKI, a second PKI's CA, a token."""
    from xrayfed.client.inference import tokens
    from xrayfed.common import rpc
    from xrayfed.server.pki import init_pki

    init_pki(tmp_path / "pki")
    init_pki(tmp_path / "other")
    creds = rpc.server_credentials(tmp_path / "pki" / "inference" / "tls.pem",
                                   tmp_path / "pki" / "inference" / "tls.key", "test")
    server, port = rpc.start_server("xrayfed.inference.v1.Inference", {"ModelInfo": lambda r, c: {}},
                                    host="127.0.0.1", port=free_port(), creds=creds, max_workers=2, what="test",
                                    listen="test")
    key, _ = tokens.generate_key(tmp_path / "t.key")
    (tmp_path / "t.tok").write_text(tokens.issue_token(tokens.load_private_key(key), "P1", int(time.time()) + 600))
    from PIL import Image

    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(tmp_path / "scan.png")
    try:
        yield tmp_path, port
    finally:
        server.stop(0).wait(5)


def _predict(root: Path, port: int, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}  # as a patient's shell has it
    return subprocess.run([venv_bin("xrayfed"), "predict", "--scan", str(root / "scan.png"), "--service",
                           f"127.0.0.1:{port}", "--token", str(root / "t.tok"), *extra],
                          capture_output=True, text=True, timeout=120, env=env)


def test_a_wrong_or_missing_ca_certificate_is_one_friendly_line(tls_service):
    root, port = tls_service
    for extra in (["--ca-cert", str(root / "other" / "ca.pem")], []):
        r = _predict(root, port, *extra)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.splitlines() == [
            f"xrayfed: error: cannot reach the inference service at 127.0.0.1:{port}: its TLS certificate is not "
            "signed by a CA you trust; pass the CA certificate it was issued with: --ca-cert FILE (e.g. the ca.pem "
            "you were given)"], r.stderr
    (root / "junk.pem").write_text("not a certificate\n")
    r = _predict(root, port, "--ca-cert", str(root / "junk.pem"))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "not a PEM CA certificate" in r.stderr
    # the right CA gets through TLS; a service that answers nonsense is one line too, not a traceback
    r = _predict(root, port, "--ca-cert", str(root / "pki" / "ca.pem"))
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"xrayfed: error: the inference service at 127.0.0.1:{port} sent no usable model description (KeyError); "
        "is it an xrayfed inference service of this version?"]


def test_class_names_with_control_characters_never_reach_the_patients_terminal(tmp_path, monkeypatch):
    """The service names the classes the patient reads: an escape sequence (which could rewrite the
    terminal, e.g. clear the real result) is refused in one line before the scan is shared."""
    from PIL import Image

    import xrayfed.client.patient as patient
    from xrayfed.client.inference import tokens

    key, _ = tokens.generate_key(tmp_path / "t.key")
    (tmp_path / "t.tok").write_text(tokens.issue_token(tokens.load_private_key(key), "P1", int(time.time()) + 600))
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(tmp_path / "scan.png")

    class Channel:
        def close(self):
            pass

    sent = []
    monkeypatch.setattr(patient.rpc, "make_channel", lambda *a, **k: Channel())
    monkeypatch.setattr(patient.rpc, "method", lambda *a, **k: a[-1])
    monkeypatch.setattr(patient.rpc, "call", lambda m, req, **k: sent.append(m) or {
        "model": {"in_channels": 1}, "image_size": 32, "threshold": [0.5], "performance": None,
        "task": {"kind": "binary", "class_names": ["NORMAL", "\x1b[2J\x1b[HPNEUMONIA"]}, "mpc": {}})
    with pytest.raises(UserError, match="sent no usable model description"):
        patient.predict(tmp_path / "scan.png", "127.0.0.1:1", tmp_path / "t.tok")
    assert sent == ["ModelInfo"]  # nothing after the model description: no session, no share of the scan
    # the model version, printed on the last line, likewise
    monkeypatch.setattr(patient.rpc, "call", lambda m, req, **k: sent.append(m) or {
        "model": {"in_channels": 1}, "image_size": 32, "threshold": [0.5], "performance": None,
        "model_version": "1f0c\x1b]0;owned\x07", "task": BINARY.to_dict(), "mpc": {}})
    with pytest.raises(UserError, match="sent no usable model description"):
        patient.predict(tmp_path / "scan.png", "127.0.0.1:1", tmp_path / "t.tok")
    assert sent == ["ModelInfo", "ModelInfo"]


# --------------------------------------------------------------------------- checkpoints encrypted at rest
@pytest.fixture
def encrypted(tmp_path, monkeypatch):
    from xrayfed.common.security.atrest import make_atrest_key, read_key_file, save_checkpoint as save_enc

    for var in ("XRAYFED_ATREST_KEY", "XRAYFED_ATREST_KEY_FILE"):
        monkeypatch.delenv(var, raising=False)
    key_file = make_atrest_key(tmp_path / "atrest.key")
    path = tmp_path / "best.pt"
    save_enc(path, _ckpt(performance=PERF, threshold=[0.6]), read_key_file(key_file))
    return path, key_file


def _refusal(path: Path) -> str:
    return (f"xrayfed: error: {path}: the file is encrypted; pass --atrest-key-file or set XRAYFED_ATREST_KEY_FILE / "
            "XRAYFED_ATREST_KEY")


def test_every_command_that_reads_a_checkpoint_refuses_an_encrypted_one_without_the_key_the_same_way(
        encrypted, tmp_path, capsys):
    from PIL import Image

    path, _ = encrypted
    Image.fromarray(np.full((64, 64), 100, np.uint8)).save(tmp_path / "scan.png")
    _, pub = __import__("xrayfed.client.inference.tokens", fromlist=["x"]).generate_key(tmp_path / "tok.key")
    commands = {
        "serve-inference": ["serve-inference", "--model", str(path), "--token-key", str(pub), "--insecure",
                            "--listen", f"127.0.0.1:{free_port()}"],
        "explain": ["explain", "--model", str(path), "--scan", str(tmp_path / "scan.png"), "--out",
                    str(tmp_path / "h.png")],
        "export": ["export", "--model", str(path), "--format", "onnx", "--out", str(tmp_path / "m.onnx")],
        "certs decrypt-checkpoint": ["certs", "decrypt-checkpoint", "--model", str(path), "--out",
                                     str(tmp_path / "plain.pt")],
    }
    for name, argv in commands.items():
        capsys.readouterr()
        assert cli.main(argv) == 2, name
        assert capsys.readouterr().err.splitlines() == [_refusal(path)], name


def test_every_command_that_reads_a_checkpoint_reads_an_encrypted_one_with_the_key(encrypted, tmp_path, capsys):
    from PIL import Image

    from xrayfed.common.security.atrest import read_key_file

    path, key_file = encrypted
    key = ["--atrest-key-file", str(key_file)]
    assert load_checkpoint(path, read_key_file(key_file)).performance == PERF
    Image.fromarray(np.full((64, 64), 100, np.uint8)).save(tmp_path / "scan.png")
    assert cli.main(["explain", "--model", str(path), "--scan", str(tmp_path / "scan.png"), "--out",
                     str(tmp_path / "h.png"), *key]) == 0
    assert cli.main(["export", "--model", str(path), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                     *key]) == 0
    from xrayfed.client.export import read_metadata

    assert read_metadata(tmp_path / "m.onnx", "onnx")["performance"] == PERF  # the exported model says it too
    assert cli.main(["certs", "decrypt-checkpoint", "--model", str(path), "--out", str(tmp_path / "plain.pt"),
                     *key]) == 0
    assert load_checkpoint(tmp_path / "plain.pt").performance == PERF
    # serve-inference with --atrest-key-file: the encrypted-inference stack serves its binary model that way
    # (tests/test_encrypted_inference.py, Stack)
