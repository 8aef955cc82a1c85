"""Patient tokens: Ed25519 signatures, expiry, audience, DICOM PatientID; the token CLI."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from xrayfed.client.inference import tokens
from xrayfed.common.cli import main
from xrayfed.common.errors import UserError

NOW = 1_800_000_000


@pytest.fixture()
def keypair(tmp_path):
    priv, pub = tokens.generate_key(tmp_path / "sign.key")
    return tokens.load_private_key(priv), tokens.load_public_keys([pub]), priv, pub


def _tamper(tok: str, **changes) -> str:
    prefix, body, sig = tok.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload.update(changes)
    body2 = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    return f"{prefix}.{body2}.{sig}"


def test_valid_token_round_trip(keypair):
    key, pubs, _, _ = keypair
    tok = tokens.issue_token(key, "P-0042", NOW + 3600, now=NOW)
    claims = tokens.verify_token(tok, pubs, now=NOW + 10)
    assert claims.sub == "P-0042" and claims.exp == NOW + 3600 and claims.aud == tokens.DEFAULT_AUDIENCE
    assert len(claims.jti) == 24 and claims.kid in pubs


def test_expired_token_refused(keypair):
    key, pubs, _, _ = keypair
    tok = tokens.issue_token(key, "P1", NOW + 60, now=NOW)
    with pytest.raises(tokens.TokenError, match="expired") as e:
        tokens.verify_token(tok, pubs, now=NOW + 60 + 61)
    assert e.value.reason == "expired"


def test_tampered_token_refused(keypair):
    key, pubs, _, _ = keypair
    tok = tokens.issue_token(key, "P1", NOW + 60, now=NOW)
    for bad in (_tamper(tok, sub="P2"), _tamper(tok, exp=NOW + 10**7)):
        with pytest.raises(tokens.TokenError, match="altered") as e:
            tokens.verify_token(bad, pubs, now=NOW)
        assert e.value.reason == "bad_signature"


def test_foreign_signed_token_refused(keypair, tmp_path):
    _, pubs, _, _ = keypair
    other_priv, _ = tokens.generate_key(tmp_path / "other.key")
    tok = tokens.issue_token(tokens.load_private_key(other_priv), "P1", NOW + 60, now=NOW)
    with pytest.raises(tokens.TokenError, match="does not trust") as e:
        tokens.verify_token(tok, pubs, now=NOW)
    assert e.value.reason == "unknown_key"
    # a forger who copies our key id still fails the signature check
    forged = _tamper(tok, kid=next(iter(pubs)))
    with pytest.raises(tokens.TokenError, match="altered"):
        tokens.verify_token(forged, pubs, now=NOW)


def test_wrong_audience_and_future_and_garbage(keypair):
    key, pubs, _, _ = keypair
    tok = tokens.issue_token(key, "P1", NOW + 60, audience="other-service", now=NOW)
    with pytest.raises(tokens.TokenError, match="not for this service"):
        tokens.verify_token(tok, pubs, now=NOW)
    tok = tokens.issue_token(key, "P1", NOW + 7200, now=NOW + 3600)
    with pytest.raises(tokens.TokenError, match="not valid yet"):
        tokens.verify_token(tok, pubs, now=NOW)
    for garbage in ("", "hello", "xrf1.!!.??", "xrf1.e30.AAAA", "jwt.a.b"):
        with pytest.raises(tokens.TokenError) as e:
            tokens.verify_token(garbage, pubs, now=NOW)
        assert e.value.reason in ("malformed", "unknown_key")


def test_dicom_patient_id_must_match_subject(keypair):
    key, pubs, _, _ = keypair
    claims = tokens.verify_token(tokens.issue_token(key, "P1", NOW + 60, now=NOW), pubs, now=NOW)
    tokens.check_dicom_patient_id(claims, None)  # PNG/JPEG: nothing to compare
    tokens.check_dicom_patient_id(claims, "P1")
    tokens.check_dicom_patient_id(claims, " P1 ")  # DICOM pads LO values with spaces
    with pytest.raises(tokens.TokenError, match="your own scans") as e:
        tokens.check_dicom_patient_id(claims, "P2")
    assert e.value.reason == "patient_mismatch"


def test_parse_expires_and_patient_id_rules():
    assert tokens.parse_expires("90m", now=NOW) == NOW + 5400
    assert tokens.parse_expires("2d", now=NOW) == NOW + 2 * 86400
    assert tokens.parse_expires("2027-06-01T08:00:00Z", now=NOW) > NOW
    for bad in ("yesterday", "-5h", "0s", "400d", "2000-01-01"):
        with pytest.raises(UserError):
            tokens.parse_expires(bad, now=NOW)
    for bad in ("", " P1", "A\\B", "x" * 65, "a\nb"):
        with pytest.raises(UserError):
            tokens.validate_patient_id(bad)


def test_key_files_and_public_key_errors(keypair, tmp_path):
    _, _, priv, pub = keypair
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    with pytest.raises(UserError, match="already exists"):
        tokens.generate_key(priv)
    with pytest.raises(UserError, match="no token public key"):
        tokens.load_public_keys([])
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(UserError, match="not a readable PEM"):
        tokens.load_public_keys([tmp_path / "junk.pub"])


def test_certs_token_signing_key_is_accepted(tmp_path):
    from xrayfed.server.pki import init_pki

    init_pki(tmp_path / "pki")
    key = tokens.load_private_key(tmp_path / "pki" / "inference" / "token-signing.key")
    pubs = tokens.load_public_keys([tmp_path / "pki" / "inference" / "token-signing.pub"])
    tokens.verify_token(tokens.issue_token(key, "P1", NOW + 60, now=NOW), pubs, now=NOW)


def test_token_cli(tmp_path, capsys):
    key = tmp_path / "k.key"
    assert main(["token", "init-key", "--signing-key", str(key)]) == 0
    out = tmp_path / "p.tok"
    assert main(["token", "issue", "--signing-key", str(key), "--patient-id", "P7", "--expires", "2h",
                 "--out", str(out)]) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    tok = tokens.read_token_file(out)
    assert tokens.verify_token(tok, tokens.load_public_keys([key.with_suffix(".pub")])).sub == "P7"
    assert main(["token", "issue", "--signing-key", str(key), "--patient-id", "P7", "--expires", "soon"]) == 2
    assert "--expires 'soon'" in capsys.readouterr().err
    assert main(["token", "issue", "--signing-key", str(tmp_path / "missing.key"), "--patient-id", "P7"]) == 2
