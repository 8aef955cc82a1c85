"""CrypTen compatibility and the three MPC parties of an encrypted prediction — ONE module.

Every CrypTen workaround of this project lives here (tested by ``tests/test_mpc_compat.py``):

1. **Import shim.** CrypTen 0.4.1 imports ``torch.onnx._internal.registration``, which torch
   2.14 moved to ``torch.onnx._internal.torchscript_exporter.registration``; the old name is
   aliased in ``sys.modules`` before ``import crypten`` (:func:`import_crypten`).
2. **Model building.** ``crypten.nn.from_pytorch`` (ONNX export route) is broken on torch
   2.14; the encrypted model is built from ``crypten.nn`` modules by walking the same
   :func:`xrayfed.common.model.layer_plan` that builds the plaintext ``torch.nn`` model, inside
   ``crypten.nn.Sequential`` (module names ``0, 1, ...`` → state-dict keys identical to torch's)
   (:func:`build_crypten_model`). Weights are loaded with ``load_state_dict(strict=False)``
   (CrypTen's strict mode wants torch-internal metadata) after the key/shape check of
   :func:`xrayfed.common.checkpoint.load_weights`, and then every tensor is compared with the
   checkpoint, so a silently skipped key is impossible (:func:`load_crypten_weights`).
3. **Trusted third party, never "trusted first party".** CrypTen's default provider ``TFP``
   lets party 0 (here: the hospital) generate the Beaver triples itself and therefore open the
   patient's masked values. Every process sets ``crypten.cfg.mpc.provider = "TTP"`` before
   initialising, and :func:`assert_ttp_provider` refuses to run otherwise.
4. **TTP seeds from the OS CSPRNG.** CrypTen's ``TTPServer`` draws the per-party seeds with
   ``torch.randint`` from torch's *default generator*. Every worker forked from our warm zygote
   inherits the zygote's generator state, so every session's TTP would deal the *same* seeds —
   a party that learned them once (e.g. from an earlier session) would know every share of
   every triple. ``SecureTTPServer`` (:func:`_secure_ttp_class`) draws them from
   ``os.urandom``; every worker also reseeds torch (:func:`_fresh_process_randomness`).
5. **Rendezvous.** CrypTen reads ``RENDEZVOUS/WORLD_SIZE/RANK/DISTRIBUTED_BACKEND`` from the
   environment and calls ``torch.distributed.init_process_group(init_method=...)`` itself.
   :func:`party_session` instead hands it an explicit ``TCPStore`` (hosted by the hospital's
   party, bound to the MPC address only, on a port the OS picks), wrapped in a ``PrefixStore``
   keyed by the secret session id, and a session timeout for every gloo group; gloo is bound to
   the network interface that routes to the rendezvous host (``GLOO_SOCKET_IFNAME``), so in a
   deployment the MPC traffic uses the protected tunnel interface (see docs).

Parties (CrypTen ranks): ``0`` = the hospital's inference service (model owner; hosts the
rendezvous store; sends ``terminate`` to the TTP at the end), ``1`` = the patient (scan owner;
the only party that receives the logits: ``get_plain_text(dst=1)``), ``2`` = the crypto
provider's TTP (CrypTen's convention: the TTP is rank ``WORLD_SIZE``).

Protocol of one session (every party runs the same sequence):
``init`` → both build the encrypted model from the architecture; the hospital loads the
checkpoint and ``encrypt(src=0)`` secret-shares the weights (the patient's module only ever
holds shares) → ``cryptensor(scan, src=1)`` secret-shares the scan (the hospital only holds a
pseudo-random share) → encrypted forward pass → logits revealed to rank 1 only → the patient
applies sigmoid/softmax in plaintext (:func:`xrayfed.common.prediction.probabilities`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

MODEL_OWNER_RANK = 0  # the hospital's inference service
PATIENT_RANK = 1  # holds the scan; the only party that learns the logits
WORLD_SIZE = 2  # computing parties
TTP_RANK = WORLD_SIZE  # CrypTen's TTP is the extra rank WORLD_SIZE
PROVIDER = "TTP"
CRYPTEN_VERSION = "0.4.1"

_OLD_REGISTRATION = "torch.onnx._internal.registration"
_NEW_REGISTRATION = "torch.onnx._internal.torchscript_exporter.registration"


# --------------------------------------------------------------------------- 1. import shim
def import_crypten():
    """Import CrypTen 0.4.1 on torch 2.14 (alias the moved ONNX module), with the TTP provider.

    Returns the ``crypten`` module. Safe to call many times.
    """
    if "crypten" not in sys.modules and _OLD_REGISTRATION not in sys.modules:
        try:
            sys.modules[_OLD_REGISTRATION] = importlib.import_module(_NEW_REGISTRATION)
        except ImportError:  # an older torch that still has the original module
            pass
    with warnings_quiet():
        import crypten  # noqa: WPS433 (import inside the shim on purpose)
    if getattr(crypten, "__version__", None) != CRYPTEN_VERSION:
        log.warning("CrypTen %s found; xrayfed is tested with %s", crypten.__version__, CRYPTEN_VERSION)
    use_ttp_provider(crypten)
    return crypten


@contextlib.contextmanager
def warnings_quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------- 3. TTP provider
def use_ttp_provider(crypten=None) -> None:
    """Select CrypTen's trusted-third-party provider (must happen before ``crypten.init``)."""
    crypten = crypten or sys.modules["crypten"]
    crypten.cfg.mpc.provider = PROVIDER


