"""Launching Flower 1.41 processes with TLS and SuperNode authentication (checked against real
processes): what both launchers (``xrayfed server`` / ``xrayfed client``) call.

* :func:`superlink_args` / :func:`supernode_args`: the exact extra command-line arguments of
  ``flower-superlink`` / ``flower-supernode`` for TLS, ``--insecure`` or SuperNode auth.
* :func:`write_flwr_home`: a ``FLWR_HOME`` whose ``config.toml`` names the SuperLink
  connection used by ``flwr run`` and ``flwr supernode register|unregister|list``.
* :func:`flower_env`: the environment for every Flower process (``PATH`` must contain the
  venv's ``bin``: the SuperLink starts ``flower-superexec`` and the SuperNode ``flwr-clientapp``
  by name; the SuperExec polls every ``SUPEREXEC_POLL_S``; Flower's telemetry off, see
  :data:`TELEMETRY_ENV`).
* :func:`supernode_command`: ``flower-supernode`` with its idle pull every ``[hospital]
  poll_interval_s`` instead of Flower's fixed 3 s, and (``[hospital] fork_clientapps``) its
  SuperExec forking each ``flwr-clientapp`` process from a fork server (``xrayfed.client.forkserver``).

The operator's side lives in the server package: the SuperLink's registry of hospital keys
(:mod:`xrayfed.server.registry`) and the Fleet-only gateway (:mod:`xrayfed.server.gateway`).

Facts (Flower 1.41, see ``deploy/FLOWER-NOTES.md``): the SuperLink serves Fleet, Control and
Runtime APIs over HTTPS on one ``--host/--port``; TLS needs all three ``--ssl-*`` files, the
certificate's SAN must contain the address clients dial *and* the one the SuperLink's own
SuperExec dials (``127.0.0.1`` when listening on 0.0.0.0). SuperNode auth requires TLS; keys are
EC on a NIST curve in OpenSSH format; an unregistered key is refused at activation (the SuperNode
exits) and logged by the SuperLink as ``[/v1/fleet/activate-node][ApiError:2004] ...
No SuperNode found with the given public key``. Unregistering a node cuts a running SuperNode
off at its next request (HTTP 401) and the key can never be registered again on that SuperLink
state: a re-admitted hospital needs a new key.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Mapping

from xrayfed.common.errors import UserError

DEFAULT_CONNECTION = "xrayfed"

# --------------------------------------------------------------------------- environment
#: Flower's switch for its telemetry (``flwr/supercore/telemetry.py``, read when Flower is imported).
#: On by default: every Flower process (SuperLink, SuperNode, SuperExec, ServerApp, ClientApp, the
#: Simulation Engine's driver) POSTs an event with the machine's platform details to Flower's servers when
#: it starts and when it stops, spawns ``file`` to describe its interpreter, and at exit waits up
#: to 4 s for that POST (about 1.5 s here, with no route out). A hospital's or an operator's
#: machine sends nothing anyone did not ask for: xrayfed starts Flower with ``0``. Whoever sets
#: the variable themselves keeps their setting.
TELEMETRY_ENV = "FLWR_TELEMETRY_ENABLED"


def no_telemetry_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{TELEMETRY_ENV: "0"}`` unless the environment (``base``, default ``os.environ``) sets it."""
    env = os.environ if base is None else base
    return {} if env.get(TELEMETRY_ENV) is not None else {TELEMETRY_ENV: "0"}


def venv_bin_dir() -> Path:
    return Path(sys.executable).parent


def flower_env(flwr_home: Path | str | None = None, base: Mapping[str, str] | None = None,
               superexec_poll_s: float | None = None) -> dict[str, str]:
    """Environment for a Flower process: venv ``bin`` first on PATH, FLWR_HOME if given, the
    SuperExec's poll every ``superexec_poll_s`` seconds (default :data:`SUPEREXEC_POLL_S`; unless
    the environment sets it).

    Each process that installs apps (SuperNode, ``flwr run``) writes under ``$FLWR_HOME/apps``;
    give every role its own FLWR_HOME so nothing lands in ``~/.flwr``.
    """
    env = dict(os.environ if base is None else base)
    bindir = str(venv_bin_dir())
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p]
    env["PATH"] = os.pathsep.join([bindir] + [p for p in parts if p != bindir])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault(SUPEREXEC_POLL_ENV, f"{SUPEREXEC_POLL_S if superexec_poll_s is None else superexec_poll_s:g}")
    env.update(no_telemetry_env(env))
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    return env


