"""The operator's and the crypto provider's sub-commands: ``server``, ``demo``, ``simulate``,
``report``, ``serve-crypto-provider`` and ``certs``.

Only argument definitions live here (no torch, flwr or CrypTen is imported), so ``xrayfed
--help`` stays fast; each command's handler is imported when that command runs
(:func:`xrayfed.common.cli_args.handler`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xrayfed.common.cli_args import add_model_argument, handler
from xrayfed.common.privacy.ledger import LEDGER_FILE
from xrayfed.common.security.atrest import add_key_argument


def register(sub: argparse._SubParsersAction) -> None:
    """Add the server-side sub-commands to the ``xrayfed`` parser."""
    for reg in (register_server, register_demo, register_simulate, register_report, register_crypto_provider,
                register_certs):
        reg(sub)


def register_server(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("server", help="run the federation server (Flower SuperLink + ServerApp)",
                       description="Start the aggregation server and run the federation described by the config.")
    p.add_argument("--config", required=True, type=Path, help="federation.toml")
    p.add_argument("--run-dir", type=Path, help="override [federation] run_dir")
    p.add_argument("--rounds", type=int, help="override [federation] rounds")
    p.add_argument("--min-clients", type=int, help="override [federation] min_clients")
    p.add_argument("--listen", help="override [network] listen HOST:PORT (the port hospitals connect to)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="no TLS (local experiments only; prints a warning)")
    add_key_argument(p, help="encrypt the run's checkpoints at rest with this key")
    p.set_defaults(func=handler("xrayfed.server.superlink", "run_server_cmd"))


def register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a local federation: server + hospitals as separate processes",
                       description="Run a complete federated DP training on this machine (synthetic scans "
                                   "unless --data is given).")
    p.add_argument("--data", type=Path, help="scans to split across hospitals (.npz, class folders, NIH, DICOM); "
                                             "default: synthetic scans generated now")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo folder (replaced if it is a demo folder)")
    p.add_argument("--hospitals", type=int, default=3, help="number of hospitals (processes) to start (default 3)")
    add_local_federation_args(p)
    p.set_defaults(func=handler("xrayfed.server.demo", "run_demo_cmd"))


def add_local_federation_args(p: argparse.ArgumentParser) -> None:
    """What `demo` and `simulate` share: rounds, each hospital's budget, the data split and the
    training settings a hospital would otherwise choose itself."""
    p.add_argument("--rounds", type=int, default=5, help="federated rounds (default 5)")
    p.add_argument("--epsilon", type=float, default=8.0, help="each hospital's total ε budget")
    p.add_argument("--delta", type=float, default=1e-5, help="each hospital's DP δ (default 1e-5)")
    p.add_argument("--privacy-unit", choices=("patient", "scan"), default=None,
                   help="what each hospital's guarantee protects (default: the patient whenever the data carries "
                        "patient ids; data without them needs --privacy-unit scan)")
    p.add_argument("--image-size", type=int, help="px (default: native size of .npz data, 32 synthetic, 224 otherwise)")
    p.add_argument("--split", choices=("iid", "dirichlet", "patient"), default="iid",
                   help="how scans are divided among hospitals")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet α for --split dirichlet")
    p.add_argument("--local-epochs", type=float, help="default: each hospital's automatic choice from its budget")
    p.add_argument("--batch-size", type=int, help="default: each hospital's automatic choice from its N")
    p.add_argument("--lr", type=float, help="client learning rate (default: the federation default)")
    p.add_argument("--width", type=int, help="XrayNet width (default: the recommended model; `simulate` plans it "
                                             "from the hospitals' DP plans, narrower for many small hospitals)")


def register_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="N simulated hospitals on Flower's Simulation Engine (Ray), one machine",
                       description="Run the federation's ServerApp and the hospitals' ClientApp unchanged on Flower's "
                                   "Simulation Engine: N hospitals with their own DP plans, budgets and ledgers, "
                                   "sampled per round; a run folder that `xrayfed report` reads. Planning only: "
                                   "no TLS, no SecAgg+, one machine.")
    p.add_argument("--hospitals", type=int, required=True, help="number of simulated hospitals N")
    p.add_argument("--data", type=Path, help="scans to split across the hospitals (default: synthetic)")
    p.add_argument("--config", type=Path, help="federation.toml to take the model, strategy and rounds from")
    p.add_argument("--out", type=Path, default=Path("runs/simulate"), help="simulation folder (replaced if it is one)")
    add_local_federation_args(p)
    p.add_argument("--size-skew", type=float, default=0.0,
                   help="hospitals of unequal size (--split iid): hospital k gets a share ∝ (k+1)^-SKEW")
    p.add_argument("--fraction", type=float, default=None, help="share of the hospitals sampled per round (default 1)")
    p.add_argument("--min-clients", type=int, default=None,
                   help="at least this many hospitals per round (default: all N when --fraction is 1, else 2)")
    p.add_argument("--workers", type=int, help="Ray worker processes (default: the CPU count)")
    p.add_argument("--ray-address", metavar="HOST:PORT",
                   help="run on this existing Ray cluster (its head's address; every node must see the simulation "
                        "folder and the data at the same paths) instead of starting Ray on this machine")
    p.set_defaults(func=handler("xrayfed.server.flower_simulation", "run_simulate_cmd"), name="simulation")


# ============================================================================ CLI
def register_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="privacy-budget report of a federation run or of a hospital's ledger",
        description="Write a privacy-budget report (Markdown, self-contained HTML with plots, JSON): ε spent and "
                    "left per hospital, a second opinion on every ε from an independent accountant, warnings, and "
                    "model AUC per round. RUN_DIR: the operator's run directory; --ledger: a hospital's own ledger.")
    p.add_argument("run_dir", nargs="?", type=Path, metavar="RUN_DIR",
                   help="federation run directory (metrics.jsonl; hospital ledgers under hospitals/ are included)")
    p.add_argument("--ledger", type=Path, action="append", default=[], metavar="FILE",
                   help=f"a hospital's {LEDGER_FILE} (or its state folder); repeatable")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default: RUN_DIR/report, or privacy-report/ next to the ledger)")
    p.add_argument("--format", default="all", metavar="LIST", help="md,html,json or all (default: all)")
    p.add_argument("--schema", action="store_true", help="print the JSON schema of report.json and exit")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when the report has critical findings")
    add_key_argument(p, help="key of ledgers encrypted at rest")
    p.add_argument("--ledger-key-file", type=Path, metavar="FILE",
                   help="the ledger's HMAC key ([hospital] ledger_key_file) when it is not the ledger.key beside "
                        "the ledger or derived from the at-rest key")
    p.set_defaults(func=handler("xrayfed.server.report.command", "report_cmd"))


def register_crypto_provider(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-crypto-provider",
                       help="run the crypto provider (the second computing party) for encrypted inference",
                       description="The crypto provider of encrypted inference: computes every encrypted "
                       "prediction together with the hospital's service, on shares only. Run it on a host the "
                       "hospital does not control; its TLS certificate must carry the name "
                       "'xrayfed-crypto-provider' (xrayfed certs init makes one: pki/crypto-provider/).")
    p.add_argument("--config", type=Path, help="TOML file with CryptoProviderConfig settings (crypto-provider.toml)")
    p.add_argument("--listen", help="gRPC address HOST:PORT (default 127.0.0.1:9444)")
    p.add_argument("--cert", type=Path, help="TLS certificate (PEM)")
    p.add_argument("--key", type=Path, help="TLS private key (PEM)")
    p.add_argument("--secret", type=Path, help="file with the secret shared with the inference service")
    p.add_argument("--session-timeout", type=float, help="seconds before a session is torn down (default 120)")
    p.add_argument("--max-sessions", type=int, help="concurrent sessions (default 8)")
    p.add_argument("--mpc-host", help="address its MPC parties listen on for the hospital's party "
                   "(default 127.0.0.1; must be reachable from the inference service)")
    p.add_argument("--insecure", action="store_true", help="no TLS (local experiments only)")
    p.set_defaults(func=handler("xrayfed.server.crypto_provider", "serve_cmd"))
    sub.deprecate("serve-ttp", "serve-crypto-provider")


def register_certs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="make the federation's CA, certificates and hospital keys",
                       description="Keys and certificates for a TLS-protected, authenticated federation.")
    # The hospital's own `certs hospital-key` is added to this group by xrayfed.client.commands.
    cs = p.add_subparsers(dest="certs_command", metavar="ACTION")
    cs.required = True

    i = cs.add_parser("init", help="create CA, server/inference certificates, token key and hospital keys")
    i.add_argument("--out", required=True, type=Path, help="folder for the keys and certificates")
    i.add_argument("--server-name", action="append", default=[], metavar="DNS",
                   help="host name the server is reached by (repeatable)")
    i.add_argument("--server-ip", action="append", default=[], metavar="IP",
                   help="IP address the server is reached by (repeatable)")
    i.add_argument("--hospital", action="append", default=[], metavar="NAME",
                   help="make a SuperNode key pair for this hospital (repeatable)")
    i.add_argument("--no-loopback", action="store_true",
                   help="leave localhost/127.0.0.1/::1 out of the server certificate "
                        "(the SuperLink's own ServerApp runner then needs --server-ip of its listen address)")
    i.add_argument("--federation", default="xrayfed", help="name used in the CA's subject")
    i.add_argument("--force", action="store_true", help="replace existing keys")
    i.set_defaults(func=handler("xrayfed.server.pki_cli", "init_cmd"))

    a = cs.add_parser("add-hospital", help="add a hospital: make its SuperNode key pair, or import its public key")
    a.add_argument("name", metavar="NAME", help="the hospital's name (letters, digits, '.', '-', '_')")
    a.add_argument("--out", required=True, type=Path, help="the folder made by `certs init`")
    a.add_argument("--public-key", type=Path, metavar="AUTH_PUB",
                   help="the hospital's own auth.pub (from `xrayfed certs hospital-key` on its machine): "
                        "only the public key is stored here")
    a.add_argument("--force", action="store_true", help="replace the hospital's existing key")
    a.set_defaults(func=handler("xrayfed.server.pki_cli", "add_hospital_cmd"))

    r = cs.add_parser("revoke-hospital", help="revoke a hospital: not registered again; "
                                              "--superlink also unregisters it now")
    r.add_argument("name", metavar="NAME", help="the hospital's name, as given to `certs init` or `certs add-hospital`")
    r.add_argument("--out", required=True, type=Path, help="the folder made by `certs init`")
    r.add_argument("--superlink", metavar="HOST:PORT",
                   help="also unregister the hospital from this running SuperLink (TLS with DIR/ca.pem)")
    r.set_defaults(func=handler("xrayfed.server.pki_cli", "revoke_hospital_cmd"))

    k = cs.add_parser("atrest-key", help="make a 256-bit key for encrypting checkpoints/ledgers at rest")
    k.add_argument("--out", required=True, type=Path, help="key file to write (mode 0600)")
    k.add_argument("--force", action="store_true", help="replace an existing key file")
    k.set_defaults(func=handler("xrayfed.server.pki_cli", "atrest_key_cmd"))

    e = cs.add_parser("decrypt-checkpoint", help="decrypt a checkpoint encrypted at rest into a plaintext "
                                                 "checkpoint (e.g. for serve-inference)")
    add_model_argument(e, help="checkpoint encrypted at rest (RUN_DIR/checkpoints/round-NNNN.pt)", old_positional=True)
    e.add_argument("--out", required=True, type=Path, help="plaintext checkpoint to write (mode 0600)")
    e.add_argument("--force", action="store_true", help="replace an existing output file")
    add_key_argument(e, help="key the checkpoint was encrypted with")
    e.set_defaults(func=handler("xrayfed.server.pki_cli", "decrypt_checkpoint_cmd"))
    cs.deprecate("export-model", "decrypt-checkpoint")