def assert_ttp_provider() -> None:
    """Refuse to run MPC with any provider but the TTP (``TFP`` lets party 0 open everything)."""
    import crypten

    name = crypten.cfg.mpc.provider
    provider = crypten.mpc.get_default_provider()
    if name != PROVIDER or getattr(provider, "NAME", None) != PROVIDER or not crypten.mpc.ttp_required():
        raise RuntimeError(
            f"CrypTen provider is {name!r}; xrayfed only runs with the trusted third party ('TTP'): "
            "with the default 'TFP' the model owner would generate the randomness and could open the patient's shares"
        )


# --------------------------------------------------------------------------- 2. model building
def _crypten_layer(cnn, kind: str, kw: dict):
    if kind == "avgpool":
        return cnn.AvgPool2d(kw["kernel_size"])
    if kind == "conv":
        return cnn.Conv2d(kw["in_channels"], kw["out_channels"], kw["kernel_size"], padding=kw.get("padding", 0))
    if kind == "relu":
        return cnn.ReLU()
    if kind == "gap":
        return cnn.AdaptiveAvgPool2d(1)
    if kind == "flatten":
        return cnn.Flatten(1)
    if kind == "linear":
        return cnn.Linear(kw["in_features"], kw["out_features"])
    raise ValueError(f"layer kind {kind!r} has no CrypTen implementation")


def build_crypten_model(spec):
    """A plaintext (not yet encrypted) ``crypten.nn.Sequential`` for ``spec``: same layer plan,
    same state-dict keys as :func:`xrayfed.common.model.build_model`. Parameters start at zero."""
    from xrayfed.common.errors import UserError
    from xrayfed.common.model import layer_plan

    if spec.arch != "xraynet":
        raise UserError(
            f"model architecture {spec.arch!r} cannot run under MPC (GroupNorm has no CrypTen implementation); "
            "encrypted inference needs arch 'xraynet'"
        )
    crypten = import_crypten()
    cnn = crypten.nn
    model = cnn.Sequential(*[_crypten_layer(cnn, k, kw) for k, kw in layer_plan(spec)])
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.zero_()
    return model


