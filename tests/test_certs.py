"""`xrayfed certs`: files, permissions, SANs, no silent overwrite, certificate chain."""

from __future__ import annotations

import ipaddress
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from xrayfed.common.errors import UserError
from xrayfed.common.security.atrest import make_atrest_key
from xrayfed.common.security.authkey import public_key_fingerprint
from xrayfed.server.pki import add_hospital, hospital_public_keys, init_pki, read_manifest, revoke_hospital

CLI = [sys.executable, "-m", "xrayfed.common.cli"]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture()
def pki(tmp_path) -> Path:
    out = tmp_path / "pki"
    init_pki(out, server_names=["fl.example.org"], server_ips=["10.1.2.3"], hospitals=["h1", "h2"])
    return out


def _cert(p: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(p.read_bytes())


def test_files_and_permissions(pki):
    for rel in ("ca.key", "server.key", "inference/tls.key", "inference/token-signing.key",
                "hospitals/h1/auth.key", "hospitals/h2/auth.key"):
        assert _mode(pki / rel) == 0o600, rel
    for rel in ("ca.pem", "server.pem", "inference/tls.pem", "inference/ca.pem", "inference/token-signing.pub",
                "hospitals/h1/auth.pub", "hospitals/h1/ca.pem", "certs.json"):
        assert (pki / rel).is_file(), rel
        assert _mode(pki / rel) & 0o077 != 0o077  # public files: readable, not world-writable
        assert not _mode(pki / rel) & 0o002
    m = read_manifest(pki)
    assert set(m["hospitals"]) == {"h1", "h2"}
    assert m["server"]["dns"] == ["fl.example.org", "localhost"]
    assert m["server"]["ips"] == ["10.1.2.3", "127.0.0.1", "::1"]
    # the hospital's CA copy is the federation CA
    assert (pki / "hospitals/h1/ca.pem").read_bytes() == (pki / "ca.pem").read_bytes()
    # no private key material in the manifest
    text = (pki / "certs.json").read_text()
    assert "PRIVATE" not in text


def test_server_certificate_sans_and_chain(pki):
    ca, srv = _cert(pki / "ca.pem"), _cert(pki / "server.pem")
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address(i) for i in ("10.1.2.3", "127.0.0.1", "::1")}
    assert ExtendedKeyUsageOID.SERVER_AUTH in srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    # signed by the CA (and the CA is self-signed)
    srv.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)
    # full path validation with cryptography's verifier (as a TLS client would do)
    from cryptography.x509.verification import PolicyBuilder, Store

    store = Store([ca])
    for name in ("fl.example.org", "localhost"):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName(name)).verify(srv, [])
    PolicyBuilder().store(store).build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1"))).verify(srv, [])
    PolicyBuilder().store(store).build_server_verifier(x509.IPAddress(ipaddress.ip_address("10.1.2.3"))).verify(srv, [])
    with pytest.raises(Exception):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("evil.example.org")).verify(srv, [])
    # the inference service certificate too
    inf = _cert(pki / "inference/tls.pem")
    PolicyBuilder().store(store).build_server_verifier(x509.DNSName("fl.example.org")).verify(inf, [])
    # keys match their certificates
    for cert, key in ((srv, "server.key"), (inf, "inference/tls.key"), (ca, "ca.key")):
        k = serialization.load_pem_private_key((pki / key).read_bytes(), None)
        assert k.public_key().public_numbers() == cert.public_key().public_numbers()


def test_another_ca_does_not_verify(pki, tmp_path):
    other = tmp_path / "other"
    init_pki(other)
    from cryptography.x509.verification import PolicyBuilder, Store

    with pytest.raises(Exception):
        PolicyBuilder().store(Store([_cert(other / "ca.pem")])).build_server_verifier(
            x509.DNSName("localhost")).verify(_cert(pki / "server.pem"), [])


