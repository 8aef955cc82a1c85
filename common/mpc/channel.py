"""The MPC link between the two computing parties (hospital ↔ crypto provider): one TLS
connection, authenticated both ways, and a CrypTen communicator that runs over it.

* **Server authentication**: the crypto provider's party presents its TLS certificate; the
  hospital's party verifies it against the CA it trusts for the crypto provider (``ttp_ca``).
* **Client authentication**: the first message inside TLS is the session's hospital key (a
  128-bit secret the hospital's service generated for this session and gave the crypto
  provider over its authenticated ``StartSession`` call); the crypto provider's party compares
  it in constant time and accepts exactly one such connection. Anything else is closed.
* Every message is framed (8-byte length) so that a peer that sends something unexpected ends
  the session with an error instead of desynchronising it.

:class:`LinkCommunicator` implements the collectives CrypTen 0.4.1 calls for two parties
(send/recv, isend/irecv, broadcast, reduce, all_reduce, gather, all_gather, barrier and the
object variants) as point-to-point messages on the link: for a symmetric exchange rank 0 sends
first and rank 1 receives first, so no pair of blocking sends can deadlock. CrypTen is pointed
at it by :func:`xrayfed.common.mpc.compat.use_link_communicator`.
"""

from __future__ import annotations

import hmac
import json
import pickle
import socket
import ssl
import struct
import time

import torch

from xrayfed.common.protocol.inference import CRYPTO_PROVIDER_NAME

HELLO_MAX = 1024
ROLE_NAME = CRYPTO_PROVIDER_NAME  # the TLS name the crypto provider's party must present


class LinkError(RuntimeError):
    pass


class Link:
    """A framed byte stream to the other computing party (TLS, or plain TCP with ``--insecure``)."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self.sock = sock
        self.sock.settimeout(timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sent = 0
        self.received = 0
        self.messages = 0

    # -- raw
    def _send(self, data) -> None:
        self.sock.sendall(data)
        self.sent += len(data) if not isinstance(data, memoryview) else data.nbytes

    def _recv_into(self, view: memoryview) -> None:
        got, n = 0, view.nbytes
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise LinkError("the other party closed the MPC link")
            got += k
        self.received += n

    def send_bytes(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._send(struct.pack("<Q", view.nbytes))
        if view.nbytes:
            self._send(view)
        self.messages += 1

    def _recv_length(self) -> int:
        hdr = bytearray(8)
        self._recv_into(memoryview(hdr))
        return struct.unpack("<Q", hdr)[0]

    def recv_bytes(self, limit: int = 1 << 30) -> bytes:
        n = self._recv_length()
        if n > limit:
            raise LinkError(f"MPC message of {n} bytes exceeds the limit of {limit}")
        buf = bytearray(n)
        if n:
            self._recv_into(memoryview(buf))
        return bytes(buf)

    # -- tensors (the receiver always knows the shape)
    def send_tensor(self, t: torch.Tensor) -> None:
        self.send_bytes(memoryview(t.detach().contiguous().numpy()).cast("B"))

    def recv_tensor_into(self, t: torch.Tensor) -> torch.Tensor:
        n = self._recv_length()
        if not t.is_contiguous():
            raise LinkError("receive buffer must be contiguous")
        if n != t.numel() * t.element_size():
            raise LinkError(f"MPC message of {n} bytes where {t.numel() * t.element_size()} were expected "
                            "(the parties are out of step)")
        if n:
            self._recv_into(memoryview(t.numpy()).cast("B"))
        return t

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------- establishing the link
def server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    return ctx


def client_context(ca: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if ca:
        ctx.load_verify_locations(cafile=ca)
    else:
        ctx.load_default_certs()
    return ctx


def listen(host: str) -> socket.socket:
    """A listening TCP socket on ``host`` (port chosen by the OS)."""
    info = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    s = socket.socket(info[0], socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(info[4])
    s.listen(8)
    return s


def accept_hospital(lsock: socket.socket, key: bytes, deadline: float, *, tls: ssl.SSLContext | None,
                    timeout_s: float) -> Link:
    """Crypto provider side: accept connections until one proves the session's hospital key
    (inside TLS); wrong or slow ones are closed. Raises :class:`LinkError` at ``deadline``."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LinkError("the hospital's party did not connect in time")
        lsock.settimeout(remaining)
        try:
            raw, _ = lsock.accept()
        except socket.timeout:
            raise LinkError("the hospital's party did not connect in time") from None
        try:
            raw.settimeout(min(10.0, max(0.1, remaining)))
            conn = tls.wrap_socket(raw, server_side=True) if tls is not None else raw
            link = Link(conn, min(10.0, max(0.1, remaining)))
            hello = json.loads(link.recv_bytes(limit=HELLO_MAX).decode())
            got = hello.get("key", "") if isinstance(hello, dict) else ""
            if not (isinstance(got, str) and hmac.compare_digest(got.encode(), key)):
                link.send_bytes(b'{"ok":false}')
                link.close()
                continue
            link.send_bytes(b'{"ok":true}')
            link.sock.settimeout(timeout_s)
            return link
        except (OSError, ValueError, LinkError, ssl.SSLError):
            try:
                raw.close()
            except OSError:
                pass
            continue


