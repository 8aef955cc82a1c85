"""The hospital's warm worker: one long-lived process per ``xrayfed client`` that runs every
training and evaluation request of its federation.

Flower starts a fresh ``flwr-clientapp`` process for every message. Without a worker each one
imported torch, built the model, decoded the hospital's scans and set up Opacus again: most of a
round on a CPU hospital. The worker keeps torch, the decoded scans (the per-process caches of
:func:`xrayfed.client.hospital.load_local_data`) and the imported DP engine between rounds; the
per-message ClientApp (torch-free) forwards the request to it and relays its reply.

Privacy: the worker runs exactly the code the ClientApp runs in-process
(:func:`xrayfed.client.hospital.train_round`: the state folder's lock, charge before training,
the released update cached and recorded before the reply), so every invariant is where it was.
Masking under SecAgg+ stays in the ClientApp process (the mod wraps the forwarded call). When
no worker answers (a simulation, the worker not up yet or killed), the ClientApp runs the request
in its own process as before; a worker killed mid-request leaves a charge without a release,
which the in-process retry trains again exactly as charged (the ledger's crash path).

The channel: a unix socket ``STATE/worker/worker.sock`` (folder mode 0700, socket 0600) that
only this hospital's user can open; each request also carries a random secret made for each
start of ``xrayfed client`` (``$XRAYFED_WORKER_SECRET``, passed to the SuperNode and so to its
ClientApps), and the worker checks the peer's user id. Nothing on it leaves the machine.

Wire format: a frame is ``b"XRW1"``, an 8-byte big-endian header length, a JSON header, then
the arrays' bytes back to back (Flower's own ``Array`` serialisation: dtype, shape, stype and
data, so the weights the worker sees are byte-identical to the ones the ClientApp received).
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import secrets
import signal
import socket
import struct
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Where the ClientApp finds its hospital's worker, and the secret it proves itself with.
SOCKET_ENV, SECRET_ENV = "XRAYFED_WORKER_SOCKET", "XRAYFED_WORKER_SECRET"
#: The worker's folder in the hospital's state folder, and its socket there.
WORKER_DIR, SOCKET_NAME = "worker", "worker.sock"
_MAGIC = b"XRW1"
_MAX_HEADER = 1 << 20  # bytes; the header holds a round's config and array descriptions
_MAX_PAYLOAD = 1 << 34  # bytes (16 GiB): far above any model a hospital accepts


class WorkerLost(Exception):
    """The worker accepted a request and went away before it replied (killed, crashed)."""


@contextmanager
def _unix_address(path: Path | str):
    """``path`` as an AF_UNIX address. Such an address holds at most 107 bytes, and a state folder
    may lie deeper: a longer path is reached through a descriptor of its folder instead
    (``/proc/self/fd/N/NAME``, the same socket file), closed after the bind or connect."""
    path = str(path)
    if len(os.fsencode(path)) < 100:
        yield path
        return
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- wire format
def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


def send_frame(sock: socket.socket, header: dict[str, Any], arrays: dict[str, Any] | None = None) -> None:
    """Send ``header`` (JSON) and ``arrays`` (name -> Flower ``Array``) as one frame."""
    arrays = arrays or {}
    header = dict(header, arrays=[[k, a.dtype, list(a.shape), a.stype, len(a.data)] for k, a in arrays.items()])
    head = json.dumps(header).encode()
    sock.sendall(_MAGIC + struct.pack(">Q", len(head)) + head)
    for a in arrays.values():
        sock.sendall(a.data)


def recv_frame(sock: socket.socket, check=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read one frame: ``(header, arrays)``. ``check(header)`` runs before the arrays are read
    (the worker checks the secret there); it raises to refuse the frame."""
    from flwr.app import Array

    if _recv_exact(sock, 4) != _MAGIC:
        raise ConnectionError("not a worker frame")
    (n,) = struct.unpack(">Q", _recv_exact(sock, 8))
    if n > _MAX_HEADER:
        raise ConnectionError("header too large")
    header = json.loads(_recv_exact(sock, n))
    if check is not None:
        check(header)
    described = header.pop("arrays", [])
    if sum(int(d[4]) for d in described) > _MAX_PAYLOAD:
        raise ConnectionError("payload too large")
    arrays = {str(name): Array(dtype=str(dtype), shape=tuple(int(x) for x in shape), stype=str(stype),
                               data=_recv_exact(sock, int(size)))
              for name, dtype, shape, stype, size in described}
    return header, arrays