def test_hospital_keys_in_flower_format(pki):
    priv = serialization.load_ssh_private_key((pki / "hospitals/h1/auth.key").read_bytes(), None)
    pub = serialization.load_ssh_public_key((pki / "hospitals/h1/auth.pub").read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and isinstance(priv.curve, ec.SECP384R1)
    assert priv.public_key().public_numbers() == pub.public_numbers()
    assert (pki / "hospitals/h1/auth.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    # what Flower itself accepts (flwr supernode register / flower-supernode)
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

    assert uses_nist_ec_curve(pub)
    m = read_manifest(pki)
    assert m["hospitals"]["h1"]["fingerprint"] == public_key_fingerprint(pki / "hospitals/h1/auth.pub")
    # the PEM form Flower logs maps to the same fingerprint
    assert public_key_fingerprint(public_key_to_bytes(pub)) == m["hospitals"]["h1"]["fingerprint"]
    assert m["hospitals"]["h1"]["fingerprint"] != m["hospitals"]["h2"]["fingerprint"]
    tok = serialization.load_pem_private_key((pki / "inference/token-signing.key").read_bytes(), None)
    assert isinstance(tok, ed25519.Ed25519PrivateKey)
    sig = tok.sign(b"x")
    serialization.load_pem_public_key((pki / "inference/token-signing.pub").read_bytes()).verify(sig, b"x")


def test_no_overwrite_without_force(pki):
    before = (pki / "ca.key").read_bytes()
    with pytest.raises(UserError, match="ca.key already exists.*--force"):
        init_pki(pki)
    assert (pki / "ca.key").read_bytes() == before
    h1 = (pki / "hospitals/h1/auth.key").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        add_hospital(pki, "h1")
    assert (pki / "hospitals/h1/auth.key").read_bytes() == h1
    add_hospital(pki, "h1", force=True)
    assert (pki / "hospitals/h1/auth.key").read_bytes() != h1
    assert _mode(pki / "hospitals/h1/auth.key") == 0o600
    # --force on init replaces the CA and refreshes every hospital's CA copy, keeping their keys
    h2 = (pki / "hospitals/h2/auth.key").read_bytes()
    init_pki(pki, force=True)
    assert (pki / "ca.key").read_bytes() != before
    assert (pki / "hospitals/h2/ca.pem").read_bytes() == (pki / "ca.pem").read_bytes()
    assert (pki / "hospitals/h2/auth.key").read_bytes() == h2
    assert set(read_manifest(pki)["hospitals"]) == {"h1", "h2"}


def test_add_and_revoke_hospital(pki):
    e = add_hospital(pki, "h3")
    assert _mode(pki / "hospitals/h3/auth.key") == 0o600
    assert e["revoked"] is False
    assert set(hospital_public_keys(pki)) == {"h1", "h2", "h3"}
    revoke_hospital(pki, "h2")
    assert set(hospital_public_keys(pki)) == {"h1", "h3"}
    assert set(hospital_public_keys(pki, include_revoked=True)) == {"h1", "h2", "h3"}
    with pytest.raises(UserError, match="not in"):
        revoke_hospital(pki, "nope")
    for bad in ("../x", "", "a/b", "-x", "x" * 65):
        with pytest.raises(UserError, match="hospital name"):
            add_hospital(pki, bad)


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="--server-ip"):
        init_pki(tmp_path / "a", server_ips=["300.1.1.1"])
    with pytest.raises(UserError, match="--server-name"):
        init_pki(tmp_path / "b", server_names=["bad name"])
    with pytest.raises(UserError, match="no host name or IP"):
        init_pki(tmp_path / "c", loopback=False)
    with pytest.raises(UserError, match="no certificate manifest"):
        add_hospital(tmp_path / "missing", "h1")


def test_atrest_key_file(tmp_path):
    p = make_atrest_key(tmp_path / "k")
    assert _mode(p) == 0o600 and len(p.read_text().strip()) == 64
    with pytest.raises(UserError, match="already exists"):
        make_atrest_key(p)


def test_cli(tmp_path):
    out = tmp_path / "pki"
    r = subprocess.run(CLI + ["certs", "init", "--out", str(out), "--server-ip", "192.168.7.7", "--hospital", "a"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "192.168.7.7" in r.stdout
    assert _mode(out / "hospitals/a/auth.key") == 0o600
    r = subprocess.run(CLI + ["certs", "init", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xrayfed: error: ") and "--force" in lines[0]
    r = subprocess.run(CLI + ["certs", "add-hospital", "a", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(CLI + ["certs", "revoke-hospital", "a", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "certs.json").read_text())["hospitals"]["a"]["revoked"] is True
    # (atrest-key through the CLI: tests/test_atrest.py::test_cli_key_works_with_loader)


def test_hospital_makes_its_own_key_and_the_operator_imports_the_public_key(pki, tmp_path):
    from xrayfed.common.security.authkey import make_hospital_key

    key, pub = make_hospital_key(tmp_path / "at-hospital", name="h9")
    assert _mode(key) == 0o600 and pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    e = add_hospital(pki, "h9", public_key=pub)
    assert e["auth_key"] is None and e["fingerprint"] == public_key_fingerprint(pub)
    assert not (pki / "hospitals/h9/auth.key").exists()  # the private key never reached the operator
    assert (pki / "hospitals/h9/auth.pub").read_bytes() == pub.read_bytes()
    assert hospital_public_keys(pki)["h9"] == pki / "hospitals/h9/auth.pub"
    with pytest.raises(UserError, match="already exists"):
        add_hospital(pki, "h9", public_key=pub)
    with pytest.raises(UserError, match="PRIVATE key"):
        add_hospital(pki, "h10", public_key=key)
    ed = tmp_path / "ed.pub"
    from cryptography.hazmat.primitives.asymmetric import ed25519

    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(UserError, match="NIST curve"):
        add_hospital(pki, "h10", public_key=ed)
    with pytest.raises(UserError, match="already exists"):
        make_hospital_key(tmp_path / "at-hospital")


def test_init_makes_the_crypto_provider_secret_once_and_never_replaces_it(pki, tmp_path):
    from xrayfed.common.security.shared_secret import SECRET_NAME, read_secret

    inf, cp = pki / "inference" / SECRET_NAME, pki / "crypto-provider" / SECRET_NAME
    assert _mode(inf) == 0o600 and _mode(cp) == 0o600
    secret = read_secret(cp, "crypto provider secret")  # what serve-crypto-provider reads
    assert secret == read_secret(inf, "inference secret") and len(secret) == 64  # 256 bits, one secret for both
    assert secret.decode() not in (pki / "certs.json").read_text()  # the manifest names it, never holds it
    m = read_manifest(pki)
    assert (pki / m["inference"]["crypto_provider_secret"], pki / m["crypto_provider"]["secret"]) == (inf, cp)
    # --force replaces the certificates but keeps the secret the running services share
    init_pki(pki, force=True)
    assert cp.read_bytes() == inf.read_bytes() == secret + b"\n"
    # a copy lost on one side is restored from the other, not replaced by a new secret
    inf.unlink()
    init_pki(pki, force=True)
    assert inf.read_bytes().strip() == secret and _mode(inf) == 0o600
    # another federation gets another secret; the CLI says where both copies are
    out = tmp_path / "other"
    r = subprocess.run(CLI + ["certs", "init", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (f"secret the inference service and the crypto provider share: {out / 'inference' / SECRET_NAME} and "
            f"{out / 'crypto-provider' / SECRET_NAME} (the same, mode 0600") in r.stdout
    assert (out / "crypto-provider" / SECRET_NAME).read_bytes().strip() != secret


def test_a_kept_crypto_provider_secret_is_made_owner_only_and_a_short_one_refused(tmp_path):
    from xrayfed.common.security.shared_secret import SECRET_NAME, make_shared_secret

    a, b = tmp_path / "inference" / SECRET_NAME, tmp_path / "crypto-provider" / SECRET_NAME
    a.parent.mkdir()
    a.write_bytes(b"0123456789abcdef0123456789abcdef\n")  # made by hand, umask 022
    a.chmod(0o644)
    assert make_shared_secret([a, b]) is False
    assert _mode(a) == 0o600 and _mode(b) == 0o600 and b.read_bytes() == a.read_bytes()
    a.write_bytes(b"\n")
    b.write_bytes(b"\n")
    with pytest.raises(UserError, match="too short"):
        make_shared_secret([a, b])


def test_a_crypto_provider_secret_other_users_can_read_is_named_in_a_warning(tmp_path, caplog):
    from xrayfed.common.security.shared_secret import read_secret

    f = tmp_path / "s"
    f.write_bytes(b"0123456789abcdef0123456789abcdef\n")
    f.chmod(0o600)
    assert read_secret(f, "crypto provider secret (--secret)") == b"0123456789abcdef0123456789abcdef"
    assert not caplog.records
    f.chmod(0o644)
    assert read_secret(f, "crypto provider secret (--secret)") == b"0123456789abcdef0123456789abcdef"
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "chmod 600" in caplog.text
    assert "0123456789abcdef" not in caplog.text
