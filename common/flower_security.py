"""TLS and SuperNode authentication for Flower 1.41 deployments (checked against real processes).

What the launchers (``xrayfed server`` / ``xrayfed client``) call:

* :func:`superlink_args` / :func:`supernode_args`: the exact extra command-line arguments of
  ``flower-superlink`` / ``flower-supernode`` for TLS, ``--insecure`` or SuperNode auth.
* :func:`write_flwr_home`: a ``FLWR_HOME`` whose ``config.toml`` names the SuperLink
  connection used by ``flwr run`` and ``flwr supernode register|unregister|list``.
* :func:`flower_env`: the environment for every Flower process (``PATH`` must contain the
  venv's ``bin``: the SuperLink starts ``flower-superexec`` and the SuperNode ``flwr-clientapp``
  by name).
* :func:`register_hospitals` / :func:`unregister_hospital` / :func:`list_nodes`: the SuperLink's
  registry of hospital public keys (``--enable-supernode-auth``), via the ``flwr`` CLI.
* :func:`warn_insecure`: the one warning printed when TLS is switched off.
* :func:`refused_keys_in_log` / :func:`identify_hospital`: which hospital key a SuperLink log
  refused (Flower logs the refused key as PEM).

Facts (Flower 1.41, see ``deploy/FLOWER-NOTES.md``): the SuperLink serves Fleet, Control and
Runtime APIs over HTTPS on one ``--host/--port``; TLS needs all three ``--ssl-*`` files, the
certificate's SAN must contain the address clients dial *and* the one the SuperLink's own
SuperExec dials (``127.0.0.1`` when listening on 0.0.0.0). SuperNode auth requires TLS; keys are
EC on a NIST curve in OpenSSH format; an unregistered key is refused at activation (the SuperNode
exits) and logged by the SuperLink as ``[/v1/fleet/activate-node][ApiError:2004] ...
No SuperNode found with the given public key``. Unregistering a node cuts a running SuperNode
off at its next request (HTTP 401) and the key can never be registered again on that SuperLink
state: a re-admitted hospital needs a new key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Iterable, Mapping

from .errors import UserError

DEFAULT_CONNECTION = "xrayfed"
INSECURE_WARNING = ("WARNING: --insecure: {what} runs WITHOUT TLS (traffic, model updates and keys are readable "
                    "and forgeable on the network) and without hospital authentication; use it for local "
                    "experiments only")


# --------------------------------------------------------------------------- environment
def venv_bin_dir() -> Path:
    return Path(sys.executable).parent


def flower_env(flwr_home: Path | str | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a Flower process: venv ``bin`` first on PATH, FLWR_HOME if given.

    Each process that installs apps (SuperNode, ``flwr run``) writes under ``$FLWR_HOME/apps``;
    give every role its own FLWR_HOME so nothing lands in ``~/.flwr``.
    """
    env = dict(os.environ if base is None else base)
    bindir = str(venv_bin_dir())
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p]
    env["PATH"] = os.pathsep.join([bindir] + [p for p in parts if p != bindir])
    env.setdefault("PYTHONUNBUFFERED", "1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    return env


def warn_insecure(what: str = "the federation", stream: IO[str] | None = None) -> str:
    """Print (and return) the one-line warning for ``--insecure``."""
    line = "xrayfed: " + INSECURE_WARNING.format(what=what)
    print(line, file=stream or sys.stderr, flush=True)
    return line


def _file(path: Path | str | None, what: str) -> str:
    if path is None:
        raise UserError(f"{what} is not set; TLS is the default (make certificates with `xrayfed certs init`, "
                        "or pass --insecure for a local experiment)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what}: no file at {p}")
    return str(p.resolve())


# --------------------------------------------------------------------------- command lines
def superlink_args(
    *,
    insecure: bool = False,
    ca_cert: Path | str | None = None,
    cert: Path | str | None = None,
    key: Path | str | None = None,
    supernode_auth: bool = False,
) -> list[str]:
    """Extra ``flower-superlink`` arguments (besides ``--host/--port`` and
    ``--disable-runtime-dependency-installation``).

    TLS: ``--ssl-ca-certfile CA --ssl-certfile CERT --ssl-keyfile KEY`` (all three; the CA is
    what the SuperLink's own SuperExec trusts). Auth: ``--enable-supernode-auth`` (TLS only).
    """
    if insecure:
        if supernode_auth:
            raise UserError("hospital authentication (supernode_auth) needs TLS; remove --insecure")
        return ["--insecure"]
    args = [
        "--ssl-ca-certfile", _file(ca_cert, "network.tls.ca_cert"),
        "--ssl-certfile", _file(cert, "network.tls.cert"),
        "--ssl-keyfile", _file(key, "network.tls.key"),
    ]
    if supernode_auth:
        args.append("--enable-supernode-auth")
    return args


def superlink_args_from_config(network) -> list[str]:
    """:func:`superlink_args` from a :class:`xrayfed.common.config.ServerNetwork`."""
    tls = network.tls
    return superlink_args(insecure=tls.insecure, ca_cert=tls.ca_cert, cert=tls.cert, key=tls.key,
                          supernode_auth=network.auth_enabled)


def supernode_args(
    *,
    superlink: str,
    insecure: bool = False,
    root_certificates: Path | str | None = None,
    auth_private_key: Path | str | None = None,
) -> list[str]:
    """Extra ``flower-supernode`` arguments (besides ``--port`` and ``--node-config``).

    ``--superlink HOST:PORT`` plus either ``--insecure`` or ``--root-certificates CA`` (the CA
    that signed the SuperLink's certificate), and ``--auth-supernode-private-key KEY`` (the
    hospital's ``auth.key``) when the SuperLink authenticates SuperNodes.
    """
    args = ["--superlink", superlink]
    if insecure:
        if auth_private_key is not None:
            raise UserError("a hospital key (auth.key) is only used over TLS; remove --insecure")
        return args + ["--insecure"]
    args += ["--root-certificates", _file(root_certificates, "root certificates (the federation's ca.pem)")]
    if auth_private_key is not None:
        key = _file(auth_private_key, "hospital key (auth.key)")
        mode = os.stat(key).st_mode & 0o077
        if mode:
            raise UserError(f"{key}: the hospital's private key is readable by other users (chmod 600 {key})")
        args += ["--auth-supernode-private-key", key]
    return args


def _toml_str(s: str) -> str:
    return json.dumps(str(s), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def connection_toml(address: str, *, insecure: bool = False, root_certificates: Path | str | None = None,
                    name: str = DEFAULT_CONNECTION) -> str:
    """The ``config.toml`` of a FLWR_HOME with one SuperLink connection (the default)."""
    if not re.match(r"^[A-Za-z0-9_-]+$", name):
        raise UserError(f"connection name {name!r}: letters, digits, '_' and '-' only")
    lines = ["[superlink]", f"default = {_toml_str(name)}", "", f"[superlink.{name}]",
             f"address = {_toml_str(address)}"]
    if insecure:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {_toml_str(_file(root_certificates, 'root certificates (ca.pem)'))}")
    return "\n".join(lines) + "\n"


def write_flwr_home(home: Path | str, address: str, *, insecure: bool = False,
                    root_certificates: Path | str | None = None, name: str = DEFAULT_CONNECTION) -> Path:
    """Create ``home/config.toml`` (see :func:`connection_toml`); returns ``home``."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        connection_toml(address, insecure=insecure, root_certificates=root_certificates, name=name), encoding="utf-8")
    return home


# --------------------------------------------------------------------------- flwr CLI
def _flwr(home: Path | str, args: list[str], timeout: float = 60.0) -> dict:
    """Run ``flwr ARGS --format json`` with FLWR_HOME=home; the parsed JSON (or UserError)."""
    exe = str(venv_bin_dir() / "flwr") if (venv_bin_dir() / "flwr").exists() else "flwr"
    try:
        proc = subprocess.run([exe, *args, "--format", "json"], env=flower_env(home), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserError(f"`flwr {' '.join(args[:2])}` did not answer within {timeout:.0f}s (is the SuperLink up?)") from None
    out = proc.stdout.strip()
    data = None
    start = out.find("{")
    if start >= 0:
        try:
            data = json.loads(out[start:])
        except json.JSONDecodeError:
            data = None
    if not isinstance(data, dict) or not data.get("success"):
        reason = ""
        if isinstance(data, dict):
            reason = str(data.get("error-message", ""))
        reason = reason or (proc.stderr.strip() or out)
        reason = " ".join(reason.replace("\n", " ").split())
        reason = re.sub(r"^Using SuperLink: \S+ \([^)]*\)\s*", "", reason)
        raise UserError(f"`flwr {' '.join(args[:2])}` failed: {reason[-300:] or f'exit status {proc.returncode}'}")
    return data


def public_key_fingerprint(public_key: Path | str | bytes) -> str:
    """SHA-256 fingerprint (OpenSSH style) of an OpenSSH or PEM public key."""
    from cryptography.hazmat.primitives import serialization

    data = Path(public_key).read_bytes() if isinstance(public_key, (str, Path)) else bytes(public_key)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError) as e:
        raise UserError(f"not a public key ({type(e).__name__})") from None
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    return "SHA256:" + base64.b64encode(hashlib.sha256(base64.b64decode(blob)).digest()).decode().rstrip("=")


def register_hospital(home: Path | str, public_key: Path | str, *, name: str | None = None,
                      connection: str = DEFAULT_CONNECTION, timeout: float = 60.0) -> int:
    """Register one hospital's public key with the running SuperLink; returns its node id.

    Idempotent: a key that is already registered (and not revoked) returns its node id. A key
    that was unregistered (revoked) on this SuperLink is refused by Flower for good: UserError.
    """
    pub = Path(public_key)
    fp = public_key_fingerprint(pub)
    args = ["supernode", "register", str(pub.resolve()), connection]
    if name:
        args += ["--name", name]
    try:
        data = _flwr(home, args, timeout=timeout)
    except UserError as e:
        if "already in use" not in str(e):
            raise
        known = node_id_for_key(home, pub, connection=connection)
        if known is not None:
            return known
        raise UserError(f"hospital key {pub} ({fp}) was revoked on this SuperLink and cannot be registered again; "
                        "give the hospital a new key (`xrayfed certs add-hospital NAME --force`)") from None
    return int(data["node-id"])


def register_hospitals(home: Path | str, keys: Mapping[str, Path | str] | Iterable[Path | str], *,
                       connection: str = DEFAULT_CONNECTION) -> dict[str, int]:
    """Register several keys (``{name: auth.pub}`` or paths); ``{name: node_id}``."""
    items = keys.items() if isinstance(keys, Mapping) else ((Path(k).parent.name, k) for k in keys)
    return {name: register_hospital(home, pub, name=name, connection=connection) for name, pub in items}


def unregister_hospital(home: Path | str, key_or_node: Path | str | int, *,
                        connection: str = DEFAULT_CONNECTION, timeout: float = 60.0) -> int:
    """Revoke: unregister a node (by public key file registered through ``home``, or node id).

    The node id of a key is looked up on the SuperLink itself. A running SuperNode with that
    key is refused at its next request (HTTP 401) and stops; it cannot re-join with the same
    key. Returns the node id.
    """
    if isinstance(key_or_node, int):
        node_id = key_or_node
    else:
        fp = public_key_fingerprint(key_or_node)
        found = node_id_for_key(home, key_or_node, connection=connection)
        if found is None:
            raise UserError(f"{key_or_node} ({fp}): no registered SuperNode has this key on the SuperLink")
        node_id = found
    _flwr(home, ["supernode", "unregister", str(node_id), connection], timeout=timeout)
    return node_id


def list_nodes(home: Path | str, *, connection: str = DEFAULT_CONNECTION, timeout: float = 60.0) -> list[dict]:
    """The SuperLink's nodes: ``[{"node-id": str, "status": "registered|online|offline|..."}, ...]``."""
    return list(_flwr(home, ["supernode", "list", connection], timeout=timeout).get("nodes", []))


# --------------------------------------------------------------------------- refusals in logs
_REFUSED_RE = re.compile(
    r"\[/v1/fleet/(activate-node|register-node)\]\[ApiError:(\d+)\][^\n]*?public key: b'(-----BEGIN PUBLIC KEY-----.*?"
    r"-----END PUBLIC KEY-----)(?:\\n)?'"
)


def refused_keys_in_log(log_text: str) -> list[dict]:
    """SuperNode refusals in a SuperLink log: ``[{"endpoint", "code", "fingerprint", "pem"}]``.

    Codes seen in 1.41: 2004 = activation with an unregistered/revoked key; 2001 = a SuperNode
    without a key tried to self-register while authentication is on.
    """
    out = []
    for m in _REFUSED_RE.finditer(log_text):
        pem = m.group(3).replace("\\n", "\n") + "\n"
        try:
            fp = public_key_fingerprint(pem.encode())
        except UserError:
            fp = ""
        out.append({"endpoint": m.group(1), "code": int(m.group(2)), "fingerprint": fp, "pem": pem})
    return out


def identify_hospital(pki_dir: Path | str, fingerprint: str) -> str | None:
    """The hospital of ``xrayfed certs`` folder ``pki_dir`` whose key has this fingerprint."""
    from .certs import read_manifest

    for name, e in read_manifest(Path(pki_dir))["hospitals"].items():
        if e.get("fingerprint") == fingerprint:
            return name
    return None


# --------------------------------------------------------------------------- node ids by key
def _list_node_keys_main(connection: str) -> int:  # pragma: no cover - runs in a subprocess
    """Print ``[{"node_id", "status", "public_key"}]`` from the Control API (FLWR_HOME from env).

    ``flwr supernode list`` does not show public keys, so this uses the ``flwr`` CLI's own
    Control-API client (internal API of flwr 1.41).
    """
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=E0611

    client = init_http_client_from_connection(read_superlink_connection(connection))
    try:
        res = client.ListNodes(request=ListNodesRequest())
    finally:
        client.close()
    rows = [{"node_id": int(n.node_id), "status": n.status,
             "public_key": n.public_key.decode("ascii", "replace")} for n in res.nodes_info]
    print("XRAYFED-NODES " + json.dumps(rows))
    return 0


def node_keys(home: Path | str, *, connection: str = DEFAULT_CONNECTION, timeout: float = 60.0) -> list[dict]:
    """Every node the SuperLink knows with its key: ``[{"node_id", "status", "fingerprint"}]``."""
    code = ("import sys; from xrayfed.common.flower_security import _list_node_keys_main as m; "
            "sys.exit(m(sys.argv[1]))")
    try:
        proc = subprocess.run([sys.executable, "-c", code, connection], env=flower_env(home), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserError(f"listing the SuperLink's nodes did not finish within {timeout:.0f}s") from None
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("XRAYFED-NODES ")), None)
    if line is None:
        tail = " ".join((proc.stderr or proc.stdout).split())[-300:]
        raise UserError(f"could not list the SuperLink's nodes: {tail or f'exit status {proc.returncode}'}")
    rows = json.loads(line[len("XRAYFED-NODES "):])
    for r in rows:
        try:
            r["fingerprint"] = public_key_fingerprint(r.pop("public_key").encode())
        except UserError:
            r["fingerprint"] = ""
    return rows


def node_id_for_key(home: Path | str, public_key: Path | str, *, connection: str = DEFAULT_CONNECTION) -> int | None:
    """The node id the SuperLink gave this public key (None: not registered)."""
    fp = public_key_fingerprint(public_key)
    for r in node_keys(home, connection=connection):
        if r["fingerprint"] == fp and r.get("status") not in ("unregistered", "deleted"):
            return int(r["node_id"])
    return None


# --------------------------------------------------------------------------- Fleet-only gateway
# Flower 1.41 serves the Fleet API (hospitals), the Control API (`flwr run`, `flwr supernode
# register|unregister`) and the Runtime API (the ServerApp's own connection) on ONE HTTPS port,
# and without Flower's OIDC plugin the Control API accepts anyone who can reach that port and
# trusts the (public) CA certificate: such a party could register its own SuperNode key (joining
# despite SuperNode authentication), submit a run with its own ServerApp code, or stop runs.
# So `xrayfed server` binds the SuperLink to a loopback address ([network] control) and puts
# this gateway on the public address ([network] listen): it forwards POST /v1/fleet/* only
# (what `flower-supernode` uses) and answers everything else with 403.
FLEET_PREFIX = "/v1/fleet/"
#: Largest request body from a hospital whose request is signed by a registered key. Flower 1.41
#: pushes model arrays in chunks of at most 5 MiB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE), so a
#: legitimate request stays far below this whatever the model size.
GATEWAY_MAX_BODY = 16 << 20
#: Largest body of a request that is not signed by a registered key (activation/registration
#: requests are < 1 KiB): such a request is refused before more than this is read.
GATEWAY_MAX_UNAUTHENTICATED_BODY = 64 << 10
GATEWAY_MAX_CONCURRENT = 64  # requests in flight through the gateway
GATEWAY_MAX_PER_CLIENT = 16  # requests in flight from one IP address
SIGNATURE_WINDOW_S = 305  # Flower's TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "host", "content-length"}
REFUSAL_STATUSES = (401, 403, 412)


def verify_fleet_signature(headers: Mapping[str, str], now: float | None = None) -> bool:
    """Flower's SuperNode request signature: ECDSA-SHA256 by the key in ``flwr-public-key`` over
    the ISO timestamp in ``flwr-timestamp``, which must be fresh (what the SuperLink checks)."""
    import datetime as _dt

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_public_key(base64.b64decode(headers["flwr-public-key"], validate=True))
        sig = base64.b64decode(headers["flwr-signature"], validate=True)
        stamp = headers["flwr-timestamp"]
        signed = _dt.datetime.fromisoformat(stamp)
        if signed.tzinfo is None:
            return False
        age = (time.time() if now is None else now) - signed.timestamp()
        if not -5 < age < SIGNATURE_WINDOW_S or not isinstance(key, ec.EllipticCurvePublicKey):
            return False
        key.verify(sig, stamp.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        return True
    except (KeyError, ValueError, TypeError, UnicodeError, InvalidSignature):
        return False


def key_fingerprint_from_header(value: str | None) -> str:
    """Fingerprint of the SuperNode public key in a Fleet request header (base64 of a PEM key)."""
    if not value:
        return ""
    try:
        return public_key_fingerprint(base64.b64decode(value, validate=True))
    except (ValueError, UserError):
        return ""


class FleetGateway:
    """A TLS (or, with ``insecure``, plain HTTP) front door that passes only the Fleet API.

    Bounds against one caller exhausting the server: at most ``max_concurrent`` requests in
    flight (``max_per_client`` per IP address; more get 503 at once); a body over
    ``max_body`` is refused (413) from its Content-Length or as soon as the streamed bytes pass
    it; and when ``registered_keys`` is given (hospital authentication on) a request whose
    headers are not a fresh ECDSA signature by a registered hospital key is read no further
    than ``max_unauthenticated_body`` (enough for activation/registration, which the SuperLink
    then answers itself): nothing large is ever buffered for an unauthenticated caller.

    ``upstream``: the SuperLink's base URL (``https://127.0.0.1:PORT``), verified with
    ``upstream_ca``. ``on_refusal(info)`` is called (from the gateway's thread) for every
    Fleet request the SuperLink refused (HTTP 401/403/412: unknown, revoked or unauthenticated
    hospital key) and for every request the gateway itself denied; ``info`` has ``path``,
    ``status``, ``fingerprint`` (of the hospital key in the request, "" if none) and ``client``.
    """

    def __init__(self, host: str, port: int, upstream: str, *, insecure: bool = False,
                 certfile: Path | str | None = None, keyfile: Path | str | None = None,
                 upstream_ca: Path | str | None = None, on_refusal=None, registered_keys=None,
                 max_body: int = GATEWAY_MAX_BODY, max_unauthenticated_body: int = GATEWAY_MAX_UNAUTHENTICATED_BODY,
                 max_concurrent: int = GATEWAY_MAX_CONCURRENT, max_per_client: int = GATEWAY_MAX_PER_CLIENT,
                 refresh_s: float = 15.0) -> None:
        self.host, self.port, self.upstream = host, int(port), upstream.rstrip("/")
        # Denial-of-service bounds (see the class docstring).
        self.registered_keys = registered_keys  # callable → fingerprints of registered keys; None: auth off
        self.max_body, self.max_unauth = int(max_body), int(max_unauthenticated_body)
        self.max_concurrent, self.max_per_client = int(max_concurrent), int(max_per_client)
        self.refresh_s = refresh_s
        self._known: set[str] = set()
        self._known_at = -1e9
        self._active = 0
        self._per_client: dict[str, int] = {}
        self.stats = {"too_large": 0, "busy": 0, "unauthenticated": 0, "max_body_read": 0}
        self.insecure = insecure
        self.certfile = None if insecure else _file(certfile, "network.tls.cert")
        self.keyfile = None if insecure else _file(keyfile, "network.tls.key")
        self.upstream_ca = None if insecure else _file(upstream_ca, "network.tls.ca_cert")
        self.on_refusal = on_refusal
        self._server = None
        self._thread = None
        self._client = None

    # -- ASGI application
    async def _respond(self, send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None):
        hdrs = [(b"content-length", str(len(body)).encode())] + (headers or [(b"content-type", b"text/plain")])
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})

    def _report(self, path: str, status: int, fingerprint: str, client) -> None:
        if self.on_refusal is None:
            return
        try:
            self.on_refusal({"path": path, "status": status, "fingerprint": fingerprint,
                             "client": f"{client[0]}:{client[1]}" if client else "?"})
        except Exception:  # pragma: no cover - a logging callback must not break the gateway
            pass

    async def __call__(self, scope, receive, send) -> None:
        import httpx

        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    verify = False if self.insecure else self._ssl_context()
                    self._client = httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(600.0, connect=10.0),
                                                     follow_redirects=False)
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    if self._client is not None:
                        await self._client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        fp = key_fingerprint_from_header(headers.get("flwr-public-key"))
        if scope.get("method") != "POST" or not path.startswith(FLEET_PREFIX) or ".." in path or "%" in path:
            self._report(path, 403, fp, scope.get("client"))
            await self._respond(send, 403, b"xrayfed gateway: only the Flower Fleet API is served on this port\n")
            return
        client = (scope.get("client") or ("?", 0))[0]
        if self._active >= self.max_concurrent or self._per_client.get(client, 0) >= self.max_per_client:
            self.stats["busy"] += 1
            self._report(path, 503, fp, scope.get("client"))
            await self._respond(send, 503, b"xrayfed gateway: too many requests in flight; retry shortly\n")
            return
        self._active += 1
        self._per_client[client] = self._per_client.get(client, 0) + 1
        try:
            await self._forward(scope, receive, send, path, headers, fp)
        finally:
            self._active -= 1
            left = self._per_client.get(client, 1) - 1
            if left > 0:
                self._per_client[client] = left
            else:
                self._per_client.pop(client, None)

    async def _authenticated(self, headers: dict[str, str], fp: str) -> bool:
        """Whether the request is signed (fresh timestamp) by a registered hospital key."""
        import asyncio

        if self.registered_keys is None:
            return True
        if not fp or not verify_fleet_signature(headers):
            return False
        if fp in self._known:
            return True
        now = time.monotonic()
        if now - self._known_at >= self.refresh_s:  # a hospital registered live: look again (rate-limited)
            self._known_at = now
            try:
                self._known = set(await asyncio.to_thread(self.registered_keys))
            except Exception:  # pragma: no cover - keep the old set when the registry cannot be read
                pass
        return fp in self._known

    async def _forward(self, scope, receive, send, path: str, headers: dict[str, str], fp: str) -> None:
        import httpx

        limit = self.max_body
        if not await self._authenticated(headers, fp):
            limit = self.max_unauth
            self.stats["unauthenticated"] += 1
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            self.stats["too_large"] += 1
            self._report(path, 413, fp, scope.get("client"))
            await self._respond(send, 413, b"xrayfed gateway: request too large\n")
            return
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            self.stats["max_body_read"] = max(self.stats["max_body_read"], size)
            if size > limit:
                self.stats["too_large"] += 1
                self._report(path, 413, fp, scope.get("client"))
                await self._respond(send, 413, b"xrayfed gateway: request too large\n")
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        fwd = [(k, v) for k, v in scope.get("headers", []) if k.decode("latin-1").lower() not in _HOP_BY_HOP]
        url = self.upstream + path + (("?" + scope["query_string"].decode("latin-1")) if scope.get("query_string") else "")
        try:
            resp = await self._client.post(url, content=b"".join(chunks), headers=fwd)
        except httpx.HTTPError as e:
            await self._respond(send, 502, f"xrayfed gateway: SuperLink unreachable ({type(e).__name__})\n".encode())
            return
        if resp.status_code in REFUSAL_STATUSES:
            self._report(path, resp.status_code, fp, scope.get("client"))
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.multi_items()
               if k.lower() not in _HOP_BY_HOP and k.lower() != "content-encoding"]
        await self._respond(send, resp.status_code, resp.content, out)

    def _ssl_context(self):
        import ssl

        ctx = ssl.create_default_context(cafile=self.upstream_ca)
        return ctx

    # -- lifecycle
    def start(self, timeout: float = 30.0) -> "FleetGateway":
        import threading
        import time

        import uvicorn

        config = uvicorn.Config(self, host=self.host, port=self.port, ssl_certfile=self.certfile,
                                ssl_keyfile=self.keyfile, log_level="warning", access_log=False, lifespan="on",
                                http="h11", ws="none", interface="asgi3",
                                timeout_keep_alive=75, server_header=False, date_header=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="xrayfed-fleet-gateway", daemon=True)
        self._thread.start()
        deadline = time.time() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise UserError(f"the Fleet gateway could not listen on {self.host}:{self.port} (port in use?)")
            if time.time() > deadline:
                raise UserError(f"the Fleet gateway did not start on {self.host}:{self.port} within {timeout:.0f}s")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
