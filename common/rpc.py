"""Small gRPC plumbing for the encrypted-inference services (no protoc code generation).

Messages are JSON objects (UTF-8 bytes) carried by generic unary-unary methods
(``grpc.method_handlers_generic_handler`` on the server, ``channel.unary_unary`` on the
client). Every channel is TLS unless ``--insecure`` is given (then a warning is printed).
Errors on the client side become one-line :class:`~xrayfed.common.errors.UserError` s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from xrayfed.common.errors import UserError

MAX_MESSAGE = 1 << 20  # requests/responses are small JSON objects (no scans, no weights)
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]


def dumps(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


def loads(data: bytes) -> dict:
    obj = json.loads(data.decode("utf-8"))
    if not isinstance(obj, dict):
        raise ValueError("message must be a JSON object")
    return obj


def _read(path: Path | None, what: str) -> bytes:
    if path is None:
        raise UserError(f"{what}: not given (or use --insecure for a local experiment)")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what}: no file at {p}")
    return p.read_bytes()


def server_credentials(cert: Path | None, key: Path | None, what: str):
    """TLS credentials of a gRPC server from PEM files (clear errors for missing files)."""
    import grpc

    crt = _read(cert, f"{what} TLS certificate (--cert)")
    k = _read(key, f"{what} TLS key (--key)")
    try:
        return grpc.ssl_server_credentials([(k, crt)])
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{what}: unusable TLS certificate/key ({type(e).__name__})") from None


def make_channel(target: str, *, ca_cert: Path | None, insecure: bool):
    """A channel to ``target``: TLS verified by ``ca_cert`` (or the system roots), or plaintext."""
    import grpc

    if insecure:
        return grpc.insecure_channel(target, options=OPTIONS)
    root = _read(ca_cert, "CA certificate (--ca-cert)") if ca_cert is not None else None
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root), options=OPTIONS)


def method(channel, service: str, name: str):
    return channel.unary_unary(f"/{service}/{name}", request_serializer=dumps, response_deserializer=loads)


def generic_handler(service: str, methods: dict[str, Callable]):
    import grpc

    return grpc.method_handlers_generic_handler(service, {
        name: grpc.unary_unary_rpc_method_handler(fn, request_deserializer=loads, response_serializer=dumps)
        for name, fn in methods.items()
    })


def start_server(service: str, methods: dict[str, Callable], *, host: str, port: int, creds, max_workers: int,
                 what: str, listen: str):
    """Start a gRPC server for ``service`` on ``host:port`` (TLS with ``creds``, plaintext when
    ``None``). Returns ``(server, bound_port)``; a port that cannot be bound is one line."""
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=OPTIONS)
    server.add_generic_rpc_handlers((generic_handler(service, methods),))
    addr = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    bound = server.add_secure_port(addr, creds) if creds is not None else server.add_insecure_port(addr)
    if not bound:
        raise UserError(f"{what}: cannot listen on {listen} (address in use or not local)")
    server.start()
    return server, bound


def run_until_stopped(server, stop_all: Callable[[], None], ready=None, stop=None) -> int:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT in the main thread); then stop the server
    and call ``stop_all`` (tear down open sessions). ``ready`` is set once serving."""
    import signal
    import threading

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda *_: stop.set())
    if ready is not None:
        ready.set()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop(grace=2).wait(5)
        stop_all()
    return 0


def call(stub, request: dict, *, timeout: float, what: str, target: str, metadata=None) -> dict:
    """Call ``stub`` and turn gRPC failures into one clear line."""
    import grpc

    try:
        return stub(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else None
        details = (e.details() if hasattr(e, "details") else "") or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            hint = details.splitlines()[0][:160] if details else "connection failed"
            low = details.lower()
            if any(w in low for w in ("handshake", "ssl", "certificate", "socket closed")):
                raise UserError(f"cannot reach {what} at {target}: TLS handshake failed (wrong --ca-cert, "
                                f"or a plaintext/TLS mismatch) [{hint}]") from None
            if any(w in low for w in ("connect", "dns", "resolve", "unreachable", "no route")) or not details:
                raise UserError(f"cannot reach {what} at {target} ({hint})") from None
            raise UserError(f"{what} at {target} is unavailable: {hint}") from None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise UserError(f"{what} at {target} did not answer within {timeout:.0f}s") from None
        name = code.name if code is not None else "ERROR"
        raise UserError(f"{what} refused the request ({name}): {details}") from None
