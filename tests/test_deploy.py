"""Deployment files (no Docker engine here): docker-compose.yml, deploy/Dockerfile*, deploy/config.

* every service's command is a real `xrayfed` command with valid flags (our own argparse parser),
  TLS on (no --insecure), and every absolute path it names is mounted into that service;
* every mounted host path is made by `xrayfed certs init` (compared with a real `init_pki` in a
  tmp dir), is a file of this repository, or is documented in deploy/RUNBOOK.md;
* each secret is mounted only where its role needs it (no CA key anywhere, a hospital's key only
  into that hospital, key material read-only), and only the public ports are published;
* the Dockerfiles copy sources only: no key, certificate, secret or whole build context;
* the example configs of every role load with the real config models.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

from xrayfed.common.cli import build_parser
from xrayfed.common.config import (
    CryptoProviderConfig,
    FederationConfig,
    HospitalConfig,
    InferenceServiceConfig,
    load_config,
)
from xrayfed.common.model import default_model

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
RUNBOOK = ROOT / "deploy" / "RUNBOOK.md"
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
ROLE = {"superlink": "server", "hospital-a": "client", "hospital-b": "client", "hospital-c": "client",
        "inference": "serve-inference", "crypto-provider": "serve-crypto-provider"}
SECRET_NAME = re.compile(r"(\.key$|\.secret$|/secrets?(/|$)|token-signing\.key|ca\.key|atrest)")


def _compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def _mounts(svc: dict) -> list[tuple[str, str, str]]:
    """(host, container, mode) of a service's bind mounts (short syntax)."""
    out = []
    for v in svc.get("volumes", []):
        assert isinstance(v, str), f"use the short volume syntax: {v!r}"
        parts = v.split(":")
        host, target = parts[0], parts[1]
        mode = parts[2] if len(parts) > 2 else "rw"
        out.append((host, target, mode))
    return out


def _under(path: str, targets: list[str]) -> bool:
    p = PurePosixPath(path)
    return any(p == PurePosixPath(t) or PurePosixPath(t) in p.parents for t in targets)


@pytest.fixture(scope="module")
def compose() -> dict:
    return _compose()


@pytest.fixture(scope="module")
def pki_files(tmp_path_factory) -> set[str]:
    """Every path (files and folders) `xrayfed certs init` makes, relative to its --out folder,
    for the command line the runbook gives for compose."""
    from xrayfed.server.pki import init_pki

    text = RUNBOOK.read_text()
    m = re.search(r"xrayfed certs init --out pki (--server-name superlink[^\n]*\\\n[^\n]*)", text)
    assert m, "the runbook's compose quick start must show the `certs init` command"
    argv = shlex.split(m.group(1).replace("\\\n", " "))
    names = [argv[i + 1] for i, a in enumerate(argv) if a == "--server-name"]
    hospitals = [argv[i + 1] for i, a in enumerate(argv) if a == "--hospital"]
    assert sorted(hospitals) == list(HOSPITALS) and {"superlink", "inference", "crypto-provider"} <= set(names)
    out = tmp_path_factory.mktemp("pki") / "pki"
    manifest = init_pki(out, server_names=names, hospitals=hospitals)
    assert {"superlink", "inference", "crypto-provider"} <= set(manifest["server"]["dns"])  # SANs the services dial
    return {str(p.relative_to(out)) for p in out.rglob("*")}


def test_services_and_commands_are_real_cli_commands(compose):
    services = compose["services"]
    assert set(services) == set(ROLE)
    parser = build_parser()
    for name, svc in services.items():
        cmd = svc["command"]
        assert isinstance(cmd, list) and cmd[0] == "xrayfed", f"{name}: command must be an xrayfed command (exec form)"
        try:
            args = parser.parse_args(cmd[1:])
        except SystemExit:
            pytest.fail(f"{name}: `{' '.join(cmd)}` is not a valid xrayfed command line")
        assert args.command == ROLE[name], name
        assert not getattr(args, "insecure", False), f"{name}: TLS is the default; no --insecure in a deployment"
        assert "entrypoint" not in svc, name


