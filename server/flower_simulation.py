"""``xrayfed simulate``: N hospitals on Flower's Simulation Engine (Ray backend), one machine.

The Simulation Engine runs the project's own ServerApp (:mod:`xrayfed.server.server_app`:
``run_federation`` with its strategy, checkpoints, metrics and server-side evaluation) and
ClientApp (:mod:`xrayfed.client.client_app`: ``train_round`` with each hospital's DP plan,
budget and privacy ledger) unchanged; what it replaces is the transport — Flower's in-memory
Grid instead of SuperLink/SuperNodes over gRPC, and a pool of Ray worker processes that run the
ClientApp for one virtual SuperNode after another. So nothing here is TLS-protected or
authenticated, and SecAgg+ is not run (``secure_aggregation`` is switched off): a simulation is
for planning (accuracy, ε, round time as N grows), never for patient data across sites.

* Hospital ``i`` (Flower's ``partition-id``) gets ``hospital-NNN.toml`` written here: part i of
  N of ``--data`` (``--split iid|dirichlet|patient``, ``--size-skew`` for unequal sizes), its own
  ε budget and state folder under ``RUN_DIR/hospitals/``.
* The model: with no ``--width`` and no ``[model]`` in ``--config``, the one planned for these
  hospitals (:func:`xrayfed.server.simulate.planned_model`: each hospital's DP plan is computed
  from its partition before Ray starts; a ScatterNet XrayNet is narrowed while the DP noise in
  the mean update would exceed its largest signal).
* Per round the strategy samples ``--fraction`` of the hospitals (at least ``--min-clients``).
* Ray is started by this process bound to 127.0.0.1 (``_node_ip_address``; no dashboard),
  with ``--workers`` worker processes (default: the CPU count), one CPU each, and stopped at the end.
* ``--ray-address HOST:PORT`` runs on an existing Ray cluster instead (several machines, each
  reaching the simulation folder and the data at the same paths); the cluster is left running.
* The output is a normal run folder: ``metrics.jsonl``, checkpoints, every hospital's ledger;
  ``xrayfed report RUN_DIR`` works on it. At the end the command prints the round-to-round
  stability of the global model's AUC, the model width and the server step for N hospitals like
  these, with the ``federation.toml`` keys that fix them (:mod:`xrayfed.server.model_plan`,
  :mod:`xrayfed.server.stability`).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from xrayfed.common.errors import UserError

if TYPE_CHECKING:
    from xrayfed.server.model_plan import ModelAdvice

MARKER = ".xrayfed-simulation"


def _prepare_out(out: Path) -> None:
    from xrayfed.server.demo import prepare_out

    prepare_out(out, MARKER, "simulation")


def write_configs(args: argparse.Namespace, out: Path) -> tuple[Path, Path, int, "ModelAdvice | None"]:
    """Federation config and one ``hospital-NNN.toml`` per simulated hospital; returns
    ``(federation.toml, hospitals folder, N, advice)``. With no ``--width`` and no ``[model]`` in
    ``--config``, the model is the one recommended for these hospitals' DP plans
    (:func:`xrayfed.server.simulate.planned_model`; ``advice``, else None)."""
    from xrayfed.common.config import FederationConfig, HospitalConfig, dump_toml, load_config
    from xrayfed.server.demo import _native_size, probe_local_data, write_demo_configs

    if args.data is None:
        from xrayfed.common.synthetic import write_npz

        data = out / "data" / "synthetic.npz"
        data.parent.mkdir(parents=True)
        write_npz(data, n_train=max(2400, 600 * args.hospitals), n_val=200, n_test=400, size=args.image_size or 32,
                  task="binary", seed=0)
        print(f"[simulate] no --data: generated synthetic scans at {data}", flush=True)
    else:
        data = args.data.resolve()
    image_size = args.image_size or _native_size(data) or 224
    probe = probe_local_data(args, data)  # before Ray starts
    # the listen port is never opened: the Simulation Engine has no network
    fed_path, hospital_paths = write_demo_configs(out, data, args, image_size, probe.task, port=9092)
    model_chosen = args.width is not None
    if args.config is not None:  # the operator's own federation settings; run folder and overrides from here
        fed = load_config(FederationConfig, args.config, {
            "federation.run_dir": str(out / "run"), "federation.rounds": args.rounds,
            "federation.min_clients": args.min_clients, "federation.fraction_train": args.fraction})
        model_chosen = model_chosen or "model" in fed.model_fields_set
        if args.width is not None:  # the command line over the file, as for rounds and the others
            fed = fed.model_copy(update={"model": fed.model.model_copy(update={"width": args.width})})
        fed_path.write_text(dump_toml(fed), encoding="utf-8")
    fed = load_config(FederationConfig, fed_path)
    advice = None
    if not model_chosen:
        from xrayfed.server.simulate import planned_model

        advice = planned_model(fed, [load_config(HospitalConfig, p) for p in hospital_paths])
        if advice.changed:
            fed = fed.model_copy(update={"model": advice.spec})
            fed_path.write_text(dump_toml(fed), encoding="utf-8")
        fix = f"; to fix it: {advice.toml()}" if advice.changed else ""
        print(f"[simulate] model for {len(hospital_paths)} hospitals like these: {advice.describe()}{fix}", flush=True)
    if fed.federation.secure_aggregation:
        print("[simulate] SecAgg+ is not run in a simulation (no transport to protect): plain FedAvg sums", flush=True)
        fed = fed.model_copy(update={"federation": fed.federation.model_copy(update={"secure_aggregation": False})})
        fed_path.write_text(dump_toml(fed), encoding="utf-8")
    hdir = out / "hospital-configs"
    hdir.mkdir()
    for i, p in enumerate(hospital_paths):
        p.rename(hdir / f"hospital-{i:03d}.toml")
    return fed_path, hdir, len(hospital_paths), advice


def run_simulation(fed_path: Path, hospitals_dir: Path, n: int, workers: int, verbose: bool = False,
                   client_app=None, ray_address: str | None = None) -> None:
    """Run the federation of ``fed_path`` with ``n`` simulated hospitals on Flower's Simulation
    Engine (Ray, ``workers`` processes, 127.0.0.1 only). ``client_app``: the hospitals' ClientApp
    (default: the project's; tests wrap it to inject faults). ``ray_address``: run on that
    existing Ray cluster (``HOST:PORT`` of its head, as ``ray start --address`` takes it) instead
    of a Ray started here: its nodes' CPUs are the workers, each node must reach this folder and
    the data at the same paths, and the cluster is left running (only this run's workers end)."""
    import ray
    from flwr.simulation import run_simulation as flwr_run_simulation

    if client_app is None:
        from xrayfed.client.client_app import app as client_app
    from xrayfed.client.hospital import SIM_HOSPITALS_ENV
    from xrayfed.common.flower_launch import TELEMETRY_ENV
    from xrayfed.server.server_app import SIM_FEDERATION_ENV
    from xrayfed.server.server_app import app as server_app

    env = {SIM_HOSPITALS_ENV: str(hospitals_dir.resolve()), SIM_FEDERATION_ENV: str(fed_path.resolve()),
           # one CPU per worker: torch's own threads would oversubscribe the cores
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           # the workers of an existing cluster (--ray-address) get this env, not the driver's
           TELEMETRY_ENV: os.environ.get(TELEMETRY_ENV, "0")}
    os.environ.update({SIM_HOSPITALS_ENV: env[SIM_HOSPITALS_ENV], SIM_FEDERATION_ENV: env[SIM_FEDERATION_ENV]})
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)  # its deprecation notice for run_simulation: see docs
    # Every process Ray starts for this run inherits this tag (GCS, raylet, then its workers and
    # actors): they can be found and stopped at the end even after they were reparented, and only
    # this run's (two simulations of one user may run side by side).
    tag, known = secrets.token_hex(8), []
    os.environ[_RUN_TAG_ENV] = tag
    try:
        common = dict(log_to_driver=verbose, logging_level=logging.ERROR, configure_logging=False,
                      runtime_env={"env_vars": {**env, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
        if ray_address is None:
            ray.init(num_cpus=workers, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1", **common)
        else:  # this machine must be one of the cluster's nodes (Ray's drivers run beside a raylet)
            if ray_address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
                # a cluster on this machine's loopback: Ray would rewrite 127.0.0.1 to the
                # machine's own address, where such a cluster does not listen
                from ray._private import services

                services.resolve_ip_for_localhost = lambda host: host
                common["_node_ip_address"] = "127.0.0.1"
            ray.init(address=ray_address, **common)
        try:
            flwr_run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n,
                                backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
        finally:
            # Ray's agents rename themselves and lose the tag: list them now (an existing
            # cluster's processes are the cluster's, even when this process started them)
            known = _ray_processes() if ray_address is None else []
            ray.shutdown()
    finally:
        os.environ.pop(_RUN_TAG_ENV, None)
        _reap(tag, known)


_RUN_TAG_ENV = "XRAYFED_SIMULATION_RUN"


def _tagged(tag: str, env: str = _RUN_TAG_ENV) -> list:
    """This user's processes, other than this one, that carry this run's tag in their environment
    (``env``: the variable that holds it)."""
    import psutil

    me, out = os.getpid(), []
    for p in psutil.process_iter(["uids"]):
        try:
            if p.pid != me and p.info["uids"] and p.info["uids"].real == os.getuid() \
                    and p.environ().get(env) == tag and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _ray_processes() -> list:
    """Ray's processes under this one (GCS, raylet, agents, workers), now."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "ray" in " ".join(p.cmdline()).lower():
                out.append(p)
        except psutil.Error:
            pass
    return out


def _reap(tag: str, known: list, timeout_s: float = 15.0) -> None:
    """``ray.shutdown()`` returns before Ray's processes have exited, and Ray may still be
    starting a worker as it shuts down: wait for every process of this run (``known`` before the
    shutdown, and :func:`_tagged`), look again for any started meanwhile, then kill what is left,
    so that a simulation leaves no process behind."""
    import psutil

    from xrayfed.common.procs import wait_exited

    deadline = time.monotonic() + timeout_s
    alive = list(known)
    while True:
        alive = list({*alive, *_tagged(tag)})  # those still running, and any started meanwhile
        left = deadline - time.monotonic()
        if not alive or left <= 0:
            break
        alive = wait_exited(alive, min(2.0, left))  # a zombie (an orphan init has not reaped yet) has exited
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    wait_exited(alive, 5)


def run_simulate_cmd(args: argparse.Namespace) -> int:
    import warnings

    from xrayfed.server.demo import check_local_data_args

    if args.hospitals < 1 or args.rounds < 1:
        raise UserError("--hospitals and --rounds must be at least 1")
    check_local_data_args(args)  # before Ray starts or anything is written
    if args.min_clients is not None and not 1 <= args.min_clients <= args.hospitals:
        raise UserError(f"--min-clients {args.min_clients}: must be between 1 and --hospitals ({args.hospitals})")
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise UserError("xrayfed simulate runs on Flower's Simulation Engine, which needs Ray: "
                        "pip install 'xrayfed[simulation]'") from e
    if args.fraction is not None and not 0 < args.fraction <= 1:
        raise UserError(f"--fraction {args.fraction}: must be in (0, 1]")
    if args.fraction is not None and args.fraction < 1 and args.min_clients is None:
        args.min_clients = min(2, args.hospitals)  # else every round would wait for all N
    address = getattr(args, "ray_address", None)
    if address is not None and not _RAY_ADDRESS.fullmatch(address):
        raise UserError(f"--ray-address {address!r}: give the HOST:PORT of the Ray cluster's head (as `ray start "
                        "--address` takes it)")
    t0 = time.time()
    out = args.out.resolve()
    _prepare_out(out)
    fed_path, hdir, n, advice = write_configs(args, out)
    workers = max(1, min(args.workers or os.cpu_count() or 1, n))
    engine = (f"the Ray cluster at {address}" if address else
              f"Ray, {workers} worker process(es), 127.0.0.1")
    print(f"[simulate] {n} hospitals on Flower's Simulation Engine ({engine}), "
          f"{args.rounds} rounds, ε = {args.epsilon:g} each, split {args.split}"
          + (f", size skew {args.size_skew:g}" if args.size_skew else "") + f"; folder {out}", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            run_simulation(fed_path, hdir, n, workers, verbose=bool(getattr(args, "verbose", False)),
                           ray_address=address)
        except ConnectionError as e:
            raise UserError(f"--ray-address {address}: no Ray cluster answered there ({str(e).splitlines()[0]})") from e
    for line in stability_lines(fed_path, out / "run", n, advice):
        print(f"[simulate] {line}", flush=True)
    print(f"[simulate] finished in {time.time() - t0:.0f}s; run folder {out / 'run'}; "
          f"report: xrayfed report {out / 'run'}", flush=True)
    return 0


_RAY_ADDRESS = re.compile(r"[A-Za-z0-9_.:\[\]-]+:\d{1,5}")


def stability_lines(fed_path: Path, run: Path, n: int, advice: "ModelAdvice | None" = None) -> list[str]:
    """What the operator plans with: the round-to-round stability of the global model's AUC
    (server-side test set, else the hospitals' validation), the model width for N hospitals like
    the simulated ones (``advice``, the one chosen before the run; else judged from the plans in
    the run's replies), and the server step ``strategy = "auto"`` takes for them
    (:mod:`xrayfed.server.stability`)."""
    import json

    from xrayfed.common.config import FederationConfig, load_config
    from xrayfed.server.model_plan import num_weights, recommend_model
    from xrayfed.server.stability import hospital_weights, per_round, recommend_step, round_stability

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    out = []
    aucs = [(r.get("eval") or r.get("client_eval") or {}).get("auc") for r in rows]
    if rows and all(isinstance(a, (int, float)) for a in aucs):
        out.append(round_stability(aucs).line())
    cfg = load_config(FederationConfig, fed_path)
    hospitals = [h for r in rows for h in r.get("hospitals", [])]
    fed = cfg.federation
    k = per_round(fed.fraction_train, fed.min_clients, n)
    if advice is None:
        advice = recommend_model(cfg.model, hospital_weights(hospitals, fed.max_examples_per_hospital), per_round=k)
    if advice.changed and advice.spec == cfg.model:
        out.append(f"model for {n} hospitals like these: {advice.describe()}; this run used it; to fix it: "
                   f"{advice.toml()}")
    elif advice.changed:
        out.append(f"model for {n} hospitals like these: {advice.describe()}; this run used width "
                   f"{cfg.model.width}; to plan with it: {advice.toml()}")
    else:
        out.append(f"model for {n} hospitals like these: {advice.describe()}")
    d = num_weights(cfg.model)
    step = recommend_step(hospitals, d, per_round=k, max_weight=fed.max_examples_per_hospital)
    used = "" if cfg.federation.strategy == "auto" else f"; this run used strategy = \"{cfg.federation.strategy}\""
    out.append(f"server step for {n} hospitals like these: {step.describe()} ([federation] strategy = \"auto\" "
               f"chooses it every round; to fix it: {step.toml()}{used})")
    return out
