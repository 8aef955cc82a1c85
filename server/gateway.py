"""xrayfed's Fleet-only gateway in front of Flower's SuperLink (``xrayfed server``'s public port).
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Mapping

from xrayfed.common.errors import UserError
from xrayfed.common.flower_launch import existing_file
from xrayfed.common.security.pki import public_key_fingerprint

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
        self.certfile = None if insecure else existing_file(certfile, "network.tls.cert")
        self.keyfile = None if insecure else existing_file(keyfile, "network.tls.key")
        self.upstream_ca = None if insecure else existing_file(upstream_ca, "network.tls.ca_cert")
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