def load_crypten_weights(cmodel, spec, state_dict: dict, what: str = "checkpoint") -> None:
    """Load a plaintext state dict into a (not yet encrypted) CrypTen model, verified.

    The key/shape check is the same as the plaintext loader's (a clear :class:`UserError` for a
    checkpoint of another architecture); after the load every parameter is compared with the
    checkpoint, so a key that CrypTen silently skipped (``strict=False``) cannot go unnoticed.
    """
    from xrayfed.common.checkpoint import load_weights, strip_prefix
    from xrayfed.common.errors import UserError
    from xrayfed.common.model import build_model

    sd = strip_prefix(state_dict)
    load_weights(build_model(spec), sd, what=what)  # raises UserError on any mismatch
    own = dict(cmodel.state_dict())
    if set(own) != set(sd):
        raise UserError(f"{what}: CrypTen model keys differ from the checkpoint's ({sorted(set(own) ^ set(sd))[:3]})")
    cmodel.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    for name, buf in list(cmodel.named_buffers()):
        if name in sd:  # XrayNet has no buffers today; keep the route for the day it has
            mod_name, _, leaf = name.rpartition(".")
            (cmodel._modules[mod_name] if mod_name else cmodel).set_buffer(leaf, sd[name].clone())
    loaded = dict(cmodel.state_dict())
    for k, v in sd.items():
        if not torch.equal(loaded[k].detach().float(), v.float()):
            raise RuntimeError(f"CrypTen did not load weight {k!r} (compat shim out of date)")


# --------------------------------------------------------------------------- 4. secure TTP
def _fresh_process_randomness() -> None:
    """Reseed torch's default generator from the OS (forked workers share the parent's state)."""
    torch.manual_seed(int.from_bytes(os.urandom(8), "big") >> 1)


def _secure_ttp_class():
    import crypten.communicator as comm
    import torch.distributed as dist
    from crypten.mpc.provider.ttp_provider import TTPServer

    class SecureTTPServer(TTPServer):
        """CrypTen's TTP server with per-party seeds from ``os.urandom`` (see module docstring)."""

        def _setup_generators(self):
            ws = comm.get().get_world_size()
            seeds = [torch.tensor(int.from_bytes(os.urandom(8), "big", signed=True), dtype=torch.long)
                     for _ in range(ws)]
            reqs = [dist.isend(tensor=seeds[i], dst=i, group=self.ttp_group) for i in range(ws)]
            self.generators = [torch.Generator(device="cpu") for _ in range(ws)]
            self.generators_cuda = [None for _ in range(ws)]
            for i in range(ws):
                self.generators[i].manual_seed(int(seeds[i].item()))
                reqs[i].wait()
            self.seeds_sent = len(seeds)
            dist.barrier(group=self.ttp_group)

    return SecureTTPServer


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


def _listen_socket(host: str) -> socket.socket:
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


# --------------------------------------------------------------------------- the parties
def input_shape(spec, image_size: int, batch: int = 1) -> tuple[int, int, int, int]:
    return (int(batch), int(spec.in_channels), int(image_size), int(image_size))


def _encrypted_forward(crypten, cmodel, x_enc):
    cmodel.eval()
    with crypten.no_grad():
        return cmodel(x_enc)


def run_model_owner(params: SessionParams, store, ckpt, *, observe: Callable[[str, Any], None] | None = None,
                    stats: bool = False, on_joined: Callable[[], None] | None = None) -> dict:
    """The hospital's party (rank 0): shares the weights, never sees the scan or the logits.

    ``observe(name, value)`` (tests only) receives what this party holds: its share of the scan.
    ``on_joined()`` is called once every party has joined the session.
    Returns timing/communication statistics (no data).
    """
    t0 = time.perf_counter()
    with party_session(MODEL_OWNER_RANK, params, store, stats=stats) as crypten:
        if on_joined is not None:
            on_joined()
        t_init = time.perf_counter()
        cmodel = build_crypten_model(ckpt.model)
        load_crypten_weights(cmodel, ckpt.model, ckpt.state_dict)
        cmodel.encrypt(src=MODEL_OWNER_RANK)
        x_enc = crypten.cryptensor(torch.zeros(input_shape(ckpt.model, ckpt.image_size, params.batch)),
                                  src=PATIENT_RANK)
        if observe is not None:
            observe("scan_share", x_enc._tensor.share.clone())
        t_mpc = time.perf_counter()
        y = _encrypted_forward(crypten, cmodel, x_enc)
        revealed = y.get_plain_text(dst=PATIENT_RANK)
        if revealed is not None:  # only the patient may ever get the plaintext
            raise RuntimeError("the model owner received the plaintext logits")
        out = {"init_s": t_init - t0, "mpc_s": time.perf_counter() - t_mpc, **comm_stats()}
    out["total_s"] = time.perf_counter() - t0
    return out


