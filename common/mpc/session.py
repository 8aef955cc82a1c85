"""One MPC session's rendezvous: the ranks, the session parameters, the TCP store hosted by the
model owner (bound to the MPC address, keyed by the secret session id), and a CrypTen party's
life inside it (:func:`party_session`)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import socket
from dataclasses import asdict, dataclass

import torch

from xrayfed.common.mpc.compat import assert_ttp_provider, import_crypten, use_ttp_provider

log = logging.getLogger(__name__)

MODEL_OWNER_RANK = 0  # the hospital's inference service
PATIENT_RANK = 1  # holds the scan; the only party that learns the logits
WORLD_SIZE = 2  # computing parties
TTP_RANK = WORLD_SIZE  # CrypTen's TTP is the extra rank WORLD_SIZE


# --------------------------------------------------------------------------- 5. rendezvous
@dataclass
class SessionParams:
    """Where and how one MPC session meets. ``session_id`` is secret (a TLS-protected capability)."""

    session_id: str
    host: str  # rendezvous host (the hospital's MPC address)
    port: int  # rendezvous port (0: the hospital's party lets the OS pick)
    timeout_s: float = 120.0
    threads: int = 1  # torch intra-op threads per party
    batch: int = 1  # scans per session (the service: always 1; the benchmark may batch)

    def to_dict(self) -> dict:
        return asdict(self)


def local_interface_for(peer_host: str) -> tuple[str | None, str | None]:
    """(interface name, local IP) the kernel routes to ``peer_host`` through (no packet sent)."""
    import psutil

    try:
        info = socket.getaddrinfo(peer_host, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(info[0], socket.SOCK_DGRAM) as s:
            s.connect(info[4])
            local_ip = s.getsockname()[0]
    except OSError:
        return None, None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == local_ip for a in addrs):
            return name, local_ip
    return None, local_ip


def listen_socket(host: str) -> socket.socket:
    info = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    s = socket.socket(info[0], socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(info[4])
    s.listen(64)
    s.set_inheritable(True)
    return s


def make_store(params: SessionParams, master: bool, listen_sock: socket.socket | None = None):
    """The session's rendezvous: a ``TCPStore`` (hosted by the hospital) under a secret prefix."""
    import torch.distributed as dist

    timeout = _dt.timedelta(seconds=params.timeout_s)
    if master:
        store = dist.TCPStore(params.host, params.port, None, True, timeout, wait_for_workers=False,
                              master_listen_fd=listen_sock.fileno() if listen_sock is not None else None)
    else:
        store = dist.TCPStore(params.host, params.port, None, False, timeout)
    return dist.PrefixStore(f"xrayfed/{params.session_id}/", store)


@contextlib.contextmanager
def _explicit_rendezvous(store, timeout: _dt.timedelta):
    """Make CrypTen's ``init_process_group``/``new_group`` calls use our store and timeout."""
    import torch.distributed as dist

    orig_init, orig_new = dist.init_process_group, dist.new_group

    def init_process_group(backend=None, init_method=None, world_size=-1, rank=-1, **kw):
        kw.pop("store", None)
        kw.pop("timeout", None)
        return orig_init(backend=backend, store=store, world_size=world_size, rank=rank, timeout=timeout, **kw)

    def new_group(ranks=None, timeout=None, *a, **kw):
        return orig_new(ranks, timeout or timeout_default, *a, **kw)

    timeout_default = timeout
    dist.init_process_group, dist.new_group = init_process_group, new_group
    try:
        yield
    finally:
        dist.init_process_group, dist.new_group = orig_init, orig_new


@contextlib.contextmanager
def party_session(rank: int, params: SessionParams, store, *, stats: bool = False):
    """Initialise CrypTen as ``rank`` of this session (TTP provider asserted); always uninit."""
    crypten = import_crypten()
    torch.set_num_threads(max(1, int(params.threads)))
    ifname, _ = local_interface_for(params.host)
    if ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
    os.environ.update({"DISTRIBUTED_BACKEND": "gloo", "RENDEZVOUS": "env://", "WORLD_SIZE": str(WORLD_SIZE),
                       "RANK": str(rank)})
    use_ttp_provider(crypten)
    crypten.cfg.communicator.verbose = bool(stats)
    assert_ttp_provider()
    with _explicit_rendezvous(store, _dt.timedelta(seconds=params.timeout_s)):
        if rank == TTP_RANK:
            yield crypten  # the TTP server initialises CrypTen itself (inside this context)
            return
        crypten.init()
    try:
        assert_ttp_provider()
        yield crypten
    finally:
        with contextlib.suppress(Exception):
            crypten.uninit()


def comm_stats() -> dict:
    import crypten.communicator as comm

    with contextlib.suppress(Exception):
        s = comm.get().get_communication_stats()
        return {"rounds": int(s["rounds"]), "bytes": int(s["bytes"]), "comm_time_s": float(s["time"])}
    return {}


