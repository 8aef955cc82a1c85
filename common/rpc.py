"""Small gRPC plumbing for the encrypted-inference services (no protoc code generation).

Messages are JSON objects (UTF-8 bytes) carried by generic unary-unary methods
(``grpc.method_handlers_generic_handler`` on the server, ``channel.unary_unary`` on the
client). Every channel is TLS unless ``--insecure`` is given (then a warning is printed).
Errors on the client side become one-line :class:`~xrayfed.common.errors.UserError` s, and
gRPC's own C-core log lines (``E0000 ... ssl_transport_security.cc ...`` on a failed TLS
handshake) are off: importing this module sets ``GRPC_VERBOSITY=NONE`` unless the environment
already sets it (set ``GRPC_VERBOSITY=DEBUG`` to see them); it must come before ``grpc`` is
imported, which every module here does lazily.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
from concurrent import futures
from pathlib import Path
from typing import Callable

from xrayfed.common.errors import UserError

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # read by gRPC's C core when grpc is imported

MAX_MESSAGE = 64 << 20  # JSON objects, and the patient's shares + dealt randomness (a few MiB; never weights)
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
#: Room for a request's JSON (token, session id, scan description) next to its arrays.
REQUEST_OVERHEAD = 64 << 10


def dumps(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


def loads(data: bytes) -> dict:
    obj = json.loads(data.decode("utf-8"))
    if not isinstance(obj, dict):
        raise ValueError("message must be a JSON object")
    return obj


def dumps_frame(msg: tuple[dict, dict]) -> bytes:
    """A binary message: a JSON header and named byte blobs, ``(header, {name: bytes})``.

    Layout: ``u32 header length | header JSON | blob bytes...``; the header lists each blob's
    name and length under ``"_blobs"``. Used where a message carries arrays (MPC shares).
    """
    header, blobs = msg
    head = dict(header, _blobs=[[k, len(v)] for k, v in blobs.items()])
    h = json.dumps(head, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return b"".join([struct.pack("<I", len(h)), h, *blobs.values()])


def loads_frame(data: bytes) -> tuple[dict, dict]:
    if len(data) < 4:
        raise ValueError("frame too short")
    (n,) = struct.unpack_from("<I", data)
    if n > 1 << 20 or 4 + n > len(data):
        raise ValueError("frame header length out of range")
    head = json.loads(data[4:4 + n].decode("utf-8"))
    if not isinstance(head, dict) or not isinstance(head.get("_blobs", []), list):
        raise ValueError("frame header must be a JSON object")
    blobs, pos = {}, 4 + n
    for name, size in head.pop("_blobs", []):
        if not (isinstance(name, str) and isinstance(size, int) and 0 <= size <= len(data) - pos):
            raise ValueError("frame blob out of range")
        blobs[name] = data[pos:pos + size]
        pos += size
    if pos != len(data):
        raise ValueError("frame has trailing bytes")
    return head, blobs


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


def make_channel(target: str, *, ca_cert: Path | None, insecure: bool, server_name: str | None = None,
                 ca_flag: str = "--ca-cert"):
    """A channel to ``target``: TLS verified by ``ca_cert`` (or the system roots), or plaintext.
    ``server_name``: the certificate must be valid for this name instead of the target's host
    (pins a role, e.g. the crypto provider's certificate). ``ca_flag``: the option that gave
    ``ca_cert``, named when the file is not a PEM certificate."""
    import grpc

    if insecure:
        return grpc.insecure_channel(target, options=OPTIONS)
    root = _ca_pem(ca_cert, ca_flag) if ca_cert is not None else None
    opts = OPTIONS + ([("grpc.ssl_target_name_override", server_name)] if server_name else [])
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root), options=opts)


def _ca_pem(path: Path, flag: str) -> bytes:
    """The PEM bytes of a CA certificate file; a missing file or one that holds no PEM
    certificate is one line naming ``flag`` (gRPC would only fail later, at the handshake)."""
    from cryptography import x509

    pem = _read(path, f"CA certificate ({flag})")
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise UserError(f"{flag} {path}: not a PEM CA certificate (pass the CA certificate file, ca.pem, "
                        "that signed the service's TLS certificate)") from None
    return pem


BINARY_METHODS = frozenset({"Evaluate"})  # methods whose messages are frames (header + blobs), not JSON


def method(channel, service: str, name: str):
    if name in BINARY_METHODS:
        return channel.unary_unary(f"/{service}/{name}", request_serializer=dumps_frame,
                                   response_deserializer=loads_frame)
    return channel.unary_unary(f"/{service}/{name}", request_serializer=dumps, response_deserializer=loads)


def generic_handler(service: str, methods: dict[str, Callable]):
    import grpc

    def handler(name, fn):
        if name in BINARY_METHODS:
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=loads_frame,
                                                       response_serializer=dumps_frame)
        return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=loads, response_serializer=dumps)

    return grpc.method_handlers_generic_handler(service, {name: handler(name, fn) for name, fn in methods.items()})


def start_server(service: str, methods: dict[str, Callable], *, host: str, port: int, creds, max_workers: int,
                 what: str, listen: str, max_request: int | None = None, max_concurrent_rpcs: int | None = None):
    """Start a gRPC server for ``service`` on ``host:port`` (TLS with ``creds``, plaintext when
    ``None``). Returns ``(server, bound_port)``; a port that cannot be bound is one line.

    ``max_request``: the largest request message, in bytes (default ``MAX_MESSAGE``). gRPC reads a
    whole message before any handler can authenticate it, so a service sizes this to its largest
    legitimate request; a larger one is refused with RESOURCE_EXHAUSTED as soon as its length is
    read, never buffered. ``max_concurrent_rpcs``: calls in progress or queued at once; more are
    refused with RESOURCE_EXHAUSTED."""
    import grpc

    options = OPTIONS if max_request is None else [("grpc.max_receive_message_length", int(max_request)),
                                                   ("grpc.max_send_message_length", MAX_MESSAGE)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options,
                         maximum_concurrent_rpcs=max_concurrent_rpcs)
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


def call(stub, request: dict, *, timeout: float, what: str, target: str, metadata=None,
         ca_flag: str = "--ca-cert") -> dict:
    """Call ``stub`` and turn gRPC failures into one clear line (``ca_flag``: the option that
    gives the CA certificate, named when the server's certificate is not trusted)."""
    import grpc

    try:
        return stub(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else None
        details = (e.details() if hasattr(e, "details") else "") or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            hint = details.splitlines()[0][:160] if details else "connection failed"
            low = details.lower()
            if "certificate_verify_failed" in low or "unable to get local issuer" in low:
                raise UserError(f"cannot reach {what} at {target}: its TLS certificate is not signed by a CA you "
                                f"trust; pass the CA certificate it was issued with: {ca_flag} FILE "
                                "(e.g. the ca.pem you were given)") from None
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
