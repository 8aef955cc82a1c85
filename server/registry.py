"""The SuperLink's registry of hospital keys (``--enable-supernode-auth``), through the ``flwr``
CLI: register, unregister (revoke), list, node id of a key; and which keys a SuperLink log
refused. The operator's side only (``xrayfed server``, ``xrayfed certs revoke-hospital``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Mapping

from xrayfed.common.errors import UserError
from xrayfed.common.flower_launch import DEFAULT_CONNECTION, flower_env, venv_bin_dir
from xrayfed.common.security.authkey import public_key_fingerprint


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
    code = ("import sys; from xrayfed.server.registry import _list_node_keys_main as m; "
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