def test_command_paths_are_mounted_and_hospitals_dial_the_gateway(compose):
    for name, svc in compose["services"].items():
        targets = [t for _, t, _ in _mounts(svc)]
        for tok in svc["command"][1:]:
            if tok.startswith("/"):
                assert _under(tok, targets), f"{name}: {tok} is not inside any mount ({targets})"
    fed = load_config(FederationConfig, ROOT / "deploy/config/federation.compose.toml")
    port = fed.network.listen.rsplit(":", 1)[1]
    for h in HOSPITALS:
        cmd = compose["services"][h]["command"]
        assert cmd[cmd.index("--server") + 1] == f"superlink:{port}"
        assert cmd[cmd.index("--name") + 1] == h


def test_mounted_configs_load_and_their_paths_are_mounted(compose):
    def config_of(svc: dict) -> tuple[Path, str]:
        host, target, mode = next(m for m in _mounts(svc) if m[1].startswith("/config/"))
        assert mode == "ro"
        return ROOT / host, target

    svc = compose["services"]["superlink"]
    host, _ = config_of(svc)
    fed = load_config(FederationConfig, host)
    targets = [t for _, t, _ in _mounts(svc)]
    assert fed.network.auth_enabled and not fed.network.tls.insecure and fed.federation.secure_aggregation
    for p in [fed.network.tls.ca_cert, fed.network.tls.cert, fed.network.tls.key, *fed.network.hospital_keys]:
        assert _under(str(p), targets), f"superlink: {p} from {host.name} is not mounted"
    assert _under(str(fed.federation.run_dir), targets)
    assert sorted(Path(k).parent.name for k in fed.network.hospital_keys) == list(HOSPITALS)
    assert fed.federation.min_clients == len(HOSPITALS)
    for h in HOSPITALS:
        svc = compose["services"][h]
        host, _ = config_of(svc)
        cfg = load_config(HospitalConfig, host)
        assert cfg.hospital.require_secure_aggregation


def test_every_mounted_host_path_is_made_by_certs_init_or_documented(compose, pki_files):
    runbook = RUNBOOK.read_text()
    for name, svc in compose["services"].items():
        for host, target, mode in _mounts(svc):
            assert host.startswith("./"), f"{name}: use paths relative to the repository ({host})"
            rel = host[2:]
            if rel.startswith("pki/"):
                assert rel[4:] in pki_files, f"{name}: {host} is not made by `xrayfed certs init`"
            elif not (ROOT / rel).exists():
                assert f"`{rel}`" in runbook or f" {rel}" in runbook, f"{name}: {host} is neither in the repo " \
                                                                       f"nor documented in deploy/RUNBOOK.md"


def test_secrets_only_where_their_role_needs_them(compose):
    everything = {name: _mounts(svc) for name, svc in compose["services"].items()}
    for name, mounts in everything.items():
        for host, target, mode in mounts:
            assert host not in ("./pki", "./pki/", "./secrets", "./secrets/", "."), f"{name}: mounts all of {host}"
            assert not host.endswith(("ca.key", "token-signing.key")), f"{name}: {host} is mounted"
            if host.startswith(("./pki", "./secrets", "./deploy", "./models", "./data")):
                assert mode == "ro", f"{name}: {host} must be read-only"
            for h in HOSPITALS:  # a hospital's key folder, at-rest key, data and state: that hospital only
                if f"/{h}" in host:
                    assert name == h or host.endswith(f"hospitals/{h}/auth.pub") and name == "superlink", (name, host)
    # the operator's at-rest key and server key stay with the operator's services
    for name, mounts in everything.items():
        for host, _, _ in mounts:
            if host in ("./secrets/server/atrest.key", "./pki/server.key"):
                assert name == "superlink", (name, host)
            if host == "./pki/crypto-provider/tls.key":
                assert name == "crypto-provider", (name, host)
    # each hospital's --auth-key and --atrest-key-file come from its own mounts
    for h in HOSPITALS:
        hosts = {t: hst for hst, t, _ in everything[h]}
        assert hosts["/pki"] == f"./pki/hospitals/{h}" and hosts["/secrets/atrest.key"] == f"./secrets/{h}/atrest.key"