def connect_provider(host: str, port: int, key: bytes, *, tls: ssl.SSLContext | None, server_name: str | None,
                     timeout_s: float) -> Link:
    """Hospital side: connect to the crypto provider's party, verify its certificate (TLS), and
    prove the session's hospital key."""
    raw = socket.create_connection((host, port), timeout=min(timeout_s, 30.0))
    try:
        sock = tls.wrap_socket(raw, server_hostname=server_name or host) if tls is not None else raw
    except (OSError, ssl.SSLError) as e:
        raw.close()
        raise LinkError(f"TLS to the crypto provider's party failed ({type(e).__name__})") from None
    link = Link(sock, timeout_s)
    link.send_bytes(json.dumps({"key": key.decode()}).encode())
    reply = json.loads(link.recv_bytes(limit=HELLO_MAX).decode())
    if not reply.get("ok"):
        link.close()
        raise LinkError("the crypto provider's party refused the hospital key")
    return link


# --------------------------------------------------------------------------- CrypTen communicator
class _Done:
    def wait(self):
        return None

    def is_completed(self):
        return True


class _PendingRecv:
    def __init__(self, link: Link, tensor: torch.Tensor) -> None:
        self.link, self.tensor, self.done = link, tensor, False

    def wait(self):
        if not self.done:
            self.link.recv_tensor_into(self.tensor)
            self.done = True

    def is_completed(self):
        return self.done


def _combine(a: torch.Tensor, b: torch.Tensor, op) -> torch.Tensor:
    import torch.distributed as dist

    if op is None or op == dist.ReduceOp.SUM:
        return a + b
    if op == dist.ReduceOp.BXOR:
        return a ^ b
    raise LinkError(f"reduce op {op} is not supported on the MPC link")


def make_link_communicator(rank: int, link: Link):
    """A CrypTen ``Communicator`` for two parties over ``link`` (``rank`` 0 or 1)."""
    from crypten.common import serial
    from crypten.communicator.communicator import Communicator, _logging

    class LinkCommunicator(Communicator):
        BYTES_PER_ELEMENT = 8

        def __init__(self) -> None:
            self.rank, self.world_size, self.link = rank, 2, link
            self.peer = 1 - rank
            self.main_group = self.ttp_group = self.ttp_comm_group = None
            self.ttp_initialized = False
            self._name = f"rank{rank}"
            self.reset_communication_stats()

        # -- helpers
        def _exchange(self, t: torch.Tensor) -> torch.Tensor:
            """Send ``t`` and receive the peer's tensor of the same shape (rank 0 sends first)."""
            t = t.detach().contiguous()
            other = torch.empty_like(t)
            if self.rank == 0:
                self.link.send_tensor(t)
                self.link.recv_tensor_into(other)
            else:
                self.link.recv_tensor_into(other)
                self.link.send_tensor(t)
            return other

        def _exchange_list(self, ts: list) -> list:
            flat = torch.cat([t.detach().reshape(-1).to(torch.long) for t in ts]) if ts else torch.zeros(0)
            other = self._exchange(flat)
            out, i = [], 0
            for t in ts:
                n = t.numel()
                out.append(other[i:i + n].reshape(t.shape).to(t.dtype))
                i += n
            return out

        # -- the Communicator API CrypTen uses
        @_logging
        def send(self, tensor, dst):
            self.link.send_tensor(tensor)

        @_logging
        def recv(self, tensor, src=None):
            result = tensor.clone().contiguous()
            return self.link.recv_tensor_into(result)

        @_logging
        def isend(self, tensor, dst):
            self.link.send_tensor(tensor)
            return _Done()

        @_logging
        def irecv(self, tensor, src=None):
            return _PendingRecv(self.link, tensor)

        @_logging
        def reduce(self, input, dst, op=None, batched=False):
            if batched:
                if self.rank == dst:
                    other = [self.recv(x, self.peer) for x in input]
                    return [_combine(x, o, op) for x, o in zip(input, other)]
                for x in input:
                    self.link.send_tensor(x)
                return None
            if self.rank == dst:
                return _combine(input, self.recv(input, self.peer), op)
            self.link.send_tensor(input)
            return None

        @_logging
        def all_reduce(self, input, op=None, batched=False):
            if batched:
                return [_combine(x, o, op) for x, o in zip(input, self._exchange_list(input))]
            return _combine(input, self._exchange(input), op)

        @_logging
        def gather(self, tensor, dst):
            if self.rank == dst:
                other = self.recv(tensor, self.peer)
                return [tensor, other] if self.rank == 0 else [other, tensor]
            self.link.send_tensor(tensor)
            return [None]

        @_logging
        def all_gather(self, tensor):
            other = self._exchange(tensor)
            return [tensor, other] if self.rank == 0 else [other, tensor]

        @_logging
        def broadcast(self, input, src, group=None, batched=False):
            items = input if batched else [input]
            for x in items:
                if self.rank == src:
                    self.link.send_tensor(x)
                else:
                    self.link.recv_tensor_into(x.data)
            return input

        @_logging
        def barrier(self):
            self._exchange(torch.zeros(1, dtype=torch.long))

        @_logging
        def send_obj(self, obj, dst, group=None):
            self.link.send_bytes(pickle.dumps(obj))

        @_logging
        def recv_obj(self, src, group=None):
            return serial.restricted_loads(self.link.recv_bytes())

        @_logging
        def broadcast_obj(self, obj, src, group=None):
            if self.rank == src:
                self.link.send_bytes(pickle.dumps(obj))
                return obj
            return serial.restricted_loads(self.link.recv_bytes())

        @_logging
        def scatter(self, scatter_list, src, size=None, async_op=False):
            raise LinkError("scatter is only used by CrypTen's TFP provider, which xrayfed never runs")

        def get_world_size(self):
            return self.world_size

        def get_rank(self):
            return self.rank

        def get_ttp_rank(self):
            return self.world_size

        def set_name(self, name):
            self._name = name

        def get_name(self):
            return self._name

    return LinkCommunicator()
