"""CrypTen compatibility and the parties of an encrypted prediction.

Every CrypTen workaround of this project lives in :mod:`~.compat` (tested by
``tests/test_mpc_compat.py``): the import shim (torch 2.14 moved an ONNX module CrypTen
imports), the model built from the same :func:`xrayfed.common.model.layer_plan` as the plaintext
one (``from_pytorch`` is broken), the dealt provider in the ``TTP`` slot (never ``TFP``), and
:func:`~.compat.use_link_communicator`, which replaces CrypTen's torch.distributed/gloo
communicator with :class:`~.channel.Link` over TLS.

Parties: rank ``0`` = the hospital's inference service (model owner), rank ``1`` = the crypto
provider (``serve-crypto-provider``); the patient is no CrypTen rank: it shares its scan, deals
the correlated randomness of the whole forward pass from the public tape and adds the two
re-randomised output shares, in numpy (:mod:`~.dealer`).

Protocol of one session: the hospital's party connects to the crypto provider's (TLS,
certificate name ``xrayfed-crypto-provider``, then the session's hospital key) → pairwise PRZS
seeds over the link → the weights are secret-shared (``encrypt(src=0)``) → each party receives
the patient's share of the (input-pooled) scan and its seed (the crypto provider also the
corrections) → encrypted forward pass, each triple request checked against the tape → each
party's share of the logits plus a fresh sharing of zero goes back to the patient.

The package: :mod:`~.dealer` (the patient's part; numpy only), :mod:`~.channel` (the TLS link
and the CrypTen communicator), :mod:`~.compat`, :mod:`~.session` (ranks, session parameters),
:mod:`~.parties` (the two parties, their worker processes, the tape, a local session),
:mod:`~.pool` (warm workers, watching a session), :mod:`~.sessions` (the session table both
services use). Importing this package imports nothing heavy (its names load on first use);
CrypTen is imported on first use (:func:`~.compat.import_crypten`) and by the worker pool's
zygote (:mod:`~.preload`).
"""

import importlib

# The public API, loaded on first use (PEP 562): importing the package, or its numpy-only
# ``dealer`` module (the patient's process), must not import torch or CrypTen.
_API = {
    "compat": ("_NEW_REGISTRATION", "_OLD_REGISTRATION", "CRYPTEN_VERSION", "PROVIDER", "assert_ttp_provider",
               "build_crypten_model", "fresh_process_randomness", "import_crypten", "load_crypten_weights",
               "provider", "use_link_communicator", "use_ttp_provider", "warnings_quiet"),
    "parties": ("model_owner_worker", "provider_worker", "record_tape",
                "run_local_session", "run_party", "session_tag", "shared_input_shape", "front_of"),
    "pool": ("WorkerPool", "stop_worker", "wait_message", "watch_worker"),
    "session": ("MODEL_OWNER_RANK", "PROVIDER_RANK", "WORLD_SIZE", "SessionParams", "comm_stats"),
    "sessions": ("SessionTable",),
}
_WHERE = {name: mod for mod, names in _API.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'xrayfed.common.mpc' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"xrayfed.common.mpc.{mod}"), name)
    globals()[name] = value
    return value