# --------------------------------------------------------------------------- the ClientApp's side
def forward(op: str, config: dict[str, Any], arrays, env: dict[str, str] | None = None
        ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Run ``op`` (``train`` / ``evaluate``) in this hospital's worker: ``(header, arrays)`` of
    its reply, or None when no worker is configured or none answers (run it in-process then).
    :class:`WorkerLost` when the worker took the request and went away without a reply.
    ``arrays``: the request's ``ArrayRecord``."""
    env = os.environ if env is None else env
    path, secret = env.get(SOCKET_ENV), env.get(SECRET_ENV)
    if not path or not secret:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            with _unix_address(path) as address:
                sock.connect(address)
        except OSError:
            return None  # not started yet, or gone: the caller runs the request itself
        try:
            send_frame(sock, {"op": op, "secret": secret, "config": config}, dict(arrays.items()))
            header, out = recv_frame(sock)
        except (OSError, ConnectionError, ValueError) as e:
            raise WorkerLost(f"the hospital worker went away during the request ({type(e).__name__})") from None
        return header, out
    finally:
        sock.close()


# --------------------------------------------------------------------------- the worker's side
def _peer_uid(conn: socket.socket) -> int | None:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[1]
    except (AttributeError, OSError):  # not Linux: the folder's mode 0700 is the barrier
        return None


def handle(op: str, config: dict[str, Any], arrays: dict[str, Any], config_path: Path
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One forwarded request, in this process: what the ClientApp does in-process."""
    from flwr.app import ArrayRecord

    from xrayfed.client.hospital import hospital_config_from_node
    from xrayfed.client.timing import evaluate_timed, train_timed
    from xrayfed.common.errors import UserError
    from xrayfed.common.security.atrest import load_key

    cfg = hospital_config_from_node({"config": str(config_path)})
    state_dict = ArrayRecord(arrays).to_torch_state_dict()
    try:
        if op == "train":
            reply = train_timed(cfg, config, state_dict, atrest_key=load_key())
            sd = reply.pop("state_dict", None)
            out = dict(ArrayRecord(sd).items()) if sd is not None else {}
            return {"ok": True, "reply": reply}, out
        if op == "evaluate":
            return {"ok": True, "metrics": evaluate_timed(cfg, config, state_dict)}, {}
        if op == "spent":  # `xrayfed client`'s last line, from this hospital's own ledger
            from xrayfed.client.readiness import spent_line
            from xrayfed.common.privacy.ledger import LEDGER_FILE, read_ledger

            state = Path(cfg.hospital.state_dir)
            records = read_ledger(state / LEDGER_FILE, load_key(), key_file=cfg.hospital.ledger_key_file)
            return {"ok": True, "line": spent_line(records, cfg)}, {}
        return {"ok": False, "error": "UnknownRequest"}, {}
    except Exception as e:  # noqa: BLE001 - logged here in full; the ClientApp sends the server its kind only
        what = "a training request" if op == "train" else "an evaluation request"
        log.error("%s could not be handled: %s", what, e, exc_info=not isinstance(e, UserError))
        return {"ok": False, "error": type(e).__name__}, {}


def warm_up(config_path: Path, plan: str | None) -> None:
    """What a process pays once for its first round, paid before the first request instead:

    * the DP plan as ``xrayfed client`` made it at start (``plan``: ``N,UNIT,NUM_SCANS``), so that
      the noise level's search (seconds: Opacus' accountant) is done and cached;
    * one DP-SGD step of a throwaway model on random numbers (:func:`warm_training`).

    Touches no scan, no ledger and no feature cache."""
    from xrayfed.client.dp import plan_dp
    from xrayfed.client.hospital import hospital_config_from_node

    cfg = hospital_config_from_node({"config": str(config_path)})
    if plan:
        n, unit, scans = plan.split(",")
        plan_dp(cfg, int(n), unit, int(scans))
    warm_training(cfg)


def warm_training(cfg) -> None:
    """One DP-SGD step (Opacus, the hospital's optimizer and noise source) of a throwaway model
    on 8 random 16-px images: the first training step of a process imports and sets up torch's
    optimizer and autograd machinery and Opacus' per-sample gradient hooks (seconds, once per
    process). Nothing of it is kept: no scan is read, no ledger written, the feature cache off."""
    import torch

    from xrayfed.client.dp.engine import make_private
    from xrayfed.client.dp.planning import DPPlan
    from xrayfed.common.data import BINARY_NAMES
    from xrayfed.common.model import build_model, default_model, feature_cache
    from xrayfed.common.prediction import TaskSpec
    from xrayfed.common.train import make_optimizer, train_epoch

    task = TaskSpec(kind="binary", class_names=BINARY_NAMES)
    model = build_model(default_model(16))
    data = torch.utils.data.TensorDataset(torch.rand(8, 1, 16, 16) * 2 - 1, torch.randint(0, 2, (8,)).float())
    plan = DPPlan(noise_multiplier=1.0, sample_rate=1.0, steps=1, max_grad_norm=1.0, expected_batch_size=8,
                  num_examples=8, epsilon_budget=1.0, delta=1e-5, max_rounds=1, accountant=cfg.privacy.accountant)
    opt = make_optimizer(model, cfg.training.optimizer, 0.01, cfg.training.momentum)
    dp_model, dp_opt, make_loader = make_private(model, opt, data, plan, secure_rng=cfg.privacy.secure_rng)
    with feature_cache(False):
        train_epoch(dp_model, make_loader(1), dp_opt, task, torch.device("cpu"))
    dp_model.cleanup()


def check_plan(config_path: Path, fd: int) -> str | None:
    """``xrayfed client``'s check of the data and the DP plan (:func:`xrayfed.client.readiness.check_data`),
    run here because this process imports torch anyway; its answer, one JSON object written to
    ``fd`` (then closed): ``{"lines": [...], "plan": "N,UNIT,NUM_SCANS"}``, or ``{"lines": [...],
    "error": one line, "code": exit status}``. Returns the plan's figures, None when refused."""
    from xrayfed.client.hospital import hospital_config_from_node
    from xrayfed.client.readiness import check_data
    from xrayfed.common.errors import UserError

    lines: list[str] = []
    try:
        plan = check_data(hospital_config_from_node({"config": str(config_path)}), say=lines.append)
        answer = {"lines": lines, "plan": f"{plan.num_examples},{plan.unit},{plan.num_scans}"}
    except UserError as e:
        answer = {"lines": lines, "error": str(e), "code": e.exit_code}
    except Exception as e:  # noqa: BLE001 - in full in the hospital's log; `xrayfed client` says one line
        log.error("the check of the data and the privacy plan failed: %s", e, exc_info=True)
        answer = {"lines": lines, "error": f"the check of the data and the privacy plan failed ({type(e).__name__}); "
                                           "the lines above say why", "code": 1}
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(answer))
    return answer.get("plan")


