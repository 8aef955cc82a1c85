"""The two computing parties of an encrypted prediction (the hospital's model owner, rank 0, and
the crypto provider, rank 1) and the worker processes that run them (one per session, forked
from the warm pool). The third party, the patient, runs :mod:`xrayfed.common.mpc.dealer`
(numpy only); :func:`run_local_session` plays it in-process for tests and benchmarks."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import signal
import time
from typing import Any, Callable

import numpy as np
import torch

from xrayfed.common.mpc import channel, dealer
from xrayfed.common.mpc.compat import (
    build_crypten_model,
    fresh_process_randomness,
    import_crypten,
    load_crypten_weights,
    provider,
    use_link_communicator,
)
from xrayfed.common.mpc.pool import WorkerPool, stop_worker, wait_message
from xrayfed.common.mpc.session import MODEL_OWNER_RANK, PROVIDER_RANK, SessionParams, comm_stats
from xrayfed.common.modelspec import SCATTER_J, SCATTER_L, ModelSpec
from xrayfed.common.scatter import n_features

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the parties
def front_of(spec) -> dict:
    """The model's public first layer as the inference service announces it (``ModelInfo.mpc``):
    ``input_pool`` and ``scattering`` (``[J, L]`` for a ScatterNet model, else ``None``)."""
    return {"input_pool": int(spec.input_pool),
            "scattering": [SCATTER_J, SCATTER_L] if spec.scattering else None}


def shared_input_shape(spec, image_size: int, batch: int = 1) -> tuple[int, int, int, int]:
    """Shape of what the patient shares: the scan after the model's public first layer (input
    pool, and the scattering transform for a ScatterNet model), which the patient applies in
    plaintext (:func:`xrayfed.common.mpc.dealer.public_front`)."""
    k = max(1, int(spec.input_pool))
    c, s = int(spec.in_channels), int(image_size) // k
    if spec.scattering:
        c, s = c * n_features(SCATTER_J, SCATTER_L), -(-s // 2**SCATTER_J)
    return (int(batch), c, s, s)


def _encrypted_forward(crypten, cmodel, x_enc):
    cmodel.eval()
    with crypten.no_grad():
        return cmodel(x_enc)


class _RecordingLink(channel.Link):
    """A link to nobody: sends are dropped, receives are zeros (records a tape in one process)."""

    def __init__(self) -> None:
        self.sent = self.received = self.messages = 0

    def send_bytes(self, data) -> None:
        pass

    def send_tensor(self, t) -> None:
        pass

    def recv_tensor_into(self, t):
        t.zero_()
        return t

    def recv_bytes(self, limit: int = 0) -> bytes:
        raise channel.LinkError("a recording link has no peer objects")

    def close(self) -> None:
        pass


def record_tape(spec, image_size: int, batch: int = 1) -> list[dict]:
    """The correlated-randomness requests of one encrypted forward pass of ``spec`` (public:
    shapes and products only). Computed in this process with a peerless link; every session's
    parties check their requests against it."""
    import_crypten()
    comm = channel.make_link_communicator(MODEL_OWNER_RANK, _RecordingLink())
    with use_link_communicator(comm) as crypten:
        prov = provider()
        tape = prov.record()
        try:
            cmodel = build_crypten_model(spec, pooled_input=True)
            cmodel.encrypt(src=MODEL_OWNER_RANK)
            x = crypten.mpc.MPCTensor.from_shares(torch.zeros(shared_input_shape(spec, image_size, batch),
                                                              dtype=torch.long), precision=dealer.SCALE_BITS)
            _encrypted_forward(crypten, cmodel, x)
        finally:
            prov.reset()
    return tape


def run_party(rank: int, link: channel.Link, spec, image_size: int, tape: list[dict], get_input: Callable[[], dict],
              *, state_dict: dict | None = None, batch: int = 1, threads: int = 1, stats: bool = False,
              observe: Callable[[str, Any], None] | None = None):
    """One computing party of a session over ``link``: rank 0 (hospital, ``state_dict`` given)
    or rank 1 (crypto provider). Returns ``(y_share, stats)``: this party's share of the logits,
    re-randomised with a fresh sharing of zero (so the patient learns the logits and nothing else).

    ``get_input()`` blocks until the patient's contribution arrives: ``{"x": int64 share of the
    pooled scan, "seed": 16 bytes, "corrections": int64 array (rank 1 only)}``.
    ``observe(name, value)`` (tests only) receives what this party holds.
    """
    crypten = import_crypten()
    torch.set_num_threads(max(1, int(threads)))
    crypten.cfg.communicator.verbose = bool(stats)
    t0 = time.perf_counter()
    comm = channel.make_link_communicator(rank, link)
    with use_link_communicator(comm) as crypten:
        prov = provider()
        cmodel = build_crypten_model(spec, pooled_input=True)
        if rank == MODEL_OWNER_RANK:
            load_crypten_weights(cmodel, spec, state_dict)
        cmodel.encrypt(src=MODEL_OWNER_RANK)
        if observe is not None and rank == PROVIDER_RANK:
            observe("weight_shares", {k: v._tensor.share.clone() for k, v in cmodel.state_dict().items()})
        t_ready = time.perf_counter()
        got = get_input()
        t_input = time.perf_counter()
        shape = shared_input_shape(spec, image_size, batch)
        x = np.asarray(got["x"], dtype=np.int64).reshape(shape)
        prov.start(rank, got["seed"], tape, got.get("corrections") if rank == PROVIDER_RANK else None)
        x_enc = crypten.mpc.MPCTensor.from_shares(torch.from_numpy(x.copy()), precision=dealer.SCALE_BITS)
        if observe is not None:
            observe("scan_share", x_enc._tensor.share.clone())
        y = _encrypted_forward(crypten, cmodel, x_enc)
        prov.finish()
        zero = crypten.mpc.primitives.ArithmeticSharedTensor.PRZS(y.size())
        y_share = (y._tensor.share + zero.share).numpy().copy()
        out = {"setup_s": t_ready - t0, "mpc_s": time.perf_counter() - t_input, **comm_stats(comm)}
    out["link_bytes_sent"], out["link_bytes_received"] = link.sent, link.received
    out["total_s"] = time.perf_counter() - t0
    return y_share, out


# --------------------------------------------------------------------------- worker processes
def _worker_setup(timeout_s: float) -> None:
    """Per-session worker: own randomness, quiet CrypTen logging, hard deadline."""
    fresh_process_randomness()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service decides when a session ends
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(max(1, int(timeout_s) + 5))  # even if the service is gone, the worker dies
    logging.getLogger().setLevel(logging.WARNING)


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


def _input_from(conn, deadline: float) -> Callable[[], dict]:
    """``get_input`` of a worker: the patient's contribution, forwarded by the service."""

    def get_input() -> dict:
        kind, payload = wait_message(conn, ("input",), deadline)
        if kind != "input":
            raise TimeoutError("the patient's input did not arrive" if kind == "timeout" else f"service: {kind}")
        conn.send(("joined", None))
        return payload

    return get_input


