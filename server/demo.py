"""``xrayfed demo``: a whole federation on this machine in one command.

Starts the server and N hospital clients as separate processes talking over the network stack
on 127.0.0.1 (no TLS: a local demo), trains on ``--data`` (MedMNIST .npz, class folders, NIH,
DICOM) split across the hospitals — or on synthetic scans generated here when no data is given
— and prints per round the test AUC, accuracy and the ε spent by each hospital. Every process
is stopped at the end, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from xrayfed.common.config import FederationConfig, HospitalConfig, dump_toml
from xrayfed.common.data import load_dataset
from xrayfed.common.errors import UserError
from xrayfed.common.model import default_model
from xrayfed.common.procs import ProcessGroup, free_port, shared_cpu_env, spawn

MARKER = ".xrayfed-demo"
#: Data with no test split of its own (flat class folders, NIH without its lists): the share of its
#: patients the demo holds out as the federation's test set (server's eval.test_fraction, and each
#: hospital's data.local_test_fraction so that no hospital trains on them).
DEMO_TEST_FRACTION = 0.2


def prepare_out(out: Path, marker: str = MARKER, what: str = "demo") -> None:
    """Create ``out`` afresh; an existing folder is replaced only when ``marker`` says this
    command made it (never someone's own folder)."""
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out}: not a folder; choose a new folder for --out")
        if not (out / marker).exists():
            raise UserError(f"--out {out}: folder exists and is not a {what} folder; choose another --out")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True)
        (out / marker).write_text(f"created by xrayfed {what}\n")
    except OSError as e:  # a parent that is a file, no permission, a full disk...
        raise UserError(f"--out {out}: cannot create the folder ({e.strerror or type(e).__name__}); "
                        "choose a new folder you may write") from None


def check_local_data_args(args: argparse.Namespace) -> None:
    """What `demo` and `simulate` check before they start anything: ``--data`` is a folder or a
    readable .npz (never a FIFO or device, see :func:`~xrayfed.common.data.detect_format`) and
    ``--image-size`` lies in 8..MAX_IMAGE_SIZE px. One-line UserError otherwise."""
    from xrayfed.common.data import detect_format
    from xrayfed.common.preprocess import MAX_IMAGE_SIZE, MIN_SIZE

    if args.image_size is not None and not MIN_SIZE <= args.image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"--image-size {args.image_size}: allowed are {MIN_SIZE} to {MAX_IMAGE_SIZE} px")
    if args.data is not None:
        detect_format(args.data)


def probe_local_data(args: argparse.Namespace, data: Path):
    """The training scans of ``data`` at 16 px (their task), for `demo` and `simulate` before they
    start anything; refused in one line (:data:`~xrayfed.common.privacy.NO_PATIENT_IDS`) when they
    carry no patient ids and ``--privacy-unit scan`` was not given, or when they break the rule
    `xrayfed data check` applies (:func:`~xrayfed.common.data.inventory.training_findings`),
    whose warnings are printed."""
    from xrayfed.common.privacy import NO_PATIENT_IDS

    from xrayfed.common.data import carves_test
    from xrayfed.common.data.inventory import training_findings

    probe = load_dataset(data, split="train", image_size=16,
                         test_fraction=DEMO_TEST_FRACTION if carves_test(data) else 0.0)
    if getattr(args, "privacy_unit", None) != "scan" and not probe.patient_ids_known:
        raise UserError(f"data {data} {NO_PATIENT_IDS}")
    problems, warnings = training_findings(probe)  # the rule `xrayfed data check` applies
    if problems:
        raise UserError(f"data {data}: {problems[0]}")
    for w in warnings:
        print(f"[demo] WARNING: data {data}: {w}", flush=True)
    if carves_test(data):
        print(f"[demo] {data.name} has no test split of its own: {DEMO_TEST_FRACTION:.0%} of its patients are held "
              "out as the federation's test set (eval.test_fraction, each hospital's data.local_test_fraction)",
              flush=True)
    return probe


def _native_size(path: Path) -> int | None:
    """Side (px) of the scans of a .npz file (from the header of its train images, else of its
    first images array), else None."""
    if path.suffix == ".npz":
        from xrayfed.common.data.npz import npz_arrays

        arrays = npz_arrays(path)
        key = "train_images" if "train_images" in arrays else min(k for k in arrays if k.endswith("_images"))
        return int(arrays[key][0][1])
    return None


def _has_val(data: Path) -> bool:
    """Whether ``data`` has a ``val`` split of its own (no hospital trains on it): where the
    server chooses the operating point."""
    if data.suffix == ".npz":
        from xrayfed.common.data.npz import npz_arrays

        return "val_images" in npz_arrays(data)
    return (data / "val").is_dir()


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def hospital_name(i: int, n: int) -> str:
    """``hospital-a``, ``hospital-b``, … (up to 26 hospitals), else ``hospital-001``, …"""
    return f"hospital-{chr(ord('a') + i)}" if n <= 26 else f"hospital-{i + 1:03d}"


