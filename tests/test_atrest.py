"""Encryption at rest: round trips, wrong key, tampering, ledger lines, key loading."""

from __future__ import annotations

import base64
import os
import stat

import pytest
import torch

from xrayfed.common.security import atrest
from xrayfed.common.security.atrest import (
    AtRestKey,
    decrypt_bytes,
    decrypt_line,
    encrypt_bytes,
    encrypt_line,
    is_encrypted,
    load_key,
    parse_key,
    read_maybe_encrypted,
    write_encrypted,
)
from xrayfed.common.errors import UserError

WRONG = "cannot decrypt: wrong key or the file was modified"


@pytest.fixture()
def key_hex() -> str:
    return os.urandom(32).hex()


@pytest.fixture()
def key(key_hex) -> AtRestKey:
    return parse_key(key_hex)


def test_bytes_round_trip(key):
    data = os.urandom(1000)
    blob = encrypt_bytes(data, key, context=b"checkpoint")
    assert is_encrypted(blob) and data not in blob
    assert decrypt_bytes(blob, key, context=b"checkpoint") == data
    assert encrypt_bytes(data, key) != encrypt_bytes(data, key)  # fresh nonce each time
    assert decrypt_bytes(encrypt_bytes(b"", key), key) == b""


def test_wrong_key_and_context(key):
    blob = encrypt_bytes(b"secret weights", key)
    with pytest.raises(UserError, match=WRONG + r" \(it was encrypted with a different key\)"):
        decrypt_bytes(blob, AtRestKey.generate(), source="ckpt.pt")
    with pytest.raises(UserError, match=WRONG):
        decrypt_bytes(blob, key, context=b"ledger")
    with pytest.raises(UserError, match="is encrypted; pass --atrest-key-file"):
        decrypt_bytes(blob, None)


def test_tampering_is_detected_everywhere(key):
    blob = encrypt_bytes(b"x" * 64, key)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(UserError):
            decrypt_bytes(bytes(bad), key)
    for cut in (0, 10, len(blob) - 1):
        with pytest.raises(UserError):
            decrypt_bytes(blob[:cut], key)
    with pytest.raises(UserError, match=WRONG):
        decrypt_bytes(blob + b"\x00", key)


def test_checkpoint_round_trip(tmp_path, key):
    from xrayfed.common.checkpoint import Checkpoint
    from xrayfed.common.model import ModelSpec
    from xrayfed.common.prediction import TaskSpec

    sd = {"w": torch.randn(4, 3), "b": torch.zeros(4)}
    ck = Checkpoint(model=ModelSpec(), task=TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")),
                    image_size=28, state_dict=sd, round=3, run_id="r1")
    p = tmp_path / "ck.pt"
    atrest.save_checkpoint(p, ck, key)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600 and is_encrypted(p.read_bytes())
    back = atrest.load_checkpoint(p, key)
    assert back.round == 3 and torch.equal(back.state_dict["w"], sd["w"])
    assert back.model_version == ck.model_version
    with pytest.raises(UserError, match=f"ck.pt: {WRONG}"):
        atrest.load_checkpoint(p, AtRestKey.generate())
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x80
    p.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=WRONG):
        atrest.load_checkpoint(p, key)
    # plaintext checkpoints still load without a key, and are refused when encryption is required
    plain = tmp_path / "plain.pt"
    atrest.save_checkpoint(plain, ck, None)
    assert atrest.load_checkpoint(plain, None).round == 3
    with pytest.raises(UserError, match="not encrypted"):
        atrest.load_checkpoint(plain, key, require_encrypted=True)


def test_write_read_maybe_encrypted(tmp_path, key):
    p = tmp_path / "f.bin"
    write_encrypted(p, b"hello", key, context=b"c")
    assert read_maybe_encrypted(p, key, context=b"c") == b"hello"
    write_encrypted(p, b"hello", None)
    assert read_maybe_encrypted(p, None) == b"hello"


