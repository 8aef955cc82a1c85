"""``xrayfed client``: a hospital joins the federation (Flower SuperNode + xrayfed ClientApp).

The hospital's config (its privacy budget included) and its data path are handed to the
ClientApp through the SuperNode's *node config*, which only the hospital sets. The scans are
read by the ClientApp inside this machine; only DP-trained weights and figures leave.

When the run is over: the server's last message (``query.run_finished``) is recorded by the
ClientApp in the state folder (``FINISHED_FILE``); ``xrayfed client`` sees it, stops its
SuperNode (which leaves the server cleanly) and exits 0 with one line: the rounds the run had
and this hospital's spent budget from its own ledger. A server that stops without finishing
(killed, restarting to resume) sends nothing: the hospital keeps waiting for it, as before.

What it prints: its own ``[xrayfed]`` lines, the ClientApp's ``xrayfed`` log lines and any
error; Flower's lines (and uvicorn's, warnings) only with ``-v``, all of them in
``STATE/supernode.log`` (without colour codes; the previous one kept as ``supernode.log.1``
once it reaches ``SUPERNODE_LOG_MAX_BYTES``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from xrayfed.common.addresses import parse_hostport
from xrayfed.common.config import HospitalConfig, dump_toml, load_config
from xrayfed.common.errors import UserError
from xrayfed.client import worker as hospital_worker
from xrayfed.client.readiness import check_data, spent_line  # noqa: F401 - used here and re-exported
from xrayfed.common.flower_launch import flower_env, supernode_args, supernode_command
from xrayfed.common.logs import FLEET_EXPOSED, LogRelay, strip_ansi, warn_insecure
from xrayfed.common.privacy.ledger import LEDGER_FILE, read_ledger
from xrayfed.common.procs import ProcessGroup, free_port, kill_tree, spawn
from xrayfed.common.security.atrest import ENV_KEY_FILE, load_key

log = logging.getLogger(__name__)


def load_hospital_config(args: argparse.Namespace):
    return load_config(
        HospitalConfig,
        args.config,
        {
            "data.path": str(args.data.resolve()) if args.data else None,
            "hospital.name": args.name,
            "hospital.state_dir": str(args.state_dir.resolve()) if args.state_dir else None,
            "hospital.device": args.device,
            "privacy.epsilon": args.epsilon,
        },
    )


def check_in_worker(cfg, start_worker, worker: list) -> str:
    """:func:`check_data` run by the hospital's worker, which imports torch anyway (this process
    then never does): ``start_worker(fd)`` starts it with the write end of a pipe, on which it
    answers one JSON object (:func:`xrayfed.client.worker.check_plan`) and goes on as the worker.
    Prints the check's lines here; the same one-line :class:`UserError` as in this process when the
    data or the plan cannot be used. Returns the plan's ``N,UNIT,NUM_SCANS``."""
    r, w = os.pipe()
    try:
        start_worker(w)
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as f:
        raw = f.read()
    try:
        answer = json.loads(raw) if raw else {}
    except ValueError:
        answer = {}
    for line in answer.get("lines", []):
        print(str(line), flush=True)
    if "plan" in answer:
        return str(answer["plan"])
    proc = worker[0]
    rc = proc.wait(timeout=60) if proc is not None else None
    if "error" in answer:
        err = UserError(str(answer["error"]))
        err.exit_code = int(answer.get("code", 2))
        raise err
    raise UserError(f"hospital {cfg.hospital.name}: its worker process stopped (exit {rc}) before it had checked "
                    "the data; the lines above say why")