def run_patient(params: SessionParams, store, spec, image_size: int, scan: torch.Tensor, *,
                observe: Callable[[str, Any], None] | None = None, stats: bool = False):
    """The patient's party (rank 1): shares the scan, receives the logits. Returns (logits, stats)."""
    shape = input_shape(spec, image_size, params.batch)
    if tuple(scan.shape) != shape:
        raise ValueError(f"scan tensor has shape {tuple(scan.shape)}, the model expects {shape}")
    t0 = time.perf_counter()
    with party_session(PATIENT_RANK, params, store, stats=stats) as crypten:
        t_init = time.perf_counter()
        cmodel = build_crypten_model(spec)  # architecture only: parameters are zeros
        cmodel.encrypt(src=MODEL_OWNER_RANK)  # the weights arrive as shares
        if observe is not None:
            observe("weight_shares", {k: v._tensor.share.clone() for k, v in cmodel.state_dict().items()})
        x_enc = crypten.cryptensor(scan.float(), src=PATIENT_RANK)
        t_mpc = time.perf_counter()
        y = _encrypted_forward(crypten, cmodel, x_enc)
        logits = y.get_plain_text(dst=PATIENT_RANK)
        out = {"init_s": t_init - t0, "mpc_s": time.perf_counter() - t_mpc, **comm_stats()}
    out["total_s"] = time.perf_counter() - t0
    return logits.detach().numpy().reshape(params.batch, -1), out


def run_ttp(params: SessionParams, store, *, stats: bool = False) -> dict:
    """The crypto provider's party (rank 2): deals correlated randomness until rank 0 says stop."""
    t0 = time.perf_counter()
    with party_session(TTP_RANK, params, store, stats=stats):
        server_cls = _secure_ttp_class()
        server = server_cls()  # blocks: serves requests until 'terminate' or a broken connection
    out = {"total_s": time.perf_counter() - t0, **comm_stats()}
    import crypten

    with contextlib.suppress(Exception):
        crypten.uninit()
    out["seeds_from_os"] = bool(getattr(server, "seeds_sent", 0))
    return out


# --------------------------------------------------------------------------- worker processes
def _worker_setup(timeout_s: float) -> None:
    """Per-session worker: own randomness, quiet CrypTen logging, hard deadline."""
    _fresh_process_randomness()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service decides when a session ends
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(max(1, int(timeout_s) + 5))  # even if the service is gone, the worker dies
    logging.getLogger().setLevel(logging.WARNING)  # CrypTen logs every TTP request at INFO


def _observer(path: str | None):
    """Test/benchmark hook: record what a party holds (its shares) to ``path`` (torch.save)."""
    if not path:
        return None, None
    seen: dict = {}

    def observe(name, value):
        seen[name] = value

    def flush():
        torch.save(seen, path)

    return observe, flush


def _one_line(e: BaseException) -> str:
    """One line for the service's log/audit: no data, and the session id (a capability) redacted."""
    import re

    msg = re.sub(r"[0-9a-f]{32}", "<session>", str(e).splitlines()[0] if str(e) else "")[:200]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


@contextlib.contextmanager
def _worker_reports(conn):
    """The envelope of every party process: an exception goes to the service as one line
    (never data), the pipe is closed, and the process ends with ``os._exit`` (no atexit
    handlers of the forked parent run in the child)."""
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - reported as one line, never with data
        with contextlib.suppress(Exception):
            conn.send(("error", _one_line(e)))
    finally:
        with contextlib.suppress(Exception):
            conn.close()
        os._exit(0)


