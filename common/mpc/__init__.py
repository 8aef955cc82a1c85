"""CrypTen compatibility and the three MPC parties of an encrypted prediction — ONE module.

Every CrypTen workaround of this project lives here (tested by ``tests/test_mpc_compat.py``):

1. **Import shim.** CrypTen 0.4.1 imports ``torch.onnx._internal.registration``, which torch
   2.14 moved to ``torch.onnx._internal.torchscript_exporter.registration``; the old name is
   aliased in ``sys.modules`` before ``import crypten`` (:func:`import_crypten`).
2. **Model building.** ``crypten.nn.from_pytorch`` (ONNX export route) is broken on torch
   2.14; the encrypted model is built from ``crypten.nn`` modules by walking the same
   :func:`xrayfed.common.model.layer_plan` that builds the plaintext ``torch.nn`` model, inside
   ``crypten.nn.Sequential`` (module names ``0, 1, ...`` → state-dict keys identical to torch's)
   (:func:`build_crypten_model`). Weights are loaded with ``load_state_dict(strict=False)``
   (CrypTen's strict mode wants torch-internal metadata) after the key/shape check of
   :func:`xrayfed.common.checkpoint.load_weights`, and then every tensor is compared with the
   checkpoint, so a silently skipped key is impossible (:func:`load_crypten_weights`).
3. **Trusted third party, never "trusted first party".** CrypTen's default provider ``TFP``
   lets party 0 (here: the hospital) generate the Beaver triples itself and therefore open the
   patient's masked values. Every process sets ``crypten.cfg.mpc.provider = "TTP"`` before
   initialising, and :func:`assert_ttp_provider` refuses to run otherwise.
4. **TTP seeds from the OS CSPRNG.** CrypTen's ``TTPServer`` draws the per-party seeds with
   ``torch.randint`` from torch's *default generator*. Every worker forked from our warm zygote
   inherits the zygote's generator state, so every session's TTP would deal the *same* seeds —
   a party that learned them once (e.g. from an earlier session) would know every share of
   every triple. ``SecureTTPServer`` (:func:`secure_ttp_class`) draws them from
   ``os.urandom``; every worker also reseeds torch (:func:`fresh_process_randomness`).
5. **Rendezvous.** CrypTen reads ``RENDEZVOUS/WORLD_SIZE/RANK/DISTRIBUTED_BACKEND`` from the
   environment and calls ``torch.distributed.init_process_group(init_method=...)`` itself.
   :func:`party_session` instead hands it an explicit ``TCPStore`` (hosted by the hospital's
   party, bound to the MPC address only, on a port the OS picks), wrapped in a ``PrefixStore``
   keyed by the secret session id, and a session timeout for every gloo group; gloo is bound to
   the network interface that routes to the rendezvous host (``GLOO_SOCKET_IFNAME``), so in a
   deployment the MPC traffic uses the protected tunnel interface (see docs).

Parties (CrypTen ranks): ``0`` = the hospital's inference service (model owner; hosts the
rendezvous store; sends ``terminate`` to the TTP at the end), ``1`` = the patient (scan owner;
the only party that receives the logits: ``get_plain_text(dst=1)``), ``2`` = the crypto
provider's TTP (CrypTen's convention: the TTP is rank ``WORLD_SIZE``).

Protocol of one session (every party runs the same sequence):
``init`` → both build the encrypted model from the architecture; the hospital loads the
checkpoint and ``encrypt(src=0)`` secret-shares the weights (the patient's module only ever
holds shares) → ``cryptensor(scan, src=1)`` secret-shares the scan (the hospital only holds a
pseudo-random share) → encrypted forward pass → logits revealed to rank 1 only → the patient
applies sigmoid/softmax in plaintext (:func:`xrayfed.common.prediction.probabilities`).

The package: :mod:`~xrayfed.common.mpc.compat` (1–4), :mod:`~.session` (5, ranks, session
parameters), :mod:`~.parties` (the three parties and their worker processes), :mod:`~.pool`
(warm workers, watching a session), :mod:`~.sessions` (the session table both services use).
Importing this package imports nothing heavy (its names load on first use); CrypTen is imported on first use
(:func:`~.compat.import_crypten`), and by the worker pool's zygote (:mod:`~.preload`).
"""

import importlib

# The public API, loaded on first use (PEP 562): importing the package, or its numpy-only
# ``dealer`` module (the patient's process), must not import torch or CrypTen.
_API = {
    "compat": ("_NEW_REGISTRATION", "_OLD_REGISTRATION", "CRYPTEN_VERSION", "PROVIDER", "assert_ttp_provider",
               "build_crypten_model", "fresh_process_randomness", "import_crypten", "load_crypten_weights",
               "provider", "use_link_communicator", "use_ttp_provider", "warnings_quiet"),
    "parties": ("input_shape", "model_owner_worker", "patient_contributions", "provider_worker", "record_tape",
                "run_local_session", "run_party", "session_tag", "shared_input_shape"),
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