# What flower-supernode prints when the server does not let the hospital in -> our one-line cause.
_REFUSAL_CAUSES = (
    ("CERTIFICATE_VERIFY_FAILED", "the server's TLS certificate is not signed by the CA given with --ca-cert "
                                  "(wrong ca.pem, or not the federation's server)"),
    ("Failed to activate SuperNode", "the server refused this hospital's key (--auth-key): it is not registered, "
                                     "or it was revoked"),
    ("must be registered via the CLI", "the server requires hospital authentication: pass --auth-key with this "
                                       "hospital's registered auth.key"),
    ("401 Unauthorized", "the server refused this hospital's key (it was revoked or unregistered)"),
)
#: flower-supernode's line once the server has admitted it (it then holds a node id).
JOINED = "SuperNode ID:"
#: flower-supernode's line when the server refuses to activate its key. The server says the same
#: for a key it does not know (unregistered, revoked) and for a registered key whose previous
#: connection it still counts as online (the process died less than Flower's heartbeat patience,
#: 2 × 30 s, ago): the hospital tells them apart by its own ``ALIVE_FILE``.
REFUSED = "Failed to activate SuperNode"
#: flower-supernode's last line when it stopped on its own terms: it deactivated its node, or the
#: server no longer knew it (a restarted SuperLink answers 401). Either way the server does not
#: count the old connection as online, so joining again at once is safe. A SuperNode that was
#: killed (SIGKILL, out of memory, power) prints nothing.
GRACEFUL = "SuperNode terminated gracefully"
#: Touched every ``ALIVE_EVERY_S`` in the state folder while this hospital is joined; removed
#: when ``xrayfed client`` is stopped cleanly.
ALIVE_FILE, ALIVE_EVERY_S = "supernode.alive", 10.0
#: How long after the last touch the server may still count a killed SuperNode's connection as
#: online: its last heartbeat (at most ``ALIVE_EVERY_S`` before the last touch) plus Flower's
#: patience (2 heartbeats of 30 s) is 70 s; 10 s more lets the server notice the lapse (its
#: ServerApp polls every 3 s) before this hospital's key becomes active again. Joining inside
#: that window would hand the node id back to a new connection while the server still waits
#: for the dead one's reply: the round would then wait for ``round_timeout_s``.
STILL_ONLINE_S = 80.0
#: A refusal this soon after the last touch may still be the server's view of the old
#: connection (a clock or a loaded server a little late): try again; later, the key is refused.
REFUSED_WINDOW_S = STILL_ONLINE_S + 20.0
#: Seconds between rejoin attempts after the link was lost (then the last value, forever).
REJOIN_BACKOFF_S = (2.0, 5.0, 10.0, 30.0, 60.0)
RETRY_REFUSED_S = 5.0


#: Seconds the pre-flight TLS handshake with the server may take (connect included).
PREFLIGHT_TIMEOUT_S = 10.0


def check_server_certificate(server: str, ca_cert: Path | str, timeout: float = PREFLIGHT_TIMEOUT_S) -> bool:
    """Before the SuperNode starts: one TLS handshake with ``server`` (HOST:PORT), verifying its
    certificate with ``ca_cert`` as Flower's SuperNode will. A certificate this CA does not
    accept (another federation's ca.pem, or a server not signed by it) is one line naming the
    CA file; otherwise the SuperNode would retry for minutes without saying why. Returns False
    when the server cannot be reached now (the SuperNode keeps trying, as before), True when
    the handshake succeeded."""
    host, port = parse_hostport(server, "--server")
    try:
        ctx = ssl.create_default_context(cafile=str(ca_cert))
    except (ssl.SSLError, ValueError) as e:
        raise UserError(f"--ca-cert {ca_cert}: not a PEM CA certificate ({type(e).__name__}); give the "
                        "federation's ca.pem") from None
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host):
                return True
    except ssl.SSLCertVerificationError as e:
        why = e.verify_message or e.reason or "verification failed"
        if "mismatch" in why:
            cause = (f"it is not issued for {host}: connect with a name or address its certificate lists "
                     "(`xrayfed certs init --server-name/--server-ip`)")
        else:
            cause = ("it is not signed by this CA (wrong ca.pem, or not the federation's server): use the "
                     "federation's ca.pem from the server's operator")
        raise UserError(f"--ca-cert {ca_cert}: the TLS certificate of the server at {server} does not verify "
                        f"({why}); {cause}") from None
    except (OSError, ssl.SSLError):
        return False