def write_demo_configs(out: Path, data: Path, args: argparse.Namespace, image_size: int, task,
                       port: int) -> tuple[Path, list[Path]]:
    from xrayfed.common.data import carves_test

    run_dir = out / "run"
    test_fraction = DEMO_TEST_FRACTION if carves_test(data) else 0.0
    fed = FederationConfig.model_validate(
        {
            "federation": {"name": getattr(args, "name", "demo"), "run_dir": str(run_dir), "rounds": args.rounds,
                           "min_clients": getattr(args, "min_clients", None) or args.hospitals,
                           "fraction_train": getattr(args, "fraction", None) or 1.0,
                           **({"lr": args.lr} if args.lr else {})},
            "model": default_model(image_size, task.num_outputs).model_copy(
                update={"width": args.width} if args.width else {}).model_dump(),
            "task": task.to_dict(),
            "image_size": image_size,
            "eval": {"path": str(data), "split": "test", "test_fraction": test_fraction,
                     **({"val_split": "val"} if _has_val(data) else {})},
            "network": {"listen": f"127.0.0.1:{port}", "tls": {"insecure": True}},
        }
    )
    fed_path = _write(out / "federation.toml", dump_toml(fed))
    hospitals = []
    for i in range(args.hospitals):
        name = hospital_name(i, args.hospitals)
        h = HospitalConfig.model_validate(
            {
                "hospital": {"name": name, "state_dir": str(run_dir / "hospitals" / name), "device": "auto"},
                "data": {"path": str(data), "split": "train", "local_test_fraction": test_fraction,
                         "partition": f"{i}/{args.hospitals}",
                         "partition_scheme": args.split, "dirichlet_alpha": args.alpha, "seed": 0,
                         "size_skew": getattr(args, "size_skew", 0.0) or 0.0},
                "privacy": {"epsilon": args.epsilon, "delta": args.delta, "max_rounds": args.rounds,
                            **({"unit": args.privacy_unit} if getattr(args, "privacy_unit", None) else {})},
                "training": {k: v for k, v in (("local_epochs", args.local_epochs), ("batch_size", args.batch_size))
                             if v is not None},  # unset: the hospital derives them from its N and budget
            }
        )
        hospitals.append(_write(out / f"{name}.toml", dump_toml(h)))
    return fed_path, hospitals


def run_demo_cmd(args: argparse.Namespace) -> int:
    if args.hospitals < 1 or args.rounds < 1:
        raise UserError("--hospitals and --rounds must be at least 1")
    t0 = time.time()
    out = args.out.resolve()
    check_local_data_args(args)
    prepare_out(out)
    if args.data is None:
        from xrayfed.common.synthetic import write_npz

        data = out / "data" / "synthetic.npz"
        data.parent.mkdir(parents=True)
        size = args.image_size or 32
        write_npz(data, n_train=600 * args.hospitals, n_val=200, n_test=400, size=size, task="binary", seed=0)
        print(f"[demo] no --data: generated synthetic scans ({size} px, one class carries a visible opacity) at {data}")
    else:
        data = args.data.resolve()

    image_size = args.image_size or _native_size(data) or 224
    probe = probe_local_data(args, data)  # before any process starts
    port = free_port()
    fed_path, hospital_paths = write_demo_configs(out, data, args, image_size, probe.task, port)
    cli = [sys.executable, "-m", "xrayfed.common.cli"]
    print(f"[demo] {args.hospitals} hospitals × {args.rounds} rounds, ε = {args.epsilon:g} each, "
          f"{image_size} px, task {probe.task.kind} {list(probe.task.class_names)}; folder {out}")
    with ProcessGroup() as group:
        cpu_env = shared_cpu_env(len(hospital_paths), share_dir=out / "cores")  # the server's evaluation too
        server = group.add(spawn(cli + ["server", "--config", str(fed_path)], stdout=subprocess.PIPE, env=cpu_env))
        logs = []
        for hp in hospital_paths:
            log_path = out / f"{hp.stem}.log"
            f = log_path.open("w")
            logs.append(f)
            group.add(spawn(cli + ["client", "--server", f"127.0.0.1:{port}", "--config", str(hp), "--insecure"],
                            log=f, env=cpu_env))
        for raw in iter(server.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            if line:
                print(line.replace("[xrayfed]", "[server]"), flush=True)
        rc = server.wait()
        group.stop_all()
        for f in logs:
            f.close()
    print(f"[demo] finished in {time.time() - t0:.0f}s (exit {rc}); run folder {out / 'run'}; "
          f"report: xrayfed report {out / 'run'}")
    if rc != 0:
        print(f"[demo] the server failed; see {out / 'run' / 'server.log'} and {out}/hospital-*.log", file=sys.stderr)
    return rc
