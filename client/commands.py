"""The sub-commands run at the edges: ``client``, ``certs hospital-key``, ``data check``,
``export`` and ``explain`` (a hospital), ``serve-inference`` and ``token`` (a hospital's
inference service and staff), ``predict`` (a patient).

Only argument definitions live here, so ``xrayfed --help`` stays fast; each command's handler
is imported when that command runs (:func:`xrayfed.common.cli_args.handler`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xrayfed.common.cli_args import add_model_argument, handler, old_option, sub_commands
from xrayfed.common.security.atrest import add_key_argument


def register(sub: argparse._SubParsersAction) -> None:
    """Add the hospital's and the patient's sub-commands to the ``xrayfed`` parser."""
    for reg in (register_client, register_hospital_key, register_data, register_audit, register_export,
                register_explain, register_inference, register_token, register_predict):
        reg(sub)


def register_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="run a hospital client (Flower SuperNode + DP training)",
                       description="Join a federation as a hospital: train on local scans with differential privacy.")
    p.add_argument("--server", required=True, help="the federation server HOST:PORT")
    p.add_argument("--data", type=Path, help="the hospital's scans (overrides [data] path)")
    p.add_argument("--config", type=Path, help="hospital.toml (privacy budget, training settings)")
    p.add_argument("--name", help="override [hospital] name")
    p.add_argument("--state-dir", type=Path, help="override [hospital] state_dir (privacy ledger lives here)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override [hospital] device (default auto)")
    p.add_argument("--epsilon", type=float, help="override [privacy] epsilon (this hospital's total ε budget)")
    p.add_argument("--insecure", action="store_true", help="no TLS (local experiments only; prints a warning)")
    ca = p.add_argument("--ca-cert", type=Path, metavar="FILE",
                        help="CA certificate (PEM) that signed the server's certificate (the federation's ca.pem)")
    old_option(p, ca, "--root-cert")
    p.add_argument("--auth-key", type=Path, help="this hospital's SuperNode authentication private key")
    p.add_argument("--port", type=int, help="local port of the SuperNode's ClientApp API (default: a free port)")
    add_key_argument(p, help="encrypt this hospital's privacy ledger and released updates at rest with this key")
    p.set_defaults(func=handler("xrayfed.client.supernode", "run_client_cmd"))


def register_hospital_key(sub: argparse._SubParsersAction) -> None:
    cs = sub_commands(sub, "certs")  # the operator's group (xrayfed.server.commands, registered first)
    h = cs.add_parser("hospital-key", help="on a hospital's machine: make its SuperNode key pair "
                                           "(send only auth.pub to the operator)")
    h.add_argument("--out", required=True, type=Path, help="folder for auth.key (mode 0600) and auth.pub")
    h.add_argument("--name", default="", help="hospital name (a comment in auth.pub)")
    h.add_argument("--force", action="store_true", help="replace an existing auth.key")
    h.set_defaults(func=handler("xrayfed.client.keys", "hospital_key_cmd"))


def register_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="check a hospital's scans before joining a federation",
                       description="What the data holds, per split and class, and the DP plan its budget buys.")
    ds = p.add_subparsers(dest="data_command", metavar="ACTION")
    ds.required = True
    c = ds.add_parser("check", help="scans, patients, sizes, unreadable files, classes, task; with --config the "
                                    "DP plan (exit status 1 when the data cannot train)")
    c.add_argument("path", type=Path, metavar="PATH", help="class folders (with or without train/ and test/), NIH, "
                                                         ".npz or DICOM with labels.csv")
    c.add_argument("--config", type=Path, help="hospital.toml: also show the DP plan its budget buys")
    c.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    c.set_defaults(func=handler("xrayfed.client.data_check", "run_data_check"))


def register_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="measure a lower bound on the ε this hospital's training really spends "
                                     "(canaries, one training run, nothing charged) and a membership attack",
                       description="Train this hospital's whole DP plan once, in this process, with canaries "
                                   "(white-box gradient canaries, or black-box input-space canaries scored on "
                                   "the final model): an empirical lower bound on ε to compare with the claimed ε "
                                   "(docs/privacy-audit.md). No ledger is charged, nothing leaves.")
    p.add_argument("--config", type=Path, required=True, help="hospital.toml (the plan that is audited)")
    p.add_argument("--data", type=Path, help="the hospital's scans (overrides [data] path)")
    p.add_argument("--federation", type=Path, help="federation.toml: its model, image size and learning rate "
                                                   "(default: the recommended model at --image-size, lr 0.125)")
    add_model_argument(p, required=False, help="a finished run's global model (e.g. checkpoints/best.pt): the "
                                               "membership attack's target (its architecture and scan size too)")
    p.add_argument("--image-size", type=int, help="scan size in px (default: the federation's, else 224)")
    p.add_argument("--lr", type=float, help="learning rate (default: the federation's)")
    p.add_argument("--auditor", default="white-box", metavar="{white-box,black-box}",
                   help="white-box (default): gradient canaries, the adversary sees every noised step (the "
                        "stronger bound); black-box: input-space canaries (scans with changed labels) scored on "
                        "the final model only")
    p.add_argument("--canaries", type=int, help="canaries m (default: 40000 gradient canaries, one per weight at most; black-box: "
                                                "min(1000, half the training units); more: a tighter bound, more time)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound (default 0.95)")
    p.add_argument("--no-mia", action="store_true", help="skip the membership-inference attack (and its no-DP "
                                                         "reference training)")
    p.add_argument("--attack", default="loss", metavar="{loss,lira}",
                   help="membership attack: loss (default) or lira (the loss attack plus a few-shadow likelihood-"
                        "ratio attack: 2 × --shadows more trainings of the plan)")
    p.add_argument("--shadows", type=int, default=8, help="LiRA's shadow models K (default 8, 4..64)")
    p.add_argument("--seed", type=int, help="seed of the canaries and the initial model (the DP noise is never "
                                            "seeded)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override [hospital] device")
    add_key_argument(p, help="key --model is encrypted with")
    p.add_argument("--out", type=Path, help="result file (default: STATE_DIR/audit.json, where reports find it)")
    p.set_defaults(func=handler("xrayfed.client.audit", "run_audit_cmd"))


def register_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export the global model (ONNX or TorchScript) for the hospital's own tools",
                       description="Write the checkpoint's model as ONNX or TorchScript with its preprocessing, "
                                   "classes and threshold as metadata; the file is verified against the "
                                   "checkpoint before it is kept.")
    add_model_argument(p, help="a global model checkpoint (RUN_DIR/checkpoints/...)", old_positional=True)
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"), help="file format to write")
    p.add_argument("--out", required=True, type=Path, help="file to write (mode 0600)")
    p.add_argument("--data", type=Path, help="verify on these scans (default: synthetic scans)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--int8", action="store_true",
                   help="static INT8 quantization calibrated on --data's training scans; refused when the macro "
                        "AUROC on its test (else val) split drops by more than 0.005")
    p.add_argument("--calibration-scans", type=int, default=None, metavar="N",
                   help="training scans to calibrate INT8 activation ranges on (default 300)")
    add_key_argument(p, help="key the checkpoint is encrypted with")
    p.set_defaults(func=handler("xrayfed.client.export", "run_export_cmd"))


def register_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="show where the model looked (Grad-CAM heatmap over a scan)",
                       description="For the hospital's clinicians (plaintext, hospital side only): a Grad-CAM "
                                   "heatmap over each scan for the predicted (or a chosen) class, with the "
                                   "probabilities. One scan: a PNG; several: an HTML page.")
    add_model_argument(p, help="a global model checkpoint")
    p.add_argument("--scan", required=True, type=Path, action="append", metavar="FILE",
                   help="PNG, JPEG or DICOM (repeatable)")
    p.add_argument("--out", required=True, type=Path, help="heatmap.png (one scan) or page.html")
    p.add_argument("--class", dest="class_name", metavar="NAME", help="explain this class (default: the prediction)")
    add_key_argument(p, help="key the checkpoint is encrypted with")
    p.set_defaults(func=handler("xrayfed.client.explain", "run_explain_cmd"))


def register_inference(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-inference", help="serve encrypted predictions of the federated model (gRPC + MPC)",
                       description="The hospital's encrypted-inference service: patients get predictions on "
                       "their scans without revealing them; the model's weights stay secret.")
    p.add_argument("--config", type=Path, help="TOML file with InferenceServiceConfig settings")
    add_model_argument(p, help="federated checkpoint to serve (or model in --config)", required=False)
    p.add_argument("--listen", help="gRPC address HOST:PORT (default 127.0.0.1:9443)")
    p.add_argument("--token-key", type=Path, action="append", help="trusted token public key (PEM; repeatable)")
    p.add_argument("--audience", help="token audience this service accepts (default xrayfed-inference)")
    p.add_argument("--cert", type=Path, help="TLS certificate of the service (PEM)")
    p.add_argument("--key", type=Path, help="TLS private key of the service (PEM)")
    a = p.add_argument("--crypto-provider", metavar="HOST:PORT",
                       help="the crypto provider's address (xrayfed serve-crypto-provider)")
    old_option(p, a, "--ttp")
    a = p.add_argument("--ca-cert", type=Path, metavar="FILE",
                       help="CA certificate that signed the crypto provider's TLS certificate")
    old_option(p, a, "--ttp-ca")
    a = p.add_argument("--crypto-provider-secret", type=Path, metavar="FILE",
                       help="file with the secret shared with the crypto provider")
    old_option(p, a, "--ttp-secret")
    a = p.add_argument("--crypto-provider-public", metavar="HOST:PORT",
                       help="the crypto provider's HOST:PORT as patients reach it (default: --crypto-provider)")
    old_option(p, a, "--ttp-public")
    p.add_argument("--session-timeout", type=float, help="seconds before a session is torn down (default 120)")
    p.add_argument("--max-sessions", type=int, help="concurrent MPC sessions (default 4)")
    p.add_argument("--audit-log", type=Path, help="JSON-lines audit log (default inference-audit.jsonl)")
    p.add_argument("--max-sessions-per-token", type=int, help="concurrent sessions one token may hold (default 1)")
    p.add_argument("--max-sessions-per-peer", type=int, help="concurrent sessions from one address (default 2)")
    p.add_argument("--join-timeout", type=float, help="seconds for the parties to join a session (default 30)")
    p.add_argument("--rate-per-hour", type=int, help="predictions per token per hour (default 30)")
    p.add_argument("--budget-per-token", type=int, help="predictions one token may ever get (default 200)")
    p.add_argument("--revoked-tokens", type=Path, help="file of revoked token ids (jti), one per line "
                                                       "(xrayfed token revoke adds to it)")
    p.add_argument("--allow-scans-without-patient-id", action="store_true", default=None,
                   help="also serve PNG/JPEG scans, which carry no patient identity (default: DICOM only)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS, towards patients and the crypto provider (local experiments only)")
    add_key_argument(p, help="decrypt a checkpoint encrypted at rest with this key")
    p.set_defaults(func=handler("xrayfed.client.inference.cli", "serve_cmd"))


def register_token(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("token", help="patients' access tokens for encrypted inference: make the signing key, "
                                     "issue, revoke",
                       description="Hospital staff: the Ed25519 key that signs patients' access tokens, the tokens "
                                   "themselves, and their revocation.")
    ts = p.add_subparsers(dest="token_command", metavar="ACTION")
    ts.required = True

    k = ts.add_parser("init-key", help="make the Ed25519 signing key pair (KEY and KEY.pub)",
                      description="Make the key pair that signs patients' tokens: KEY (mode 0600, stays with "
                                  "staff) and KEY.pub (give it to serve-inference --token-key).")
    k.add_argument("--signing-key", required=True, type=Path, metavar="KEY", help="signing key file to create")
    k.add_argument("--force", action="store_true", help="replace an existing key")
    k.set_defaults(func=handler("xrayfed.client.inference.cli", "token_init_key_cmd"))

    i = ts.add_parser("issue", help="sign a patient's access token",
                      description="Sign a token that lets one patient request predictions until it expires.")
    i.add_argument("--signing-key", required=True, type=Path, metavar="KEY",
                   help="Ed25519 signing key (PEM; from `xrayfed token init-key` or `xrayfed certs init`)")
    i.add_argument("--patient-id", required=True, help="the patient's id (the DICOM PatientID of their scans)")
    add_token_claims(i)
    i.add_argument("--out", type=Path, help="write the token to this file (mode 0600) instead of stdout")
    i.set_defaults(func=handler("xrayfed.client.inference.cli", "token_issue_cmd"))

    r = ts.add_parser("revoke", help="revoke a token: add its id to the service's revocation list",
                      description="Add a token's id (jti) to the revocation list that serve-inference "
                                  "--revoked-tokens reads; the service refuses the token from then on.")
    r.add_argument("token", metavar="TOKEN|FILE|JTI", help="the token, a file holding it, or its id (jti)")
    r.add_argument("--revocation-list", required=True, type=Path, metavar="FILE",
                   help="the revocation list file (serve-inference --revoked-tokens)")
    r.set_defaults(func=handler("xrayfed.client.inference.cli", "token_revoke_cmd"))

    t = sub.add_hidden_parser("issue-token", "token init-key, token issue or token revoke",
                              description="Old form of `xrayfed token init-key | issue | revoke`.")
    t.add_argument("--key", type=Path, help="Ed25519 signing key (PEM); with --init-key: file to create")
    t.add_argument("--init-key", action="store_true", help="create the signing key pair (KEY and KEY.pub) and exit")
    t.add_argument("--force", action="store_true", help="with --init-key: replace an existing key")
    t.add_argument("--patient-id", help="the patient's id (the DICOM PatientID of their scans)")
    add_token_claims(t)
    t.add_argument("--out", type=Path, help="write the token to this file (mode 0600) instead of stdout")
    t.add_argument("--revoke", metavar="TOKEN|FILE|JTI",
                   help="revoke a token instead: add its id to --revocation-list (serve-inference --revoked-tokens)")
    t.add_argument("--revocation-list", type=Path, help="with --revoke: the revocation list file")
    t.set_defaults(func=handler("xrayfed.client.inference.cli", "issue_token_cmd"))


def add_token_claims(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expires", default="24h", help="lifetime (90m, 12h, 30d) or ISO time (default 24h)")
    p.add_argument("--audience", default=None, help="service audience (default xrayfed-inference)")
    p.add_argument("--issuer", default=None, help="issuer name written into the token")


def register_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="get an encrypted prediction for your own chest X-ray",
                       description="Patients: get the federated model's prediction on your scan. The scan is "
                       "secret-shared; neither the hospital nor the crypto provider sees it or the result.")
    p.add_argument("--scan", type=Path, required=True, help="your scan: PNG, JPEG or DICOM file")
    p.add_argument("--service", required=True, metavar="HOST:PORT", help="the hospital's inference service")
    p.add_argument("--token", type=Path, required=True, help="your access token file (from the hospital)")
    p.add_argument("--ca-cert", type=Path, metavar="FILE", help="CA certificate of the service's TLS certificate "
                   "(default: the system's trusted CAs)")
    a = p.add_argument("--crypto-provider-ca-cert", type=Path, metavar="FILE",
                       help="CA certificate of the crypto provider's TLS certificate (default: --ca-cert); its "
                            "certificate must carry the name xrayfed-crypto-provider")
    old_option(p, a, "--ttp-ca-cert")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the service per request")
    p.add_argument("--json", action="store_true", help="print the result as JSON for software (keys: "
                   "docs/encrypted-inference.md)")
    p.add_argument("--html", type=Path, metavar="FILE", help="also write the result as a web page (mode 0600)")
    p.add_argument("--insecure", action="store_true", help="no TLS (local experiments only)")
    p.set_defaults(func=handler("xrayfed.client.patient", "predict_cmd"))
