"""xrayfed's Fleet-only gateway in front of Flower's SuperLink (``xrayfed server``'s public port).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as _dt
import ssl
import threading
import time
from pathlib import Path
from typing import Mapping

from xrayfed.common.errors import UserError
from xrayfed.common.flower_launch import existing_file
from xrayfed.common.security.authkey import public_key_fingerprint

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
#: Requests in flight that are not signed by a registered key (hospital authentication on): a
#: pool smaller than GATEWAY_MAX_CONCURRENT, so such requests never hold every slot and signed
#: hospital requests always find one.
GATEWAY_MAX_UNAUTHENTICATED_CONCURRENT = 16
#: Seconds from a connection's start (after the TLS handshake), or from the end of its previous
#: response plus the keep-alive idle time, to the end of the next request's headers; a
#: connection whose headers take longer is closed.
GATEWAY_HEADER_TIMEOUT_S = 10.0
#: A request not signed by a registered key (every request when hospital authentication is off)
#: must deliver its body within GATEWAY_BODY_FLOOR_S + size / GATEWAY_MIN_RATE seconds of its
#: headers (size: its Content-Length, or the most it may send), or it is answered 408 and its
#: connection closed: slow senders cannot hold slots (64 KiB unauthenticated: 26 s at most).
GATEWAY_BODY_FLOOR_S = 10.0
GATEWAY_MIN_RATE = 4096  # bytes/s
#: Any request: at most this many seconds without a byte of its body (then 408, closed).
GATEWAY_READ_TIMEOUT_S = 60.0
SIGNATURE_WINDOW_S = 305  # Flower's TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "host", "content-length"}
REFUSAL_STATUSES = (401, 403, 412)


def verify_fleet_signature(headers: Mapping[str, str], now: float | None = None) -> bool:
    """Flower's SuperNode request signature: ECDSA-SHA256 by the key in ``flwr-public-key`` over
    the ISO timestamp in ``flwr-timestamp``, which must be fresh (what the SuperLink checks)."""
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
    flight (``max_per_client`` per IP address, ``max_unauthenticated_concurrent`` not signed by a
    registered key; more get 503 at once); slow senders are cut off (see the ``GATEWAY_*_S``
    constants: request headers within ``header_timeout_s``, a body not signed by a registered
    key within ``body_floor_s + size / min_rate``, no body byte for ``read_timeout_s``: 408 and
    the connection closed); a body over
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
                 max_unauthenticated_concurrent: int | None = None, header_timeout_s: float | None = None,
                 body_floor_s: float | None = None, min_rate: float | None = None,
                 read_timeout_s: float | None = None, refresh_s: float = 15.0) -> None:
        self.host, self.port, self.upstream = host, int(port), upstream.rstrip("/")
        # Denial-of-service bounds (see the class docstring).
        self.registered_keys = registered_keys  # callable → fingerprints of registered keys; None: auth off
        self.max_body, self.max_unauth = int(max_body), int(max_unauthenticated_body)
        self.max_concurrent, self.max_per_client = int(max_concurrent), int(max_per_client)

        def pick(value, default):  # None: the module constant as it is now
            return default if value is None else value

        self.max_unauth_concurrent = min(self.max_concurrent, int(pick(max_unauthenticated_concurrent,
                                                                      GATEWAY_MAX_UNAUTHENTICATED_CONCURRENT)))
        self.header_timeout_s = float(pick(header_timeout_s, GATEWAY_HEADER_TIMEOUT_S))
        self.body_floor_s = float(pick(body_floor_s, GATEWAY_BODY_FLOOR_S))
        self.min_rate = float(pick(min_rate, GATEWAY_MIN_RATE))
        self.read_timeout_s = float(pick(read_timeout_s, GATEWAY_READ_TIMEOUT_S))
        self.refresh_s = refresh_s
        self._known: set[str] = set()
        self._known_at = -1e9
        self._active = 0
        self._unauth_active = 0
        self._per_client: dict[str, int] = {}
        self.stats = {"too_large": 0, "busy": 0, "unauthenticated": 0, "max_body_read": 0, "slow_body": 0,
                      "slow_headers": 0}
        self.insecure = insecure
        self.certfile = None if insecure else existing_file(certfile, "network.tls.cert")
        self.keyfile = None if insecure else existing_file(keyfile, "network.tls.key")
        self.upstream_ca = None if insecure else existing_file(upstream_ca, "network.tls.ca_cert")
        self.on_refusal = on_refusal
        self._server = None
        self._thread = None
        self._client = None

    # -- ASGI application
    async def _respond(self, send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None,
                       close: bool = False):
        hdrs = [(b"content-length", str(len(body)).encode())] + (headers or [(b"content-type", b"text/plain")])
        if close:  # the rest of the request body is not read: end the connection after this answer
            hdrs.append((b"connection", b"close"))
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
        # Whether the headers are a fresh signature by a registered key: decided before any slot
        # is taken or any body byte is read.
        trusted = await self._authenticated(headers, fp)
        pooled = self.registered_keys is not None and not trusted  # counted against the smaller pool
        if (self._active >= self.max_concurrent or self._per_client.get(client, 0) >= self.max_per_client
                or (pooled and self._unauth_active >= self.max_unauth_concurrent)):
            self.stats["busy"] += 1
            self._report(path, 503, fp, scope.get("client"))
            await self._respond(send, 503, b"xrayfed gateway: too many requests in flight; retry shortly\n",
                                close=True)
            return
        self._active += 1
        self._unauth_active += pooled
        self._per_client[client] = self._per_client.get(client, 0) + 1
        try:
            await self._forward(scope, receive, send, path, headers, fp, trusted)
        finally:
            self._active -= 1
            self._unauth_active -= pooled
            left = self._per_client.get(client, 1) - 1
            if left > 0:
                self._per_client[client] = left
            else:
                self._per_client.pop(client, None)

    async def _authenticated(self, headers: dict[str, str], fp: str) -> bool:
        """Whether the request is signed (fresh timestamp) by a registered hospital key (False
        for every request when hospital authentication is off: nobody is registered)."""
        if self.registered_keys is None:
            return False
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

    async def _forward(self, scope, receive, send, path: str, headers: dict[str, str], fp: str,
                       trusted: bool) -> None:
        import httpx

        start = time.monotonic()
        limit = self.max_body
        if not trusted and self.registered_keys is not None:
            limit = self.max_unauth
            self.stats["unauthenticated"] += 1
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            self.stats["too_large"] += 1
            self._report(path, 413, fp, scope.get("client"))
            await self._respond(send, 413, b"xrayfed gateway: request too large\n", close=True)
            return
        # Not signed by a registered key: the whole body within floor + size / minimum rate.
        expected = int(declared) if declared.isdigit() else limit
        body_deadline = None if trusted else start + self.body_floor_s + expected / self.min_rate
        chunks, size = [], 0
        while True:
            wait = self.read_timeout_s if body_deadline is None else min(self.read_timeout_s,
                                                                        body_deadline - time.monotonic())
            try:
                if wait <= 0:
                    raise asyncio.TimeoutError
                msg = await asyncio.wait_for(receive(), wait)
            except asyncio.TimeoutError:
                self.stats["slow_body"] += 1
                self._report(path, 408, fp, scope.get("client"))
                await self._respond(send, 408, b"xrayfed gateway: request body too slow\n", close=True)
                return
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            self.stats["max_body_read"] = max(self.stats["max_body_read"], size)
            if size > limit:
                self.stats["too_large"] += 1
                self._report(path, 413, fp, scope.get("client"))
                await self._respond(send, 413, b"xrayfed gateway: request too large\n", close=True)
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
        ctx = ssl.create_default_context(cafile=self.upstream_ca)
        return ctx

    # -- lifecycle
    def start(self, timeout: float = 30.0) -> "FleetGateway":
        import uvicorn

        config = uvicorn.Config(self, host=self.host, port=self.port, ssl_certfile=self.certfile,
                                ssl_keyfile=self.keyfile, log_level="warning", access_log=False, lifespan="on",
                                http=_header_deadline_protocol(self), ws="none", interface="asgi3",
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


def _header_deadline_protocol(gateway: FleetGateway):
    """uvicorn's h11 protocol with a deadline on request headers (uvicorn has none: a client
    sending one header byte at a time kept its connection forever). The headers of a request
    must be complete ``gateway.header_timeout_s`` after the connection starts, or after the
    previous response plus the keep-alive idle time; otherwise the connection is closed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineH11(H11Protocol):
        _timer = None
        _armed_cycle = None

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._armed_cycle = self.cycle
            self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            # no request's headers were completed since the deadline was set (same cycle)
            if self.cycle is self._armed_cycle and not self.transport.is_closing():
                gateway.stats["slow_headers"] += 1
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(gateway.header_timeout_s)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm(self.timeout_keep_alive + gateway.header_timeout_s)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineH11
