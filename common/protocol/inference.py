"""What the encrypted-inference parties say to each other over gRPC (JSON messages,
:mod:`xrayfed.common.rpc`): service and method names, and the header that carries the secret
the hospital's service shares with the crypto provider. Both sides import these names from here.

Inference service (the hospital's ``serve-inference``; the patient's ``predict`` calls it):

* ``ModelInfo {token}`` → ``{model, image_size, task: {kind, class_names}, model_version}``
* ``OpenSession {token, scan: {image_size, channels, format, dicom_patient_id|null}}`` →
  ``{session_id, rendezvous: {host, port}, rank, world_size, timeout_s, model, image_size, task,
  model_version}``
* ``Health {}`` → ``{ok, sessions, model_version}``

Crypto provider (``serve-ttp``; only the inference service calls it, with the shared secret):

* ``StartSession {session_id, host, port, timeout_s}`` → ``{ok: true}``
* ``Health {}`` → ``{ok, sessions}``
"""

from __future__ import annotations

INFERENCE_SERVICE = "xrayfed.inference.v1.Inference"
MODEL_INFO, OPEN_SESSION, HEALTH = "ModelInfo", "OpenSession", "Health"

TTP_SERVICE = "xrayfed.ttp.v1.TTP"
START_SESSION = "StartSession"
TTP_SECRET_HEADER = "x-xrayfed-ttp-secret"
