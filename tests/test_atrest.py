"""Encryption at rest: round trips, wrong key, tampering, ledger lines, key loading."""

from __future__ import annotations

import base64
import os
import stat

import pytest
import torch

from xrayfed.common import atrest
from xrayfed.common.atrest import (
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
def key() -> AtRestKey:
    return AtRestKey.generate()


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
    from xrayfed.common.tasks import TaskSpec

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