#: flower-supernode's line each time it cannot reach the server (it keeps trying, with back-off).
UNREACHABLE = "Connection attempt failed"
#: Where the ClientApp records the server's "run finished" message (see the module docstring).
FINISHED_FILE = "run-finished.json"
#: Seconds between two looks at ``FINISHED_FILE`` (and at the SuperNode and the worker): a
#: finished run's SuperNode then leaves while the server is still up to see it go.
POLL_S = 0.2
#: flower-supernode's line once it has sent a reply to the server.
SENT = "Sent successfully"
#: Seconds left at most to the SuperNode, once the run is finished, to send the ClientApp's
#: acknowledgement (it is stopped as soon as it has sent it).
FINISHED_GRACE_S = 15.0
#: Flower's full output for this hospital: ``STATE/supernode.log``, one older file kept.
SUPERNODE_LOG, SUPERNODE_LOG_MAX_BYTES = "supernode.log", 8 * 1024 * 1024


def record_finished(state_dir: Path | str, note) -> Path:
    """Write the server's :class:`~xrayfed.common.protocol.rounds.RunFinished` to
    ``STATE/FINISHED_FILE`` (atomically: ``xrayfed client`` reads it from another process)."""
    path = Path(state_dir) / FINISHED_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"federation": note.federation, "rounds": int(note.rounds),
                               "time": time.time()}), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_finished(state_dir: Path | str) -> dict | None:
    """The recorded "run finished" note (``federation``, ``rounds``), None when there is none."""
    try:
        note = json.loads((Path(state_dir) / FINISHED_FILE).read_text(encoding="utf-8"))
        return {"federation": str(note["federation"]), "rounds": int(note["rounds"]),
                "time": float(note.get("time", 0.0))}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def worker_spent_line(env: dict[str, str]) -> str | None:
    """:func:`spent_line` as the hospital's worker computes it (it has the privacy accountant
    loaded; this process would import torch for it); None when the worker does not answer."""
    try:
        out = hospital_worker.forward("spent", {}, {}, env=env)
    except hospital_worker.WorkerLost:
        return None
    if out is None or not out[0].get("ok"):
        return None
    return str(out[0]["line"])


class _Spent:
    """:func:`worker_spent_line` asked in a thread of its own, from the moment the run is known to
    be finished, while the SuperNode sends its acknowledgement and leaves."""

    def __init__(self, env: dict[str, str]) -> None:
        self._line: list[str | None] = [None]

        def ask() -> None:
            try:
                self._line[0] = worker_spent_line(env)
            except Exception:  # noqa: BLE001 - then computed here, from the ledger, as without a worker
                log.debug("the worker's budget line", exc_info=True)

        self._thread = threading.Thread(target=ask, daemon=True)
        self._thread.start()

    def line(self) -> str | None:
        self._thread.join()
        return self._line[0]


