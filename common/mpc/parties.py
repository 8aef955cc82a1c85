"""The three parties of an encrypted prediction (model owner, patient, crypto provider) and the
worker processes that run them (one per session, forked from the warm pool)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import Any, Callable

import torch

from xrayfed.common.mpc.compat import (
    build_crypten_model,
    fresh_process_randomness,
    load_crypten_weights,
    secure_ttp_class,
)
from xrayfed.common.mpc.pool import WorkerPool, stop_worker, wait_message
from xrayfed.common.mpc.session import (
    MODEL_OWNER_RANK,
    PATIENT_RANK,
    TTP_RANK,
    SessionParams,
    comm_stats,
    listen_socket,
    make_store,
    party_session,
)

log = logging.getLogger(__name__)


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
        server_cls = secure_ttp_class()
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
    fresh_process_randomness()
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
        sock = listen_socket(mpc_bind)
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


