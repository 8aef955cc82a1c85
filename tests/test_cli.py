"""The ``xrayfed`` command line as a whole: every command's handler imports and resolves (they
are imported lazily, so nothing else would notice a renamed module or function before a user
runs the command), every command is listed under the role that runs it, every option has help
text, and the old spellings of commands, options and config keys still work with one warning
line each."""

from __future__ import annotations

import argparse

import pytest

from xrayfed.common.cli import ROLES, build_parser, commands, main
from xrayfed.common.cli_args import Handler, SubCommands


def _all_parsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every leaf command's parser, old names included (``serve-ttp``, ``issue-token``, ...)."""
    out = {}
    for action in parser._actions:
        if isinstance(action, SubCommands):
            for name, sub in action.choices.items():
                out.update(_all_parsers(sub, f"{prefix}{name} ") or {f"{prefix}{name}": sub})
    return out


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("xrayfed: WARNING:")]


def test_every_command_resolves_its_handler():
    parsers = _all_parsers(build_parser())
    assert len(commands(build_parser())) >= 19
    for name, parser in parsers.items():
        func = parser.get_default("func")
        assert isinstance(func, Handler), f"{name}: no lazily imported handler ({func!r})"
        assert callable(func.resolve()), f"{name}: {func!r} does not resolve to a function"


def test_help_lists_every_command_once_by_role():
    parser = build_parser()
    listed = [name for names in ROLES.values() for name in names]
    assert sorted(listed) == sorted(commands(parser)), "a command is missing from ROLES, or ROLES names an old one"
    text = parser.format_help()
    for role, names in ROLES.items():
        assert f"\n{role}:\n" in text
        for name in names:
            assert f"\n  {name} " in text or f"\n  {name}\n" in text, name
    for old in ("serve-ttp", "issue-token", "export-model"):
        assert old not in text


def test_every_option_has_help_and_old_spellings_are_hidden():
    for name, parser in _all_parsers(build_parser()).items():
        for action in parser._actions:
            assert action.help, f"{name} {'/'.join(action.option_strings) or action.dest}: no help text"
        text = parser.format_help()
        for old in ("--ttp", "--root-cert", "_old_model"):
            assert old not in text, f"{name}: --help shows {old}"


OLD_AND_NEW = [
    (["serve-ttp", "--insecure", "--listen", "127.0.0.1:1"],
     ["serve-crypto-provider", "--insecure", "--listen", "127.0.0.1:1"],
     ["serve-ttp is deprecated; use serve-crypto-provider"]),
    (["serve-inference", "--ttp", "h:1", "--ttp-ca", "ca.pem", "--ttp-secret", "s", "--ttp-public", "p:2",
      "--ttp", "h:1"],
     ["serve-inference", "--crypto-provider", "h:1", "--ca-cert", "ca.pem", "--crypto-provider-secret", "s",
      "--crypto-provider-public", "p:2"],
     ["--ttp is deprecated; use --crypto-provider", "--ttp-ca is deprecated; use --ca-cert",
      "--ttp-secret is deprecated; use --crypto-provider-secret",
      "--ttp-public is deprecated; use --crypto-provider-public"]),
    (["client", "--server", "h:1", "--root-cert", "ca.pem"], ["client", "--server", "h:1", "--ca-cert", "ca.pem"],
     ["--root-cert is deprecated; use --ca-cert"]),
    (["predict", "--scan", "x.dcm", "--service", "h:1", "--token", "t", "--ttp-ca-cert", "ca.pem"],
     ["predict", "--scan", "x.dcm", "--service", "h:1", "--token", "t", "--crypto-provider-ca-cert", "ca.pem"],
     ["--ttp-ca-cert is deprecated; use --crypto-provider-ca-cert"]),
    (["export", "m.pt", "--format", "onnx", "--out", "m.onnx"],
     ["export", "--model", "m.pt", "--format", "onnx", "--out", "m.onnx"],
     ["a positional CHECKPOINT is deprecated; use --model CHECKPOINT"]),
    (["certs", "export-model", "m.pt", "--out", "plain.pt"],
     ["certs", "decrypt-checkpoint", "--model", "m.pt", "--out", "plain.pt"],
     ["certs export-model is deprecated; use certs decrypt-checkpoint",
      "a positional CHECKPOINT is deprecated; use --model CHECKPOINT"]),
]