def model_owner_worker(conn, params: dict, ckpt_bytes: bytes, mpc_bind: str, observe_path: str | None = None) -> None:
    """Entry point of a hospital party process (forked from the warm fork server).

    Messages to the service on ``conn``: ``("listening", port)`` once the rendezvous store is
    bound, ``("joined", None)`` once the patient and the TTP are in the session, then
    ``("done", stats)`` or ``("error", one-line message)``. Never data.
    """
    from xrayfed.common.checkpoint import from_bytes

    p = SessionParams(**params)
    _worker_setup(p.timeout_s)
    observe, flush = _observer(observe_path)
    with _worker_reports(conn):
        ckpt = from_bytes(ckpt_bytes, source="checkpoint")
        sock = _listen_socket(mpc_bind)
        p.port = sock.getsockname()[1]
        store = make_store(p, master=True, listen_sock=sock)
        conn.send(("listening", p.port))
        out = run_model_owner(p, store, ckpt, observe=observe, stats=True,
                              on_joined=lambda: conn.send(("joined", None)))
        if flush:
            flush()
        conn.send(("done", out))


def ttp_worker(conn, params: dict) -> None:
    """Entry point of a TTP party process (forked from the TTP service's warm fork server)."""
    p = SessionParams(**params)
    _worker_setup(p.timeout_s)
    with _worker_reports(conn):
        store = make_store(p, master=False)
        conn.send(("connected", None))
        out = run_ttp(p, store, stats=True)
        conn.send(("done", out))


def patient_worker(conn, params: dict, spec_dict: dict, image_size: int, scan, observe_path: str | None = None) -> None:
    """A patient party in a worker process (benchmarks and tests; ``xrayfed predict`` runs it inline).

    Sends ``("done", {"logits": [...], **stats})`` — the logits go to the caller, who *is* the
    patient here.
    """
    from xrayfed.common.model import ModelSpec

    p = SessionParams(**params)
    _worker_setup(p.timeout_s)
    observe, flush = _observer(observe_path)
    with _worker_reports(conn):
        store = make_store(p, master=False)
        x = torch.from_numpy(scan).float() if not isinstance(scan, torch.Tensor) else scan.float()
        logits, out = run_patient(p, store, ModelSpec(**spec_dict), image_size, x, observe=observe, stats=True)
        if flush:
            flush()
        conn.send(("done", {"logits": logits.tolist(), **out}))


def session_tag(session_id: str) -> str:
    """A non-secret handle of a session for logs (the session id itself is a capability)."""
    import hashlib

    return hashlib.sha256(session_id.encode()).hexdigest()[:12]


def run_local_session(pool: "WorkerPool", ckpt, scan: torch.Tensor, *, host: str = "127.0.0.1",
                      timeout_s: float = 120.0, threads: int = 1, observe_dir: str | None = None) -> dict:
    """One encrypted prediction with the three parties as separate local processes (no gRPC).

    For the compatibility test, the share tests and the benchmark. Returns the patient's logits
    (numpy, (1, K)) and each party's statistics; raises RuntimeError if a party fails.
    """
    import secrets

    import numpy as np

    from xrayfed.common.checkpoint import to_bytes

    p = SessionParams(session_id=secrets.token_hex(16), host=host, port=0, timeout_s=timeout_s, threads=threads,
                      batch=int(scan.shape[0]))
    obs = (lambda name: os.path.join(observe_dir, name)) if observe_dir else (lambda name: None)
    deadline = time.monotonic() + timeout_s
    procs = []
    try:
        t0 = time.perf_counter()
        hp, hc = pool.start(model_owner_worker, p.to_dict(), to_bytes(ckpt), host, obs("hospital.pt"))
        procs.append(hp)
        kind, port = wait_message(hc, ("listening",), deadline)
        if kind != "listening":
            raise RuntimeError(f"hospital party: {kind} {port or ''}")
        p.port = port
        tp, tc = pool.start(ttp_worker, p.to_dict())
        procs.append(tp)
        pp, pc = pool.start(patient_worker, p.to_dict(), ckpt.model.model_dump(), int(ckpt.image_size),
                            scan.detach().float().contiguous().numpy(), obs("patient.pt"))
        procs.append(pp)
        results = {}
        for name, conn in (("patient", pc), ("hospital", hc), ("ttp", tc)):
            kind, payload = wait_message(conn, ("done",), deadline)
            if kind != "done":
                raise RuntimeError(f"{name} party: {kind} {payload or ''}")
            results[name] = payload
        results["wall_s"] = time.perf_counter() - t0
        results["logits"] = np.asarray(results["patient"].pop("logits"), dtype=np.float64)
        return results
    finally:
        for proc in procs:
            stop_worker(proc)