def test_ledger_lines(key):
    lines = [encrypt_line(f'{{"seq": {i}, "eps": 0.{i}}}', key, line_no=i + 1) for i in range(3)]
    assert all("\n" not in ln and atrest.is_encrypted_line(ln) for ln in lines)
    assert [decrypt_line(ln, key, line_no=i + 1) for i, ln in enumerate(lines)] == [
        f'{{"seq": {i}, "eps": 0.{i}}}' for i in range(3)]
    # moving a line to another position is detected (line number is authenticated)
    with pytest.raises(UserError, match=f"line 1: {WRONG}"):
        decrypt_line(lines[1], key, line_no=1)
    with pytest.raises(UserError, match=WRONG):
        decrypt_line(lines[0], AtRestKey.generate(), line_no=1)
    with pytest.raises(UserError, match=WRONG):
        decrypt_line(lines[0].replace('"ct":"', '"ct":"A'), key, line_no=1)
    with pytest.raises(UserError, match=WRONG):
        decrypt_line('{"seq": 0}', key, line_no=1)
    with pytest.raises(UserError, match=WRONG):
        decrypt_line(lines[0], key, line_no=1, context=b"other")


def test_key_loading(tmp_path, monkeypatch):
    raw = os.urandom(32)
    k_hex, k_b64 = parse_key(raw.hex()), parse_key(base64.b64encode(raw).decode())
    assert k_hex.key_id == k_b64.key_id == parse_key(base64.urlsafe_b64encode(raw).decode()).key_id
    blob = encrypt_bytes(b"z", k_hex)
    assert decrypt_bytes(blob, k_b64) == b"z"
    for bad in ("", "abc", "00" * 31, "zz" * 32, base64.b64encode(os.urandom(16)).decode()):
        with pytest.raises(UserError, match="not a key"):
            parse_key(bad, source="$X")
    assert load_key(env={}) is None
    with pytest.raises(UserError, match="no at-rest key"):
        load_key(env={}, required=True)
    assert load_key(env={atrest.ENV_KEY: raw.hex()}).key_id == k_hex.key_id
    f = tmp_path / "key"
    f.write_text(raw.hex() + "\n")
    assert load_key(env={atrest.ENV_KEY_FILE: str(f), atrest.ENV_KEY: os.urandom(32).hex()}).key_id == k_hex.key_id
    assert load_key(f, env={}).key_id == k_hex.key_id
    with pytest.raises(UserError, match="no file"):
        load_key(tmp_path / "missing", env={})
    # the secret never shows in repr or in error messages
    assert raw.hex() not in repr(k_hex) and raw.hex() not in str(k_hex)
    secret = "ab" * 31 + "zz"
    with pytest.raises(UserError) as e:
        parse_key(secret, source="$XRAYFED_ATREST_KEY")
    assert secret not in str(e.value)