def _run_and_report(conn, rank: int, link: channel.Link, spec, image_size: int, tape: list[dict], p: SessionParams,
                    deadline: float, observe, flush, state_dict: dict | None = None) -> None:
    """A worker's session on an established ``link``: run the party, then send the service
    ``("output", y_share)`` and ``("done", stats)``; the link is always closed."""
    try:
        y, out = run_party(rank, link, spec, image_size, tape, _input_from(conn, deadline), state_dict=state_dict,
                           batch=p.batch, threads=p.threads, stats=True, observe=observe)
    finally:
        link.close()
    conn.send(("output", {"y": dealer.pack(y), "shape": list(y.shape)}))
    if flush:
        flush()
    conn.send(("done", out))


def model_owner_worker(conn, params: dict, ckpt_bytes: bytes, provider_at: tuple[str, int], hospital_key: bytes,
                       tape: list[dict], provider_ca: str | None, insecure: bool = False,
                       observe_path: str | None = None) -> None:
    """Entry point of a hospital party process (rank 0; forked from the warm fork server).

    Connects to the crypto provider's party (TLS, certificate checked against ``provider_ca``, then
    the hospital key), shares the weights, waits for the patient's input (``("input", ...)`` on
    ``conn``), and answers ``("output", y_share)`` then ``("done", stats)``; ``("error", one
    line)`` on failure. Never data but the re-randomised output share, which only the patient
    can use.
    """
    # lazy: the crypto provider's main process loads this module, not the model code (opacus)
    from xrayfed.common.checkpoint import from_bytes

    p = SessionParams(**params)
    _worker_setup(p.timeout_s)
    observe, flush = _observer(observe_path)
    with _worker_reports(conn):
        deadline = time.monotonic() + p.timeout_s
        ckpt = from_bytes(ckpt_bytes, source="checkpoint")
        tls = None if insecure else channel.client_context(provider_ca)
        link = channel.connect_provider(provider_at[0], int(provider_at[1]), hospital_key, tls=tls,
                                        server_name=channel.ROLE_NAME, timeout_s=p.timeout_s)
        _run_and_report(conn, MODEL_OWNER_RANK, link, ckpt.model, ckpt.image_size, tape, p, deadline, observe, flush,
                        state_dict=ckpt.state_dict)