class WorkerPool:
    """Warm party processes: a fork server that imported torch + CrypTen once, at start-up.

    ``multiprocessing``'s ``forkserver`` is a zygote: a clean process (exec'd, not forked from
    the gRPC server, so no gRPC threads in it) that pre-imports this module (torch, CrypTen)
    and forks one process per session. Starting a session party then costs a fork (~10 ms),
    not the 2-5 s import. Each worker is killed by the caller on timeout and by its own alarm.
    """

    def __init__(self) -> None:
        import multiprocessing as mp

        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload([__name__])

    def warm(self) -> float:
        """Start the fork server now (before any gRPC thread); returns seconds it took."""
        t0 = time.perf_counter()
        p = self.ctx.Process(target=_noop, daemon=True)
        p.start()
        p.join(120)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Stop the fork server (its session workers are stopped by their owners)."""
        with contextlib.suppress(Exception):
            from multiprocessing import forkserver

            forkserver._forkserver._stop()

    def start(self, target, *args):
        """Start ``target(child_conn, *args)`` in a fresh worker; returns (process, parent_conn)."""
        parent, child = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=target, args=(child, *args), daemon=True)
        proc.start()
        child.close()
        return proc, parent


def _noop() -> None:
    return None


def wait_message(conn, kinds: tuple[str, ...], deadline: float) -> tuple[str, Any]:
    """Next message of ``kinds`` from a worker before ``deadline`` (monotonic).

    Returns ``(kind, payload)``, ``("error", msg)`` if the worker reported one, ``("died", None)``
    if it exited without a word, or ``("timeout", None)``.
    """
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout", None
        try:
            if not conn.poll(min(remaining, 1.0)):
                continue
            kind, payload = conn.recv()
        except (EOFError, OSError):
            return "died", None
        if kind in kinds or kind == "error":
            return kind, payload


def watch_worker(proc, conn, deadline: float, on_end: Callable[[str, Any], None],
                 join_deadline: float | None = None) -> None:
    """Wait (in a thread) for a session worker to finish by ``deadline``; always stop and reap it.

    With ``join_deadline`` the worker must report ``joined`` (every party is in the session) by
    then, or the session is torn down at once (``not_joined``: a slot held by nobody is freed
    early). ``on_end(outcome, payload)`` gets ``ok`` (payload: statistics), ``failed``
    (one-line message), ``died``, ``timeout`` or ``not_joined``.
    """
    kind, payload = "died", None
    try:
        if join_deadline is not None:
            kind, payload = wait_message(conn, ("joined", "done"), min(join_deadline, deadline))
            if kind == "timeout":
                kind = "not_joined"
        if join_deadline is None or kind == "joined":
            kind, payload = wait_message(conn, ("done",), deadline)
    finally:
        stop_worker(proc)
        with contextlib.suppress(Exception):
            conn.close()
        outcome = {"done": "ok", "error": "failed"}.get(kind, kind)
        on_end(outcome, payload)


def stop_worker(proc, grace_s: float = 1.0) -> None:
    """Stop a worker process for good (SIGTERM, then SIGKILL) and reap it."""
    if proc is None:
        return
    with contextlib.suppress(Exception):
        if proc.is_alive():
            proc.terminate()
            proc.join(grace_s)
        if proc.is_alive():
            proc.kill()
        proc.join(5)
    with contextlib.suppress(Exception):
        proc.close()


# Pre-import CrypTen when this module is imported (the fork server's preload does exactly this).
import_crypten()