def existing_file(path: Path | str | None, what: str) -> str:
    if path is None:
        raise UserError(f"{what} is not set; TLS is the default (make certificates with `xrayfed certs init`, "
                        "or pass --insecure for a local experiment)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what}: no file at {p}")
    return str(p.resolve())


# --------------------------------------------------------------------------- command lines
def superlink_args(
    *,
    insecure: bool = False,
    ca_cert: Path | str | None = None,
    cert: Path | str | None = None,
    key: Path | str | None = None,
    supernode_auth: bool = False,
) -> list[str]:
    """Extra ``flower-superlink`` arguments (besides ``--host/--port`` and
    ``--disable-runtime-dependency-installation``).

    TLS: ``--ssl-ca-certfile CA --ssl-certfile CERT --ssl-keyfile KEY`` (all three; the CA is
    what the SuperLink's own SuperExec trusts). Auth: ``--enable-supernode-auth`` (TLS only).
    """
    if insecure:
        if supernode_auth:
            raise UserError("hospital authentication (supernode_auth) needs TLS; remove --insecure")
        return ["--insecure"]
    args = [
        "--ssl-ca-certfile", existing_file(ca_cert, "network.tls.ca_cert"),
        "--ssl-certfile", existing_file(cert, "network.tls.cert"),
        "--ssl-keyfile", existing_file(key, "network.tls.key"),
    ]
    if supernode_auth:
        args.append("--enable-supernode-auth")
    return args


def superlink_args_from_config(network) -> list[str]:
    """:func:`superlink_args` from a :class:`xrayfed.common.config.ServerNetwork`."""
    tls = network.tls
    return superlink_args(insecure=tls.insecure, ca_cert=tls.ca_cert, cert=tls.cert, key=tls.key,
                          supernode_auth=network.auth_enabled)


def supernode_args(
    *,
    superlink: str,
    insecure: bool = False,
    root_certificates: Path | str | None = None,
    auth_private_key: Path | str | None = None,
) -> list[str]:
    """Extra ``flower-supernode`` arguments (besides ``--port`` and ``--node-config``).

    ``--superlink HOST:PORT`` plus either ``--insecure`` or ``--root-certificates CA`` (the CA
    that signed the SuperLink's certificate), and ``--auth-supernode-private-key KEY`` (the
    hospital's ``auth.key``) when the SuperLink authenticates SuperNodes.
    """
    args = ["--superlink", superlink]
    if insecure:
        if auth_private_key is not None:
            raise UserError("a hospital key (auth.key) is only used over TLS; remove --insecure")
        return args + ["--insecure"]
    args += ["--root-certificates", existing_file(root_certificates, "root certificates (the federation's ca.pem)")]
    if auth_private_key is not None:
        key = existing_file(auth_private_key, "hospital key (auth.key)")
        mode = os.stat(key).st_mode & 0o077
        if mode:
            raise UserError(f"{key}: the hospital's private key is readable by other users (chmod 600 {key})")
        args += ["--auth-supernode-private-key", key]
    return args


