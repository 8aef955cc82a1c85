"""Where every differential-privacy guarantee of a hospital is enforced. Read this first.

Guarantee: each hospital's model updates, over the whole federation run, are
(ε, δ)-differentially private with respect to each of its training *patients* (add/remove one
patient with all of their scans) whenever its data knows its patients — or, where the hospital
chose ``[privacy] unit = "scan"``, each training scan — for the (ε, δ) in the hospital's own
``hospital.toml``, whatever the server asks for. How (one module per mechanism):

* **The unit** (:mod:`~xrayfed.client.dp.units`): :func:`privacy_units` gives DP-SGD the
  hospital's patients (:class:`PatientUnits`: a sampled patient contributes the mean gradient of
  up to ``max_scans_per_patient`` of their scans, clipped to C, so one patient moves a step's
  pre-noise sum by at most C) or its scans; data without patient ids is refused unless the
  hospital chose the scan unit. N, q = B/N and δ < 1/N count the unit (:func:`plan_for`).
* **Budget owned by the hospital.** ε, δ, C (clip norm), batch size, local epochs and the
  number of rounds the budget is planned for come only from the hospital's config
  (:class:`~xrayfed.common.config.HospitalConfig`; planning in :mod:`~xrayfed.client.dp.planning`). The server's round config carries the
  learning rate and FedProx μ, never a privacy parameter. Left unset, batch size and local
  epochs are derived here from the hospital's own N and ε (:func:`auto_training`), never
  from anything the server sends, and recorded in the ledger's budget line.
* **σ derived from the budget.** :func:`plan_dp` picks the noise multiplier σ so that
  ``max_rounds`` rounds of ``steps`` DP-SGD steps at Poisson sample rate q = B/N stay within
  (ε, δ) under the PRV accountant (RDP selectable), checked again by composing round by round.
* **Spend written before training, refusal before spending.** :class:`PrivacyLedger`
  (:mod:`~xrayfed.client.dp.ledger`) is the
  hospital's persistent privacy state: JSON lines in a keyed hash chain (HMAC-SHA256 under the
  hospital's ledger key, :mod:`xrayfed.common.privacy.ledger`; one ``train`` line per round: round,
  steps, q, σ, C, ε at δ). Before a round trains, the ε after that round is computed from the
  whole ledger history; if it would exceed ε, the round is refused (nothing trains, nothing
  leaves). Otherwise the spend is appended and fsync'ed *before* training starts, so a crash
  can only over-count, never under-count. ε is cumulative over the whole run and survives
  restarts because it is recomputed from the ledger each time.
* **Every released update is charged once** (``xrayfed.client.hospital.train_round``). After
  training, the update's SHA-256 digest is recorded in a ``release`` line (fsync'ed) *before*
  the reply leaves, naming the ``train`` line that paid for it. A repeated request (same
  federation, round and global model: e.g. a server crash and resume, or a curious server
  replaying it) gets the byte-identical update again from the release cache — post-processing,
  no new spend — or, when that copy is gone, unreadable or altered, a refusal naming why;
  never a retrain. A request charged but never released (the hospital crashed while training)
  retrains under the spend already recorded, and exactly the plan that line charged (σ, q,
  steps, C: ``xrayfed.client.hospital.charged_plan``), whatever ``hospital.toml`` says after
  the restart. The whole decision runs under an exclusive lock
  on the state folder (:class:`StateLock`), so two concurrent requests cannot both use one
  charge. ``xrayfed report`` shows releases against charges and flags any release without its
  own charge.
* **A refused request costs nothing** (``xrayfed.client.hospital.check_request`` and
  ``checked_model``, before the charge): the round's settings (learning rate, FedProx μ, scan
  size within ``[hospital] max_*``), a model spec that names no file, and a global model with
  the architecture's names, shapes and dtypes and finite values. A server cannot spend a
  hospital's budget with requests the hospital would never train on.
* **Tamper-evident ledger.** Editing a line or re-chaining the file needs the ledger key;
  removing lines from the end is caught by the head anchor (``privacy-ledger.head``) and, if
  that is rolled back too, by the head the server recorded after the hospital's last reply,
  which it sends back with the next round: the hospital then refuses to train
  (``ledger.check_anchor``). The server's anchor never moves backwards
  (``xrayfed.server.strategy.ledger_anchors``), so the refusal lasts until the ledger is restored. With an at-rest key, every line must be encrypted.
* **Plans that cannot give a meaningful guarantee are refused before work starts**
  (:func:`plan_dp`, also run by ``xrayfed client`` before joining): δ ≥ 1/N, a budget no σ can
  meet, a plan longer than the accountant composes.
* **Per-unit clipping and Gaussian noise** by Opacus (:mod:`~xrayfed.client.dp.engine`) (``GradSampleModule`` + a
  ``DPOptimizer``), Poisson sampling with rate q, memory bounded by ``BatchMemoryManager``.
* **Noise source** (:mod:`~xrayfed.client.dp.noise`). Opacus' ``secure_mode`` needs torchcsprng, which has no build for this
  torch. With ``secure_rng = true`` (default) the Gaussian noise is drawn from a
  cryptographically secure generator instead: AES-256-CTR keystream keyed from ``os.urandom``
  per step, Box–Muller in float64, and — as Opacus' secure mode does against floating-point
  attacks — the sum of 4 samples scaled by 1/2. The Poisson batch sampler is seeded from
  ``os.urandom`` but uses torch's (non-cryptographic) generator; the ledger and reports say
  ``secure_mode: false`` because Opacus' own secure mode is not used.
* **Measured, not only computed** (``xrayfed audit``, :mod:`xrayfed.client.audit`): the plan is
  trained once more with white-box gradient canaries passed through this package's own clipping,
  noise and sampling, giving an empirical lower bound on ε (and a check of the accountant's inputs)
  to compare with the claimed ε; nothing is charged. Its teeth are deliberate faults
  (:mod:`~xrayfed.client.dp.faults`: noise × 0.1, no clipping, the accountant told q/2) that only a
  benchmark or a test can inject; with none injected every fault hook is the identity.
"""

from xrayfed.client.dp.engine import average_views, make_private, train_private_round
from xrayfed.client.dp.ledger import PrivacyLedger, ReleaseCache, StateLock, request_key, update_digest
from xrayfed.client.dp.noise import (
    NOISE_SOURCE_SECURE,
    NOISE_SOURCE_TORCH,
    csprng_standard_normal,
    secure_gaussian_like,
)
from xrayfed.client.dp.planning import (
    AUTO_BATCH,
    AUTO_EPOCHS,
    AUTO_MIN_ROUNDS,
    MAX_PLANNED_STEPS,
    BudgetExceeded,
    DPPlan,
    auto_training,
    plan_dp,
)
from xrayfed.client.dp.units import PatientUnits, plan_for, privacy_units, resolve_unit
from xrayfed.common.privacy.accounting import compute_epsilon

__all__ = [
    "AUTO_BATCH", "AUTO_EPOCHS", "AUTO_MIN_ROUNDS", "MAX_PLANNED_STEPS", "NOISE_SOURCE_SECURE", "NOISE_SOURCE_TORCH",
    "BudgetExceeded", "DPPlan", "PatientUnits", "PrivacyLedger", "ReleaseCache", "StateLock", "auto_training",
    "average_views", "compute_epsilon", "csprng_standard_normal", "make_private", "plan_dp", "plan_for",
    "privacy_units", "request_key", "resolve_unit", "secure_gaussian_like", "train_private_round", "update_digest",
]