class _FlowerLog:
    """``STATE/supernode.log``: every line of the SuperNode and its ClientApps, colour codes removed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists() and path.stat().st_size > SUPERNODE_LOG_MAX_BYTES:
            os.replace(path, path.with_suffix(".log.1"))
        self.file = path.open("a", encoding="utf-8")
        self.size = path.stat().st_size
        self.lock = threading.Lock()

    def write(self, line: str) -> None:
        line = strip_ansi(line)
        with self.lock:
            if self.file.closed:  # a child's last words after `xrayfed client` stopped
                return
            if self.size > SUPERNODE_LOG_MAX_BYTES:
                self.file.close()
                os.replace(self.path, self.path.with_suffix(".log.1"))
                self.file, self.size = self.path.open("a", encoding="utf-8"), 0
            self.file.write(line)
            self.file.flush()
            self.size += len(line.encode())

    def close(self) -> None:
        with self.lock:
            self.file.close()


def _pump(stream, seen: list[str], relay: LogRelay | None = None, full: _FlowerLog | None = None,
          sent: list[float] | None = None) -> None:
    """Relay the SuperNode's output (see the module docstring); note in ``seen`` the markers
    found, and in ``sent`` when each reply was sent."""
    relay = relay or LogRelay(verbose=True, keep_colours=True)
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        if full is not None:
            full.write(line)
        shown = relay(line)
        if shown is not None:
            sys.stdout.write(shown)
            sys.stdout.flush()
        if sent is not None and SENT in line:
            sent.append(time.time())
        for marker in (*(m for m, _ in _REFUSAL_CAUSES), JOINED, GRACEFUL, UNREACHABLE):
            if marker in line and marker not in seen:
                seen.append(marker)


def lapse_wait(alive_age_s: float | None) -> float:
    """Seconds to wait before activating this hospital's key, so that the server has dropped a
    killed SuperNode's connection first (``STILL_ONLINE_S``); 0 when none can be pending.

    ``alive_age_s``: seconds since ``ALIVE_FILE`` was last touched, None when there is none (never
    joined, or stopped cleanly)."""
    return 0.0 if alive_age_s is None else max(0.0, STILL_ONLINE_S - alive_age_s)


def _age_s(path: Path) -> float | None:
    """Seconds since ``path`` was last touched; None when there is no such file."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def next_attempt(seen: list[str], losses: int, alive_age_s: float | None) -> tuple[str, float] | None:
    """What ``xrayfed client`` does after its SuperNode stopped: ``(why, wait_s)`` to start a new
    SuperNode after ``wait_s``, or None to stop with the SuperNode's cause.

    ``seen``: the markers found in the SuperNode's output; ``losses``: links lost in a row so far;
    ``alive_age_s``: seconds since this hospital was last joined (its ``ALIVE_FILE``), None if never.

    * It had joined and stopped gracefully: the server restarted (a new SuperLink no longer knows
      the node id and answers 401) or dropped the node. Rejoin, with back-off. A revoked hospital
      also lands here once; its next activation is refused, which ends it.
    * It had joined and was killed (no graceful line): the server still counts that connection
      as online for up to ``STILL_ONLINE_S``; rejoin once it has lapsed (:func:`lapse_wait`).
    * Its activation was refused less than ``REFUSED_WINDOW_S`` after this hospital was last
      joined: the server may be a little late dropping the old connection, or (restarted) not
      have registered the keys again yet: try again every ``RETRY_REFUSED_S``.
    * Anything else (a key the server does not know, a wrong CA, no key where one is required): stop.
    """
    if JOINED in seen:
        wait = REJOIN_BACKOFF_S[min(losses, len(REJOIN_BACKOFF_S) - 1)]
        if GRACEFUL in seen:
            return "lost its link to the server (it restarted, or dropped this hospital's connection)", wait
        return ("lost its SuperNode (killed); the server drops that connection within "
                f"{STILL_ONLINE_S:g} s"), max(wait, lapse_wait(alive_age_s))
    if REFUSED in seen and alive_age_s is not None and alive_age_s < REFUSED_WINDOW_S:
        # Every wait for a killed connection's lapse came before this attempt, so this is a server
        # a little late (or one that restarted and has not registered the keys again yet): retry soon.
        return (f"was refused while the server may still count its previous connection as online (joined "
                f"{alive_age_s:.0f} s ago; Flower lets it lapse within {STILL_ONLINE_S:g} s)"), RETRY_REFUSED_S
    return None