def _toml_str(s: str) -> str:
    return json.dumps(str(s), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def connection_toml(address: str, *, insecure: bool = False, root_certificates: Path | str | None = None,
                    name: str = DEFAULT_CONNECTION) -> str:
    """The ``config.toml`` of a FLWR_HOME with one SuperLink connection (the default)."""
    if not re.match(r"^[A-Za-z0-9_-]+$", name):
        raise UserError(f"connection name {name!r}: letters, digits, '_' and '-' only")
    lines = ["[superlink]", f"default = {_toml_str(name)}", "", f"[superlink.{name}]",
             f"address = {_toml_str(address)}"]
    if insecure:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {_toml_str(existing_file(root_certificates, 'root certificates (ca.pem)'))}")
    return "\n".join(lines) + "\n"


def write_flwr_home(home: Path | str, address: str, *, insecure: bool = False,
                    root_certificates: Path | str | None = None, name: str = DEFAULT_CONNECTION) -> Path:
    """Create ``home/config.toml`` (see :func:`connection_toml`); returns ``home``."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        connection_toml(address, insecure=insecure, root_certificates=root_certificates, name=name), encoding="utf-8")
    return home


# --------------------------------------------------------------------------- polling intervals
#: Seconds between the SuperNode's requests for work while none is waiting. Flower 1.41 fixes it
#: at 3 s (``flwr/supernode/start_client_internal.py``), which a round pays on average 1.5 s of
#: before a hospital even sees its request; :func:`run_supernode` starts Flower's own SuperNode
#: with this interval instead (``[hospital] poll_interval_s``).
SUPERNODE_POLL_S = 0.5
#: Flower's environment variable for the SuperExec's polling interval (Flower's default 1 s): how
#: soon a SuperNode starts the process for a message it holds.
SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", 0.2
#: The SuperLink's SuperExec starts one ServerApp per run, so it asks as often as Flower's default:
#: at 0.2 s its requests took about 1.2 s of the operator's CPU per minute of a run; this only sets
#: how soon the ServerApp starts after ``flwr run``, once.
SERVER_SUPEREXEC_POLL_S = 1.0


#: Seconds between the SuperNode's looks at its own memory while it waits for a ClientApp's reply
#: (Flower: 0.5 s, a round's reply then leaves on average 0.25 s after it is ready).
LOCAL_WAIT_S = 0.05


#: Seconds before the SuperNode asks again for a part (an object) of a message that the SuperLink
#: lists but does not hold yet (the ServerApp pushes a message first, its parts after it), doubling
#: on each miss up to Flower's cap (10 s). Flower starts at 1 s (``PULL_INITIAL_BACKOFF``), so a
#: pull that came a moment early cost the round a second; a miss now costs a small request.
OBJECT_RETRY_S = 0.1


def prompt_object_pulls(module, retry_s: float = OBJECT_RETRY_S) -> None:
    """``module``'s ``pull_objects`` (Flower's, as that module imported it) asks again for a missing
    part after ``retry_s`` seconds instead of Flower's 1 s, doubling on each miss as Flower does."""
    import functools

    pull = module.pull_objects
    if not (isinstance(pull, functools.partial) and "initial_backoff" in pull.keywords):
        module.pull_objects = functools.partial(pull, initial_backoff=retry_s)


class _PollingClock:
    """Flower's ``time`` module as the SuperNode's main loop sees it: its idle pull of the server
    (3 s in Flower) waits at most ``max_sleep_s`` seconds, its waits for a ClientApp's reply in its
    own memory (0.5 s in Flower; any wait under 1 s) at most ``local_wait_s``."""

    def __init__(self, module, max_sleep_s: float, local_wait_s: float = LOCAL_WAIT_S) -> None:
        self._module, self._max, self._local = module, float(max_sleep_s), float(local_wait_s)

    def sleep(self, seconds: float) -> None:
        seconds = float(seconds)
        self._module.sleep(min(seconds, self._max if seconds >= 1.0 else self._local))

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def exit_without_teardown(code: int) -> None:
    """End this process as :mod:`multiprocessing` ends its forked processes: the threads it
    started are joined (``threading._shutdown``), logs and output flushed, then ``os._exit``.
    For a process that is ending anyway (its work done or stopped): the interpreter's teardown of
    every imported module costs CPU the rest of the federation needs (measured here: 0.2 s for a
    Flower process, 0.8 s for one with torch, 0.65 s for a forked one: copy-on-write)."""
    import logging
    import threading

    try:
        threading._shutdown()  # noqa: SLF001 - what multiprocessing's forked processes call
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
    finally:
        os._exit(code)


def run_without_teardown(main) -> None:
    """``main()`` (an entry point that ends with ``sys.exit``), then :func:`exit_without_teardown`
    with its exit status; an error's traceback is printed as the interpreter would."""
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - printed as an uncaught error would be
        import traceback

        traceback.print_exc()
        code = 1
    exit_without_teardown(code)


