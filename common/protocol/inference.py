"""What the encrypted-inference parties say to each other over gRPC (:mod:`xrayfed.common.rpc`):
service and method names, and the header that carries the secret the hospital's service shares
with the crypto provider. Both sides import these names from here.

Inference service (the hospital's ``serve-inference``; the patient's ``predict`` calls it):

* ``ModelInfo {token}`` → ``{model, image_size, task: {kind, class_names}, model_version,
  threshold, performance, mpc: {tape, tape_digest, input_pool, scattering, scale_bits}}``;
  ``performance`` is ``{split, scans, classes: {name: {sensitivity, specificity, with, without}}}``
  measured on held-out scans (:func:`xrayfed.common.prediction.measured_performance`) or ``null``
* ``OpenSession {token, scan: {image_size, channels, format, dicom_patient_id|null}}`` →
  ``{session_id, crypto_provider: {address, server_name}, timeout_s, model, image_size, task,
  model_version, mpc}``
* ``Evaluate`` (binary frame) ``{token, session_id} + {x: int64 share, seed: 16 bytes}`` →
  ``{shape} + {y: int64 share of the logits}``
* ``Health {}`` → ``{ok, sessions, model_version}``

Crypto provider (``serve-crypto-provider``):

* ``StartSession {session_id, hospital_key, model, image_size, tape, timeout_s, join_timeout_s}``
  → ``{host, port}`` (only the inference service calls it, with the shared secret)
* ``Evaluate`` (binary frame, from the patient) ``{session_id} + {x, seed, corrections}`` →
  ``{shape} + {y}``
* ``Health {}`` → ``{ok, sessions}``
"""

from __future__ import annotations

INFERENCE_SERVICE = "xrayfed.inference.v1.Inference"
MODEL_INFO, OPEN_SESSION, EVALUATE, HEALTH = "ModelInfo", "OpenSession", "Evaluate", "Health"

CRYPTO_PROVIDER_SERVICE = "xrayfed.crypto_provider.v1.CryptoProvider"
CRYPTO_PROVIDER_NAME = "xrayfed-crypto-provider"  # the TLS name every crypto provider certificate carries
START_SESSION = "StartSession"
CRYPTO_PROVIDER_SECRET_HEADER = "x-xrayfed-crypto-provider-secret"