def run_client_cmd(args: argparse.Namespace) -> int:
    parse_hostport(args.server, "--server")
    cfg = load_hospital_config(args)
    if not args.insecure and args.ca_cert is None:
        raise UserError("--ca-cert: required with TLS (the federation's ca.pem from `xrayfed certs init`), "
                        "or pass --insecure for a local experiment")
    link_args = supernode_args(superlink=args.server, insecure=args.insecure, root_certificates=args.ca_cert,
                               auth_private_key=args.auth_key)
    key_file = getattr(args, "atrest_key_file", None)
    atrest_key = load_key(key_file)  # a bad key fails here, before joining
    if args.insecure:
        warn_insecure(f"hospital {cfg.hospital.name}", FLEET_EXPOSED)
    elif not check_server_certificate(args.server, args.ca_cert):
        print(f"[xrayfed] hospital {cfg.hospital.name}: the server at {args.server} is not reachable yet; the "
              "SuperNode keeps trying", flush=True)
    state = Path(cfg.hospital.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    resolved = state / "hospital.resolved.toml"
    resolved.write_text(dump_toml(cfg), encoding="utf-8")
    env = flower_env(state / ".flwr")
    if key_file is not None:  # the ClientApp processes (started by the SuperNode) read the key from here
        env[ENV_KEY_FILE] = str(Path(key_file).expanduser().resolve())
    worker_cmd = None
    if cfg.hospital.warm_worker:  # the ClientApps hand their requests to it (see xrayfed.client.worker)
        sock = state / hospital_worker.WORKER_DIR / hospital_worker.SOCKET_NAME
        env[hospital_worker.SOCKET_ENV] = str(sock)
        env[hospital_worker.SECRET_ENV] = hospital_worker.new_secret()
        worker_cmd = [sys.executable, "-m", "xrayfed.client.worker", "--config", str(resolved), "--socket",
                      str(sock), "--parent-pid", str(os.getpid())]
    verbose = bool(getattr(args, "verbose", False))
    relay = LogRelay(verbose=verbose, keep_colours=verbose and sys.stdout.isatty())
    full = _FlowerLog(state / SUPERNODE_LOG)
    ledger_path = state / LEDGER_FILE
    alive = state / ALIVE_FILE
    finished = spent = spent_job = None
    joining = False  # a SuperNode was started: a clean stop then says so in ALIVE_FILE
    with ProcessGroup() as group:
        worker = [None]
        plan_figures = [""]  # N,UNIT,NUM_SCANS of the checked plan: what a restarted worker warms up with

        def start_worker(check_fd: int | None = None) -> None:
            if worker_cmd is None:
                return
            extra = ["--check-fd", str(check_fd)] if check_fd is not None else ["--warm-plan", plan_figures[0]]
            w = group.add(spawn(worker_cmd + extra, env=env, stdout=subprocess.PIPE,
                                pass_fds=() if check_fd is None else (check_fd,)))
            threading.Thread(target=_pump, args=(w.stdout, [], relay, full), daemon=True).start()
            worker[0] = w

        def check_worker() -> None:
            """A worker that stopped (killed, out of memory) is started again; meanwhile the
            ClientApps run their requests in their own processes."""
            w = worker[0]
            if w is not None and w.poll() is not None:
                group.procs.remove(w)
                print(f"[xrayfed] hospital {cfg.hospital.name}: its worker process stopped (exit {w.returncode}); "
                      "starting it again", flush=True)
                start_worker()

        def start_node(gate: int | None = None):
            """A SuperNode (``gate``: it imports Flower, then waits for a byte there before it joins);
            ``(process, its output's pump, markers seen, times replies were sent)``."""
            seen: list[str] = []
            sent: list[float] = []
            extra = [] if gate is None else ["--wait-fd", str(gate)]
            node = group.add(spawn(cmd[:cut] + extra + cmd[cut:], env=env, stdout=subprocess.PIPE,
                                   pass_fds=() if gate is None else (gate,)))
            pump = threading.Thread(target=_pump, args=(node.stdout, seen, relay, full, sent), daemon=True)
            pump.start()
            return node, pump, seen, sent

        port = args.port or free_port()
        launcher = supernode_command(cfg.hospital.poll_interval_s, cfg.hospital.fork_clientapps)
        cmd, cut = [*launcher, *link_args, "--port", str(port), "--node-config", f'config="{resolved}"'], len(launcher)
        gate = None
        try:
            if worker_cmd is None:
                plan = check_data(cfg)
                plan_figures[0] = f"{plan.num_examples},{plan.unit},{plan.num_scans}"
            else:  # the worker imports torch anyway: it checks the data and the plan, this process stays torch-free
                # The SuperNode imports Flower meanwhile; it joins only once the check has passed.
                gate_r, gate = os.pipe()
                try:
                    first = start_node(gate_r)
                finally:
                    os.close(gate_r)
                plan_figures[0] = check_in_worker(cfg, start_worker, worker)
            (state / FINISHED_FILE).unlink(missing_ok=True)  # a previous run's end: this process waits for a new one
            # Fail before joining when the privacy ledger cannot be read (wrong/missing at-rest key or
            # ledger key, broken chain, cut short): one line naming the file, never a budget silently
            # starting from zero.
            read_ledger(ledger_path, atrest_key, key_file=cfg.hospital.ledger_key_file)
            print(f"[xrayfed] hospital {cfg.hospital.name} joining {args.server}; privacy ledger: "
                  f"{ledger_path}"
                  + (f" (encrypted at rest, key id {atrest_key.key_id.hex()})" if atrest_key is not None else "")
                  + ("; only secure-aggregation (SecAgg+) training requests are accepted"
                     if cfg.hospital.require_secure_aggregation else ""), flush=True)
            losses = 0
            wait = lapse_wait(_age_s(alive))
            if wait > 0:  # the previous `xrayfed client` was killed while joined: let the server drop it first
                print(f"[xrayfed] hospital {cfg.hospital.name} was joined until {STILL_ONLINE_S - wait:.0f} s ago "
                      f"and did not leave cleanly; joining in {wait:.0f} s, once the server has dropped that "
                      "connection", flush=True)
                time.sleep(wait)
            while True:
                joining = True
                if gate is not None:  # the SuperNode started during the check: let it join
                    node, pump, seen, sent = first
                    os.write(gate, b"j")
                    os.close(gate)
                    gate = None
                else:
                    node, pump, seen, sent = start_node()
                started = time.monotonic()
                touched = 0.0
                said_unreachable = False
                while True:
                    try:
                        rc = node.wait(timeout=POLL_S)
                        break
                    except subprocess.TimeoutExpired:
                        check_worker()
                        if JOINED in seen and time.monotonic() - touched >= ALIVE_EVERY_S:
                            alive.touch()
                            touched = time.monotonic()
                        if UNREACHABLE in seen and not said_unreachable:
                            said_unreachable = True
                            why = ("does not answer (stopped, or restarting to resume its run)" if JOINED in seen
                                   else "does not answer yet")
                            print(f"[xrayfed] hospital {cfg.hospital.name}: the server at {args.server} {why}; the "
                                  "SuperNode keeps trying" + ("" if verbose else " (-v shows each attempt)"), flush=True)
                        finished = read_finished(state)
                        if finished is not None:  # let the acknowledgement leave through the SuperNode first
                            if worker_cmd is not None:  # the worker reads the budget meanwhile
                                spent_job = _Spent(env)
                            until = time.monotonic() + FINISHED_GRACE_S
                            while time.monotonic() < until and not any(t >= finished["time"] for t in sent):
                                time.sleep(0.2)
                            time.sleep(0.5)
                            break
                finished = finished or read_finished(state)
                group.procs.remove(node)
                kill_tree(node)  # its SuperExec and any ClientApp it started (SIGTERM: it leaves cleanly)
                pump.join(timeout=5)
                if finished is not None:
                    alive.unlink(missing_ok=True)
                    spent = (spent_job.line() if spent_job is not None
                             else worker_spent_line(env) if worker_cmd is not None else None)
                    break
                if JOINED in seen:
                    alive.touch()
                    losses = 0 if time.monotonic() - started > 600 else losses
                age = _age_s(alive)
                again = next_attempt(seen, losses, age)
                if again is None:
                    break
                why, wait = again
                losses += JOINED in seen
                print(f"[xrayfed] hospital {cfg.hospital.name} {why}; joining {args.server} again in {wait:g} s "
                      "(the privacy ledger decides what a repeated round may release)", flush=True)
                time.sleep(wait)
        except KeyboardInterrupt:  # stopped cleanly: the SuperNode deactivates its node on SIGTERM
            if joining:
                alive.unlink(missing_ok=True)
            raise
        finally:
            if gate is not None:  # refused before joining: the waiting SuperNode ends without joining
                os.close(gate)
            full.close()
    if finished is not None:
        if spent is None:  # no worker (or it is gone): the accountant is imported here
            spent = spent_line(read_ledger(ledger_path, atrest_key, key_file=cfg.hospital.ledger_key_file), cfg)
        print(f"[xrayfed] hospital {cfg.hospital.name}: the federation's run {finished['federation']!r} finished "
              f"after {finished['rounds']} round{'' if finished['rounds'] == 1 else 's'}; {spent}. Exiting.", flush=True)
        return 0
    cause = next((c for m, c in _REFUSAL_CAUSES if m in seen),
                 "the SuperNode stopped (see the lines above): the server refused this hospital or the connection "
                 "failed")
    print(f"xrayfed: error: hospital {cfg.hospital.name} could not join {args.server}: {cause}",
          file=sys.stderr, flush=True)
    return rc or 1