def supernode_command(poll_s: float = SUPERNODE_POLL_S, fork_clientapps: bool = True) -> list[str]:
    """The command that starts Flower's ``flower-supernode`` with its idle pull every ``poll_s``
    seconds and, with ``fork_clientapps``, its SuperExec forking each ClientApp process from a
    fork server (``xrayfed.client.forkserver``); append ``flower-supernode``'s own arguments."""
    return [sys.executable, "-m", "xrayfed.common.flower_launch", "supernode", "--poll-s", f"{poll_s:g}",
            *(["--fork-clientapps"] if fork_clientapps else [])]  # [--wait-fd N] may follow


class Subprocess:
    """A Flower module's ``subprocess`` as that module sees it: ``Popen`` of the command named
    ``name`` starts ``replace(args, kwargs)`` instead (a ``Popen``, or an object with a ``pid``
    when it returns one); every other name and command is the real module's."""

    def __init__(self, module, name: str, replace) -> None:
        self._module, self._name, self._replace = module, name, replace

    def Popen(self, args, *rest, **kw):  # noqa: N802 - subprocess's own name
        if not rest and isinstance(args, (list, tuple)) and list(args[:1]) == [self._name]:
            started = self._replace(list(args), kw)
            if started is not None:
                return started
        return self._module.Popen(args, *rest, **kw)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


#: The SuperExec the SuperNode starts with ``--fork-clientapps``, by name (a role's module: this
#: package imports none): ``python -m`` it, or :func:`_SuperExecInWaiting` runs it.
FORKING_SUPEREXEC = "xrayfed.client.forkserver"


class _SuperExecInWaiting:
    """The SuperNode's SuperExec, forked from the SuperNode once Flower is imported and before it
    joins: it imports what the SuperExec adds (the fork server's ``preload``), then waits for the
    arguments Flower's ``Popen`` of ``flower-superexec`` would have had, and runs
    ``FORKING_SUPEREXEC`` with them in itself. A SuperExec started as its own process imports
    Flower again: about 1 s of CPU per hospital, on the path to round 1 because the SuperNode
    starts it only once it has joined (measured with three hospitals on 2 cores, 224 px, where
    the hospitals' checks keep both cores busy until then).

    Fork safety: forked while this process holds one thread (Flower imported with one OpenBLAS
    thread; nothing started yet: no connection, no key, no signal handler of Flower's), else not at
    all (``start`` returns None and the SuperExec is started as its own process). It closes the
    SuperNode's ends of the pipes it must not hold (the wake-up pipe's write end, so that it still
    sees the SuperNode go; the join gate). It is the SuperNode's child, as the ``Popen`` was, and
    ends with it: a SuperNode that ends first closes the pipe it waits on.
    """

    def __init__(self, pid: int, args_fd: int) -> None:
        self.pid, self._fd = pid, args_fd

    @classmethod
    def start(cls, wake_fd: int, close: tuple[int, ...]) -> "_SuperExecInWaiting | None":
        if process_threads() != 1:  # unknown counts as more: no fork
            return None
        for stream in (sys.stdout, sys.stderr):  # nothing buffered is written twice
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()
        try:
            r, w = os.pipe()
        except OSError:
            return None
        try:
            pid = os.fork()
        except OSError:  # no process to spare: the SuperExec starts as its own later, or not at all
            os.close(r)
            os.close(w)
            return None
        if pid == 0:  # never returns
            code = 1
            try:
                os.close(w)
                for fd in close:
                    os.close(fd)
                import importlib

                superexec = importlib.import_module(FORKING_SUPEREXEC)
                superexec.preload()
                with os.fdopen(r, "rb") as f:
                    line = f.readline()
                if not line:  # the SuperNode ended without starting its SuperExec
                    code = 0
                else:
                    superexec.run_superexec(["--wake-fd", str(wake_fd), *json.loads(line)])  # ends the process
            except KeyboardInterrupt:
                code = 130
            except BaseException:  # noqa: BLE001 - printed as an uncaught error would be
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(r)
        return cls(pid, w)

    def run(self, argv: list[str]) -> bool:
        """Hand it ``flower-superexec``'s arguments (after the command), once; False when it is
        gone (then reaped) or was handed them before."""
        if self._fd is None:
            return False
        fd, self._fd = self._fd, None
        try:
            os.write(fd, json.dumps(argv).encode() + b"\n")  # far below a pipe's buffer: never blocks
            return True
        except OSError:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, os.WNOHANG)
            return False
        finally:
            os.close(fd)