def test_only_public_ports_are_published(compose):
    fed = load_config(FederationConfig, ROOT / "deploy/config/federation.compose.toml")
    listen, control = fed.network.listen.rsplit(":", 1)[1], fed.network.control.rsplit(":", 1)[1]
    assert fed.network.control.startswith("127.0.0.1:")
    published = {name: [str(p) for p in svc.get("ports", [])] for name, svc in compose["services"].items()}
    assert published["superlink"] == [f"{listen}:{listen}"]
    assert all(control not in p for ps in published.values() for p in ps)
    # patients reach the inference service and the crypto provider (both TLS); nothing else
    assert {n for n, ps in published.items() if ps} == {"superlink", "inference", "crypto-provider"}
    for name, svc in compose["services"].items():  # unprivileged containers
        assert svc.get("user", "").startswith("${XRAYFED_UID") and svc.get("cap_drop") == ["ALL"], name


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    lines = [ln for ln in dockerfile.read_text().splitlines() if not ln.strip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_copy_no_secret(name):
    df = ROOT / "deploy" / name
    ins = _instructions(df)
    assert any(op == "FROM" for op, _ in ins)
    copies = [rest for op, rest in ins if op in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        if rest.startswith("--from="):
            continue  # between build stages
        srcs = [t for t in shlex.split(rest) if not t.startswith("--")][:-1]
        for s in srcs:
            assert s not in (".", "./", "*", "/"), f"{name}: copies the whole build context ({rest})"
            assert not re.search(r"(pki|secret|\.key|\.pem|certs\.json|\.env|atrest|runs|state|data)", s), \
                f"{name}: COPY {s}"
            assert (ROOT / s).exists(), f"{name}: COPY source {s} does not exist"
    assert not any(op == "ADD" for op, _ in ins), f"{name}: use COPY (ADD fetches URLs / unpacks archives)"
    for op, rest in ins:
        if op in ("ENV", "ARG"):
            assert not re.search(r"XRAYFED_ATREST_KEY\b|SECRET|PASSWORD|TOKEN", rest, re.I), f"{name}: {op} {rest}"
    run = " ".join(rest for op, rest in ins if op == "RUN")
    assert "--no-deps" in run and "crypten==0.4.1" in run and "install" in run
    assert any(op == "USER" and rest not in ("root", "0") for op, rest in ins), f"{name}: runs as root"
    ignore = df.with_name(name + ".dockerignore")
    assert ignore.is_file() and "**/*.key" in ignore.read_text()


def test_compose_builds_from_the_cpu_dockerfile_and_gpu_override_is_consistent(compose):
    build = compose["services"]["superlink"]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == (ROOT / "deploy/Dockerfile").resolve()
    gpu = _compose(ROOT / "deploy/compose.gpu.yml")
    assert set(gpu["services"]) <= set(compose["services"]) and set(gpu["services"]) >= set(HOSPITALS)
    assert gpu["services"]["hospital-a"]["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    for svc in gpu["services"].values():
        assert "command" not in svc and "volumes" not in svc  # only image and device change


def test_example_configs_of_every_role_load():
    cfgs = ROOT / "deploy" / "config"
    for f in ("federation.toml", "federation.compose.toml"):
        c = load_config(FederationConfig, cfgs / f)
        assert c.model == default_model(c.image_size, c.task.num_outputs)  # the deploy examples use the default
        assert c.federation.secure_aggregation and c.network.auth_enabled and not c.network.tls.insecure
        assert c.network.control.startswith("127.0.0.1:")
    for f in ("hospital.toml", "hospital.compose.toml"):
        assert load_config(HospitalConfig, cfgs / f).hospital.require_secure_aggregation
    inf = load_config(InferenceServiceConfig, cfgs / "inference.toml")
    assert not inf.tls.insecure and inf.tls.cert and inf.crypto_provider_secret
    provider = load_config(CryptoProviderConfig, cfgs / "crypto-provider.toml")
    assert provider.secret and provider.mpc_host and inf.crypto_provider_public
    assert "crypto-provider/tls.pem" in str(provider.tls.cert)
    for f in ("server.env.example", "hospital.env.example"):
        text = (cfgs / f).read_text()
        assert "XRAYFED_ATREST_KEY_FILE=" in text
        assert not re.search(r"^XRAYFED_ATREST_KEY=\S", text, re.M)  # names a file, holds no key