def serve(config_path: Path, sock_path: Path, secret: str, parent_pid: int | None = None,
          warm_plan: str | None = None, check_fd: int | None = None) -> None:
    """Listen on ``sock_path`` and run each request in turn (one at a time, as the SuperNode
    sends them); exits when its parent (``xrayfed client``) is gone. It warms up first
    (:func:`warm_up`; ``warm_plan``: the DP plan's figures), after checking the data and the
    plan when ``check_fd`` is given (:func:`check_plan`: it stops when they cannot be used). The
    socket is bound before torch
    is imported: a ClientApp that connects while the worker still starts waits for it (in the
    listen backlog) instead of training in its own process."""
    sock_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(sock_path.parent, 0o700)
    sock_path.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        with _unix_address(sock_path) as address:
            srv.bind(address)
    finally:
        os.umask(old)
    os.chmod(sock_path, 0o600)
    srv.listen(4)
    srv.settimeout(1.0)
    uid = os.getuid()
    try:
        import xrayfed.client.hospital  # noqa: F401 - torch, the model and the DP engine, once
        import xrayfed.client.timing  # noqa: F401

        if check_fd is not None:
            warm_plan = check_plan(config_path, check_fd)
            if warm_plan is None:
                return
        try:
            warm_up(config_path, warm_plan)
        except Exception as e:  # noqa: BLE001 - only a head start: the round plans (and refuses) itself
            log.debug("warm-up skipped: %s", e)
        while True:
            if parent_pid is not None and os.getppid() != parent_pid:
                return  # `xrayfed client` is gone: so is this hospital's federation
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(None)
                peer = _peer_uid(conn)
                if peer is not None and peer != uid:
                    log.warning("refused a connection to the hospital worker from another user (uid %d)", peer)
                    continue

                def check(header: dict) -> None:
                    if not hmac.compare_digest(str(header.get("secret", "")).encode(), secret.encode()):
                        raise PermissionError("wrong secret")

                try:
                    header, arrays = recv_frame(conn, check)
                except PermissionError:
                    log.warning("refused a request to the hospital worker without this start's secret")
                    continue
                except (OSError, ConnectionError, ValueError):
                    continue
                out_header, out_arrays = handle(str(header.get("op")), dict(header.get("config") or {}), arrays,
                                                config_path)
                try:
                    send_frame(conn, out_header, out_arrays)
                except OSError:
                    log.warning("the ClientApp went away before the hospital worker's reply")
    finally:
        srv.close()
        sock_path.unlink(missing_ok=True)


def new_secret() -> str:
    """A fresh secret for one start of ``xrayfed client`` (256 bits, hex)."""
    return secrets.token_hex(32)


def main(argv: list[str] | None = None) -> int:
    from xrayfed.common.logs import configure_logging

    ap = argparse.ArgumentParser(prog="python -m xrayfed.client.worker", description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, required=True, help="the hospital's resolved config")
    ap.add_argument("--socket", type=Path, required=True)
    ap.add_argument("--parent-pid", type=int, default=None)
    ap.add_argument("--warm-plan", default=None, help="N,UNIT,NUM_SCANS of the hospital's DP plan (see warm_up)")
    ap.add_argument("--check-fd", type=int, default=None,
                    help="check the data and the DP plan first and answer on this file descriptor (see check_plan)")
    args = ap.parse_args(argv)
    configure_logging()
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        print(f"xrayfed: error: the hospital worker needs ${SECRET_ENV}", file=sys.stderr)
        return 2
    def stop(*_) -> None:  # once: a second SIGTERM during the interpreter's shutdown prints nothing
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    from xrayfed.common.flower_launch import run_without_teardown

    # Stopped (SIGTERM, or `xrayfed client` gone) with everything durable written: no teardown of torch's modules.
    run_without_teardown(lambda: serve(args.config, args.socket, secret, args.parent_pid, args.warm_plan,
                                       args.check_fd))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