@pytest.mark.parametrize("old,new,warned", OLD_AND_NEW, ids=[" ".join(o[:2]) for o, _, _ in OLD_AND_NEW])
def test_old_spellings_warn_once_and_parse_as_the_new_ones(old, new, warned, capsys):
    args_new = vars(build_parser().parse_args(new))
    assert _warnings(capsys.readouterr().err) == []
    args_old = vars(build_parser().parse_args(old))
    assert _warnings(capsys.readouterr().err) == [f"xrayfed: WARNING: {w}" for w in warned]
    assert repr(args_old.pop("func")) == repr(args_new.pop("func"))  # the same handler
    assert args_old == args_new


def test_a_checkpoint_given_twice_or_not_at_all_is_refused(capsys):
    for argv in (["export", "a.pt", "--model", "b.pt", "--format", "onnx", "--out", "m.onnx"],
                 ["export", "--format", "onnx", "--out", "m.onnx"],
                 ["certs", "decrypt-checkpoint", "--out", "plain.pt"],
                 ["explain", "--scan", "x.png", "--out", "h.png"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 2
        assert "--model" in capsys.readouterr().err


def test_the_old_command_names_still_run(tmp_path, capsys):
    """`serve-ttp` reaches its handler after one warning line; `issue-token` still makes keys,
    issues and revokes tokens (each with one warning line)."""
    from xrayfed.client.inference import tokens

    assert main(["serve-ttp", "--config", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["xrayfed: WARNING: serve-ttp is deprecated; use serve-crypto-provider",
                   f"xrayfed: error: config: no file at {tmp_path / 'missing.toml'}"]

    key, tok, revoked = tmp_path / "k.key", tmp_path / "p.tok", tmp_path / "revoked.txt"
    warning = "xrayfed: WARNING: issue-token is deprecated; use token init-key, token issue or token revoke"
    assert main(["issue-token", "--init-key", "--key", str(key)]) == 0
    assert main(["issue-token", "--key", str(key), "--patient-id", "P7", "--out", str(tok)]) == 0
    assert main(["issue-token", "--revoke", str(tok), "--revocation-list", str(revoked)]) == 0
    assert _warnings(capsys.readouterr().err) == [warning] * 3
    claims = tokens.verify_token(tokens.read_token_file(tok), tokens.load_public_keys([key.with_suffix(".pub")]))
    assert claims.sub == "P7" and revoked.read_text().split() == [claims.jti]


def test_token_revoke_adds_the_token_id(tmp_path, capsys):
    from xrayfed.client.inference import tokens

    key, revoked = tmp_path / "k.key", tmp_path / "revoked.txt"
    assert main(["token", "init-key", "--signing-key", str(key)]) == 0
    assert main(["token", "issue", "--signing-key", str(key), "--patient-id", "P8"]) == 0
    tok = capsys.readouterr().out.splitlines()[-1]
    assert main(["token", "revoke", tok, "--revocation-list", str(revoked)]) == 0
    assert revoked.read_text().split() == [tokens.peek_claims(tok)["jti"]]
    assert _warnings(capsys.readouterr().err) == []


def test_old_inference_config_keys_still_load(tmp_path, capsys):
    from xrayfed.common.cli_args import forget_warnings
    from xrayfed.common.config import InferenceServiceConfig, load_config

    forget_warnings()
    (tmp_path / "inference.toml").write_text(
        'ttp = "10.0.0.3:9444"\nttp_public = "provider.example:9444"\nttp_secret = "provider.secret"\n'
        '[ttp_tls]\nca_cert = "ca.pem"\n')
    cfg = load_config(InferenceServiceConfig, tmp_path / "inference.toml", {"crypto_provider_tls.insecure": True})
    assert (cfg.crypto_provider, cfg.crypto_provider_public) == ("10.0.0.3:9444", "provider.example:9444")
    assert cfg.crypto_provider_secret == tmp_path / "provider.secret"
    assert cfg.crypto_provider_tls.ca_cert == tmp_path / "ca.pem" and cfg.crypto_provider_tls.insecure
    assert len(_warnings(capsys.readouterr().err)) == 4