def provider_worker(conn, params: dict, spec_dict: dict, image_size: int, tape: list[dict], hospital_key: bytes,
                    mpc_host: str, cert: str | None, key: str | None, join_timeout_s: float,
                    observe_path: str | None = None) -> None:
    """Entry point of a crypto provider party process (rank 1; forked from its service's warm
    fork server): listens on ``mpc_host`` (``("listening", port)``), accepts the one connection
    that proves the hospital key inside TLS, then runs like the hospital's party."""
    p = SessionParams(**params)
    _worker_setup(p.timeout_s)
    observe, flush = _observer(observe_path)
    with _worker_reports(conn):
        deadline = time.monotonic() + p.timeout_s
        tls = channel.server_context(cert, key) if cert else None
        lsock = channel.listen(mpc_host)
        conn.send(("listening", lsock.getsockname()[1]))
        try:
            link = channel.accept_hospital(lsock, hospital_key, min(deadline, time.monotonic() + join_timeout_s),
                                           tls=tls, timeout_s=p.timeout_s)
        finally:
            lsock.close()
        _run_and_report(conn, PROVIDER_RANK, link, ModelSpec(**spec_dict), image_size, tape, p, deadline, observe,
                        flush)


def session_tag(session_id: str) -> str:
    """A non-secret handle of a session for logs (the session id itself is a capability)."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:12]


def run_local_session(pool: "WorkerPool", ckpt, scan: torch.Tensor, *, host: str = "127.0.0.1",
                      timeout_s: float = 120.0, threads: int = 1, observe_dir: str | None = None,
                      tape: list[dict] | None = None, tls: tuple[str, str, str] | None = None) -> dict:
    """One encrypted prediction with the two computing parties as separate local processes and
    this process as the patient (no gRPC). ``tls = (cert, key, ca)`` protects the party link
    (plain TCP otherwise). For the compatibility test, the share tests and the benchmark.
    Returns the logits (numpy, (B, K)) and each party's statistics; RuntimeError if a party fails.
    """
    # lazy: the crypto provider's main process loads this module, not the model code (opacus)
    from xrayfed.common.checkpoint import to_bytes

    batch = int(scan.shape[0])
    p = SessionParams(session_id=secrets.token_hex(16), timeout_s=timeout_s, threads=threads, batch=batch)
    tape = tape if tape is not None else record_tape(ckpt.model, ckpt.image_size, batch)
    obs = (lambda name: os.path.join(observe_dir, name)) if observe_dir else (lambda name: None)
    deadline = time.monotonic() + timeout_s
    key = secrets.token_hex(16).encode()
    procs = []
    try:
        t0 = time.perf_counter()
        cp, cc = pool.start(provider_worker, p.to_dict(), ckpt.model.model_dump(), int(ckpt.image_size), tape, key,
                            host, tls[0] if tls else None, tls[1] if tls else None, timeout_s, obs("provider.pt"))
        procs.append(cp)
        kind, port = wait_message(cc, ("listening",), deadline)
        if kind != "listening":
            raise RuntimeError(f"crypto provider party: {kind} {port or ''}")
        hp, hc = pool.start(model_owner_worker, p.to_dict(), to_bytes(ckpt), (host, port), key, tape,
                            tls[2] if tls else None, tls is None, obs("hospital.pt"))
        procs.append(hp)
        t_deal = time.perf_counter()
        to_h, to_c = dealer.contributions(scan.detach().double().numpy(), front_of(ckpt.model), tape)
        deal_s = time.perf_counter() - t_deal
        results: dict = {"patient": {"deal_s": deal_s, "bytes_sent": int(to_h["x"].nbytes + to_c["x"].nbytes
                                                                       + to_c["corrections"].nbytes + 32)}}
        hc.send(("input", to_h))
        cc.send(("input", to_c))
        shares = {}
        for name, conn in (("hospital", hc), ("provider", cc)):
            kind, payload = wait_message(conn, ("output",), deadline)
            if kind != "output":
                raise RuntimeError(f"{name} party: {kind} {payload or ''}")
            shares[name] = dealer.unpack(payload["y"], payload["shape"])
            kind, payload = wait_message(conn, ("done",), deadline)
            if kind != "done":
                raise RuntimeError(f"{name} party: {kind} {payload or ''}")
            results[name] = payload
        results["patient"]["bytes_received"] = int(sum(v.nbytes for v in shares.values()))
        results["wall_s"] = time.perf_counter() - t0
        results["logits"] = dealer.reconstruct(shares["hospital"], shares["provider"]).reshape(batch, -1)
        results["shares"] = shares
        return results
    finally:
        for proc in procs:
            stop_worker(proc)
