"""The MPC link between the two computing parties (hospital ↔ crypto provider): one TLS
connection, authenticated both ways, and a CrypTen communicator that runs over it.

* **Server authentication**: the crypto provider's party presents its TLS certificate; the
  hospital's party verifies it against the CA it trusts for the crypto provider (``provider_ca``).
* **Client authentication**: the first message inside TLS is the session's hospital key (a
  128-bit secret the hospital's service generated for this session and gave the crypto
  provider over its authenticated ``StartSession`` call); the crypto provider's party compares
  it in constant time and accepts exactly one such connection. Anything else is closed.
  Connections are handshaken concurrently, each within ``PREAUTH_TIMEOUT_S``, so idle ones
  cannot keep the hospital's party out (:func:`accept_hospital`).
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
import sys
import threading
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


#: Seconds a connection to the crypto provider's MPC port has to finish its TLS handshake and
#: prove the session's hospital key; the hospital's party does both in well under a second.
PREAUTH_TIMEOUT_S = 5.0
#: Connections handshaking at once; when one more arrives the oldest is dropped, so idle
#: connections can neither hold the port nor pile up.
MAX_PENDING_HANDSHAKES = 16


def accept_hospital(lsock: socket.socket, key: bytes, deadline: float, *, tls: ssl.SSLContext | None,
                    timeout_s: float) -> Link:
    """Crypto provider side: accept connections until one proves the session's hospital key
    (inside TLS). Handshakes run concurrently, one thread each, at most
    ``MAX_PENDING_HANDSHAKES`` at once (one more connection drops the oldest), each given
    ``PREAUTH_TIMEOUT_S`` in all: idle or slow connections cannot keep the hospital's party out.
    The first connection that proves the key wins; every other one is closed. Raises
    :class:`LinkError` at ``deadline``."""
    lock = threading.Lock()
    # connections still handshaking, oldest first: n -> (a duplicate of its socket, by when it must
    # have proved the key). Shutting the duplicate down wakes the thread blocked on the connection;
    # whoever removes an entry closes its duplicate, so no descriptor is ever shut down twice.
    pending: dict[int, tuple[socket.socket, float]] = {}
    threads: list[threading.Thread] = []
    won: list[Link] = []
    done = threading.Event()
    preauth_s, cap = float(PREAUTH_TIMEOUT_S), max(1, int(MAX_PENDING_HANDSHAKES))

    def release(n: int, drop: bool) -> None:  # with ``lock`` held
        entry = pending.pop(n, None)
        if entry is None:
            return
        if drop:
            try:
                entry[0].shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        entry[0].close()

    def handshake(n: int, raw: socket.socket) -> None:
        link = None
        try:
            raw.settimeout(preauth_s)
            conn = tls.wrap_socket(raw, server_side=True) if tls is not None else raw
            link = Link(conn, preauth_s)
            hello = json.loads(link.recv_bytes(limit=HELLO_MAX).decode())
            got = hello.get("key", "") if isinstance(hello, dict) else ""
            proved = isinstance(got, str) and hmac.compare_digest(got.encode(), key)
            with lock:
                first = proved and n in pending and not won and not done.is_set()
                if first:
                    won.append(link)
                release(n, False)
            if not first:
                link.send_bytes(b'{"ok":false}')
                link.close()
                return
            link.send_bytes(b'{"ok":true}')
            link.sock.settimeout(timeout_s)
            done.set()
        except (OSError, ValueError, LinkError, ssl.SSLError):
            with lock:
                release(n, False)
                if won and won[0] is link:  # the winner could not be answered: keep waiting
                    won.clear()
            (link.sock if link is not None else raw).close()

    n = 0
    try:
        while not done.is_set():
            now = time.monotonic()
            if now >= deadline:
                break
            with lock:
                for k in [k for k, (_, until) in pending.items() if until <= now]:
                    release(k, True)  # too slow to prove the key
            lsock.settimeout(min(0.2, deadline - now))
            try:
                raw, _ = lsock.accept()
            except socket.timeout:
                continue
            n += 1
            try:
                ctl = raw.dup()
            except OSError:
                raw.close()
                continue
            with lock:
                while len(pending) >= cap:
                    release(next(iter(pending)), True)  # the oldest handshake still pending
                pending[n] = (ctl, time.monotonic() + preauth_s)
            threads[:] = [t for t in threads if t.is_alive()]
            t = threading.Thread(target=handshake, args=(n, raw), name="xrayfed-mpc-accept", daemon=True)
            threads.append(t)
            t.start()
    finally:
        with lock:
            done.set()
            for k in list(pending):
                release(k, True)
        for t in threads:
            t.join(timeout=preauth_s + 1)
        if sys.exc_info()[0] is not None:  # the listening socket failed: no session
            for link in won:
                link.close()
    with lock:
        if won:
            return won[0]
    raise LinkError("the hospital's party did not connect in time")


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