def process_threads() -> int | None:
    """Threads of this process, native ones included (a library's thread pool counts); None where
    the system does not say (no ``/proc``)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def run_supernode(argv: list[str]) -> None:
    """``flower-supernode`` (Flower's entry point, its arguments in ``argv``) with the idle pull
    interval given by a leading ``--poll-s S`` and, after it, ``--fork-clientapps``: its
    SuperExec is ``FORKING_SUPEREXEC`` (Flower's, its ClientApp processes forked from a fork
    server), forked from this process with Flower imported (:class:`_SuperExecInWaiting`); then
    ``--wait-fd N``: having imported Flower, it joins only after reading a ``j`` there (and ends
    without joining at anything else)."""
    import subprocess
    import time

    poll_s = SUPERNODE_POLL_S
    if argv[:1] == ["--poll-s"]:
        poll_s, argv = float(argv[1]), argv[2:]
    fork = argv[:1] == ["--fork-clientapps"]
    argv = argv[1:] if fork else argv
    gate = None
    if argv[:1] == ["--wait-fd"]:
        gate, argv = int(argv[1]), argv[2:]
    blas = os.environ.get("OPENBLAS_NUM_THREADS")
    if fork:  # numpy comes with Flower: one BLAS thread (the SuperNode does no linear algebra), so it can fork
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import flwr.supernode.start_client_internal as loop
        from flwr.supernode.cli import flower_supernode
    finally:
        if fork and blas is None:
            os.environ.pop("OPENBLAS_NUM_THREADS", None)
        elif fork:
            os.environ["OPENBLAS_NUM_THREADS"] = blas

    if fork:  # the SuperNode starts `flower-superexec` by name (one Popen, at its start)
        wake_r, wake_w = os.pipe()  # a byte per message received: the SuperExec starts its process at once
        os.set_blocking(wake_w, False)
        waiting = _SuperExecInWaiting.start(wake_r, close=(wake_w,) + (() if gate is None else (gate,)))

        def superexec(args: list[str], kw: dict):
            try:
                if waiting is not None and not kw and waiting.run(args[1:]):
                    return waiting
                return subprocess.Popen([sys.executable, "-m", FORKING_SUPEREXEC, "--wake-fd", str(wake_r),
                                         *args[1:]], pass_fds=(wake_r,), **kw)
            finally:
                os.close(wake_r)

        pull = loop._pull_and_store_message

        def pull_and_wake(*a, **kw):
            run_id = pull(*a, **kw)
            if run_id is not None:
                try:
                    os.write(wake_w, b"m")
                except OSError:  # full (the SuperExec is behind anyway) or gone: its own poll finds it
                    pass
            return run_id

        loop.subprocess = Subprocess(subprocess, "flower-superexec", superexec)
        loop._pull_and_store_message = pull_and_wake
    loop.time = _PollingClock(time, poll_s)  # the module's own name for `time`: its main loop only
    prompt_object_pulls(loop)
    sys.argv = ["flower-supernode", *argv]
    if gate is not None:  # imported while `xrayfed client` checked the data: join only on its word
        if os.read(gate, 1) != b"j":
            exit_without_teardown(0)  # refused before joining (or `xrayfed client` is gone)
        os.close(gate)
    run_without_teardown(flower_supernode)


if __name__ == "__main__":
    if sys.argv[1:2] != ["supernode"]:
        raise SystemExit("usage: python -m xrayfed.common.flower_launch supernode [--poll-s S] [--fork-clientapps] "
                         "[--wait-fd N] FLOWER-SUPERNODE-ARGS")
    run_supernode(sys.argv[2:])