def test_cli_key_works_with_loader(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "k"
    r = subprocess.run([sys.executable, "-m", "xrayfed.common.cli", "certs", "atrest-key", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text().strip() not in r.stdout + r.stderr  # the secret is never printed
    k = load_key(out, env={})
    assert decrypt_bytes(encrypt_bytes(b"q", k), load_key(env={atrest.ENV_KEY_FILE: str(out)})) == b"q"


# --------------------------------------------------------------------------- wired into the product
def _hospital(tmp_path, name="st-mary", **privacy):
    from xrayfed.common.config import HospitalConfig, load_config

    over = {"hospital.name": name, "hospital.state_dir": str(tmp_path / name), "privacy.noise_multiplier": 1.1,
            "privacy.epsilon": 2.5, "training.batch_size": 64, "training.local_epochs": 1.0}
    over.update({f"privacy.{k}": v for k, v in privacy.items()})
    return load_config(HospitalConfig, None, over)


def test_encrypted_privacy_ledger_round_trip_and_errors(tmp_path, key):
    from xrayfed.client.dp import PrivacyLedger, plan_dp
    from xrayfed.common.privacy.ledger import LedgerError, line_hash, read_ledger

    cfg = _hospital(tmp_path)
    plan = plan_dp(cfg, 1000)
    led = PrivacyLedger(cfg.hospital.state_dir, cfg, key=key)
    led.ensure_header(plan)
    led.charge(plan, federation="f", server_round=1, key="k1")
    path = led.path
    text = path.read_text()
    assert all(atrest.is_encrypted_line(x) for x in text.splitlines()) and "epsilon" not in text
    recs = read_ledger(path, key)
    assert [r["event"] for r in recs] == ["budget", "train"]
    # the hash chain is over the plaintext records, exactly as in a plaintext ledger
    body = {k: v for k, v in recs[1].items() if k != "hash"}
    assert recs[1]["hash"] == line_hash(recs[0]["hash"], body, led.mac_key)
    assert PrivacyLedger(cfg.hospital.state_dir, cfg, key=key).spent() == pytest.approx(recs[1]["epsilon"])
    # no key / wrong key: one line naming the file, never a silently wrong ε
    with pytest.raises(UserError, match=f"^{path}: the ledger is encrypted; pass --atrest-key-file"):
        read_ledger(path)
    with pytest.raises(UserError, match=f"^{path}: line 1: {WRONG}") as e:
        PrivacyLedger(cfg.hospital.state_dir, cfg, key=AtRestKey.generate())
    assert "\n" not in str(e.value)
    # swapping two encrypted lines is detected (line numbers are authenticated)
    a, b = text.splitlines()
    path.write_text(b + "\n" + a + "\n")
    with pytest.raises(UserError, match=WRONG):
        read_ledger(path, key)
    path.write_text(text)
    # a plaintext line appended after encrypted ones is refused
    with path.open("a") as f:
        f.write('{"seq": 2}\n')
    with pytest.raises(LedgerError, match="line 3: a plaintext line in a ledger that is encrypted at rest"):
        read_ledger(path, key)


def test_plaintext_ledger_is_refused_when_a_key_is_set(tmp_path, key):
    """An insider writes a plaintext ledger (ε 0) where an encrypted one is expected: refused,
    whether it was signed with the default ledger key or not."""
    from xrayfed.client.dp import PrivacyLedger, plan_dp
    from xrayfed.common.privacy.ledger import LedgerError, read_ledger

    cfg = _hospital(tmp_path)
    plan = plan_dp(cfg, 1000)
    plain = PrivacyLedger(cfg.hospital.state_dir, cfg)  # no at-rest key: plaintext lines
    plain.ensure_header(plan)
    with pytest.raises(LedgerError, match="line 1: a plaintext line in a ledger that is encrypted at rest"):
        PrivacyLedger(cfg.hospital.state_dir, cfg, key=key)
    with pytest.raises(LedgerError, match="line 1: a plaintext line"):
        read_ledger(plain.path, key)


def test_release_cache_encrypted(tmp_path, key):
    from xrayfed.client.dp import ReleaseCache

    cache = ReleaseCache(tmp_path, key=key)
    payload = {"state_dict": {"w": torch.arange(6.0)}, "metrics": {"epsilon": 1.5}}
    cache.put("abc", payload)
    p = cache.path("abc")
    assert is_encrypted(p.read_bytes()) and stat.S_IMODE(p.stat().st_mode) == 0o600
    assert torch.equal(cache.get("abc")["state_dict"]["w"], payload["state_dict"]["w"])
    # a wrong key is an error, not a cache miss (a miss would release a second update for one spend)
    with pytest.raises(UserError, match=WRONG):
        ReleaseCache(tmp_path, key=AtRestKey.generate()).get("abc")
    with pytest.raises(UserError, match="encrypted; pass --atrest-key-file"):
        ReleaseCache(tmp_path).get("abc")
    ReleaseCache(tmp_path).put("plain", payload)  # no key: plaintext, still 0600
    assert stat.S_IMODE(ReleaseCache(tmp_path).path("plain").stat().st_mode) == 0o600
    with pytest.raises(UserError, match="not encrypted, but an at-rest key is configured"):
        cache.get("plain")
    assert cache.get("missing") is None


def test_rundir_checkpoints_encrypted(tmp_path, key, key_hex):
    from xrayfed.common.checkpoint import Checkpoint
    from xrayfed.common.model import ModelSpec
    from xrayfed.common.prediction import TaskSpec
    from xrayfed.server.rundir import RunDir

    ck = Checkpoint(model=ModelSpec(), task=TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA")),
                    image_size=28, state_dict={"w": torch.ones(2)}, round=2)
    run = RunDir(tmp_path / "run", key=key).create()
    p = run.save(ck)
    assert is_encrypted(p.read_bytes()) and run.load_latest().round == 2
    with pytest.raises(UserError, match=f"{p}: {WRONG}"):
        RunDir(tmp_path / "run", key=AtRestKey.generate()).load_latest()
    with pytest.raises(UserError, match="encrypted; pass --atrest-key-file"):
        RunDir(tmp_path / "run").load_latest()
    # a plaintext checkpoint swapped into an encrypted run is refused
    RunDir(tmp_path / "run").save(Checkpoint(model=ck.model, task=ck.task, image_size=28,
                                             state_dict={"w": torch.zeros(2)}, round=3))
    with pytest.raises(UserError, match="not encrypted, but an at-rest key is configured"):
        run.load_latest()
    # `xrayfed certs decrypt-checkpoint`: a plaintext copy for serve-inference (only with the right key)
    from xrayfed.common import cli
    from xrayfed.common.security.atrest import load_checkpoint

    kf, bad = tmp_path / "k", tmp_path / "bad"
    kf.write_text(key_hex)
    bad.write_text(os.urandom(32).hex())
    kf.chmod(0o600), bad.chmod(0o600)
    out = tmp_path / "model.pt"
    args = ["certs", "decrypt-checkpoint", "--model", str(p), "--out", str(out), "--atrest-key-file"]
    assert cli.main(args + [str(bad)]) == 2 and not out.exists()
    assert cli.main(args + [str(kf)]) == 0
    assert load_checkpoint(out).round == 2 and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert cli.main(args + [str(kf)]) == 2  # no silent overwrite


def test_report_cli_reads_an_encrypted_ledger_with_the_key_flag(tmp_path, key, key_hex, capsys):
    from xrayfed.client.dp import PrivacyLedger, plan_dp
    from xrayfed.common import cli

    cfg = _hospital(tmp_path)
    led = PrivacyLedger(cfg.hospital.state_dir, cfg, key=key)
    led.ensure_header(plan_dp(cfg, 1000))
    led.charge(plan_dp(cfg, 1000), federation="f", server_round=1, key="k1")
    kf = tmp_path / "atrest.key"
    from xrayfed.common.security.atrest import make_atrest_key

    make_atrest_key(kf)
    assert cli.main(["report", "--ledger", str(led.path), "--out", str(tmp_path / "r0"), "--format", "json"]) == 2
    assert f"{led.path}: the ledger is encrypted" in capsys.readouterr().err
    assert cli.main(["report", "--ledger", str(led.path), "--out", str(tmp_path / "r1"), "--format", "json",
                     "--atrest-key-file", str(kf)]) == 2  # another key: refused
    assert f"{led.path}: line 1: {WRONG}" in capsys.readouterr().err
    good = tmp_path / "good.key"
    good.write_text(key_hex + "\n")
    good.chmod(0o600)
    assert cli.main(["report", "--ledger", str(led.path), "--out", str(tmp_path / "r2"), "--format", "json",
                     "--atrest-key-file", str(good)]) == 0
    import json

    rep = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert rep["hospitals"][0]["hospital"] == "st-mary"

