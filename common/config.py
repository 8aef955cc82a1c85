"""Configuration: one pydantic model per role, loaded from TOML, CLI flags override.

* :class:`FederationConfig` — the operator's ``federation.toml`` (server).
* :class:`HospitalConfig` — a hospital's ``hospital.toml`` (client). The hospital's privacy
  budget lives here and only here: nothing the server sends can change it.

An invalid value is refused before any work starts with one line naming the field, the value
and what is allowed (:func:`format_validation_error`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xrayfed.common.addresses import split_hostport
from xrayfed.common.cli_args import warn_deprecated
from xrayfed.common.errors import UserError
from xrayfed.common.modelspec import ModelSpec
from xrayfed.common.prediction import TaskSpec
from xrayfed.common.preprocess import MAX_IMAGE_SIZE  # the one bound of a model input side (px)

T = TypeVar("T", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- shared pieces
class TLSConfig(_Strict):
    """TLS material for gRPC/HTTP channels. ``insecure = true`` is for local experiments only."""

    insecure: bool = False
    ca_cert: Path | None = Field(None, description="PEM CA certificate that signs the server certificate")
    cert: Path | None = Field(None, description="PEM certificate of this party (servers)")
    key: Path | None = Field(None, description="PEM private key of this party (servers)")


# --------------------------------------------------------------------------- server role
class FederationSection(_Strict):
    name: str = "xrayfed"
    run_dir: Path = Field(Path("runs/xrayfed"), description="checkpoints, metrics.jsonl, reports")
    rounds: int = Field(5, ge=1, le=10_000)
    min_clients: int = Field(2, ge=1, description="wait for this many hospitals before a round")
    fraction_train: float = Field(1.0, gt=0.0, le=1.0, description="share of connected hospitals per round")
    strategy: Literal["auto", "fedavg", "fedavgm", "fedprox", "fedadam"] = Field(
        "auto", description="auto (the default: FedAvgM, its server momentum and lr chosen every round from the DP "
                            "noise of the mean update, docs/training.md) | fedavgm (server momentum) | fedavg | "
                            "fedprox | fedadam")
    proximal_mu: float = Field(0.01, ge=0.0, description="FedProx μ (strategy = fedprox)")
    server_lr: float | None = Field(None, gt=0.0, description="server learning rate η (fedavgm: default 1.0; "
                                                              "fedadam: default 0.1)")
    server_momentum: float = Field(0.5, ge=0.0, lt=1.0, description="server momentum β (strategy = fedavgm)")
    lr: float = Field(0.125, gt=0.0, description="client learning rate sent with each round (SGD, momentum 0.9; "
                                                 "chosen on validation sweeps under DP-SGD at ε = 1 and 8, "
                                                 "docs/accuracy.md)")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="client learning rate over rounds")
    lr_final_fraction: float = Field(0.1, ge=0.0, le=1.0, description="cosine: last round's lr as a fraction of lr")
    round_timeout_s: float = Field(3600.0, gt=0.0)
    join_timeout_s: float = Field(600.0, gt=0.0, description="seconds a round waits for min_clients hospitals to be "
                                                            "connected; then the run stops (resumable)")
    max_update_norm: float = Field(1e3, gt=0.0, description="an update farther than this from the global model "
                                                            "(L2 over all weights) is rejected as malformed")
    max_examples_per_hospital: int = Field(100_000, ge=1, description="the largest FedAvg weight (num-examples) "
                                                                       "one hospital may claim; a hospital's weight "
                                                                       "is also capped at the N of its first reply")
    aggregator: Literal["mean", "median", "trimmed_mean"] = Field(
        "mean", description="mean (example-weighted, FedAvg) | median | trimmed_mean (coordinate-wise, "
                            "unweighted: robust to a hospital that poisons its update; not with SecAgg+)")
    trim_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="trimmed_mean: share of the largest and of "
                                                                  "the smallest values dropped per coordinate")
    secure_aggregation: bool = Field(False, description="Flower SecAgg+: the server sees only the sum of updates")
    initial_model: Path | None = Field(None, description="xrayfed checkpoint to start from (round-0 global model), "
                                                         "e.g. one trained on public data: the strongest lever for "
                                                         "accuracy under DP; same architecture, the head may differ")
    seed: int = 0

    @model_validator(mode="after")
    def _robust_needs_the_updates(self) -> "FederationSection":
        if self.aggregator != "mean" and self.secure_aggregation:
            raise ValueError(f"aggregator = {self.aggregator!r} needs each hospital's update, but under "
                             "secure_aggregation the server sees only their sum; use aggregator = \"mean\"")
        return self

    def effective_server_lr(self) -> float:
        """``server_lr``, or the strategy's default (1.0 for fedavgm, 0.1 for fedadam)."""
        return self.server_lr if self.server_lr is not None else (0.1 if self.strategy == "fedadam" else 1.0)


class ServerNetwork(_Strict):
    listen: str = Field("127.0.0.1:9092", description="address HOST:PORT hospitals dial: xrayfed's Fleet-only "
                                                     "gateway in front of the SuperLink (the only public port)")
    control: str = Field("127.0.0.1:0", description="the SuperLink itself HOST:PORT (Fleet + Control + Runtime "
                                                    "API; operator only, never exposed); port 0 = a free port")
    tls: TLSConfig = TLSConfig()
    supernode_auth: bool | None = Field(
        None, description="only registered hospital keys may connect. Unset (default): on whenever TLS is on "
                          "(listing hospital_keys is all it takes); false: an explicit opt-out, logged as a "
                          "warning at every start; --insecure (no TLS) runs without it")
    hospital_keys: list[Path] = Field(default_factory=list, description="public keys registered at start")

    @property
    def auth_enabled(self) -> bool:
        """Whether the SuperLink authenticates hospitals (see ``supernode_auth``)."""
        return not self.tls.insecure and self.supernode_auth is not False

    @model_validator(mode="after")
    def _auth_consistent(self) -> "ServerNetwork":
        n = len(self.hospital_keys)
        if n and self.supernode_auth is False:
            raise ValueError(f"supernode_auth = false while hospital_keys lists {n} key(s): registered keys mean "
                             "hospital authentication; remove supernode_auth = false (or the keys)")
        if n and self.tls.insecure:
            raise ValueError(f"hospital_keys lists {n} key(s) but TLS is off (--insecure / tls.insecure): "
                             "hospital authentication needs TLS; drop --insecure for this config")
        if self.supernode_auth and self.tls.insecure:
            raise ValueError("supernode_auth = true needs TLS; remove --insecure / tls.insecure")
        return self

    @field_validator("control")
    @classmethod
    def _control_is_local(cls, v: str) -> str:
        host, _ = split_hostport(v, allow_port_zero=True)
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the SuperLink's own port (Control + Runtime API: anyone reaching it can register "
                             "hospital keys and submit runs) must stay on a loopback address such as 127.0.0.1")
        return v


class SecureAggregationSection(_Strict):
    """Flower SecAgg+ parameters (used when ``[federation] secure_aggregation = true``).

    The server turns it into :class:`xrayfed.server.secagg.SecAggPlusConfig`
    (``SecAggPlusConfig.from_section``); see ``docs/secure-federation.md``.
    """

    num_shares: float = Field(1.0, gt=0.0, description="neighbourhood size k per hospital (itself included): an "
                                                       "integer ≥ 2, or a fraction ≤ 1 of the sampled hospitals")
    reconstruction_threshold: float = Field(1.0, gt=0.0, description="shares t needed to rebuild a secret: an "
                                                                     "integer ≥ 2, or a fraction ≤ 1 of num_shares")
    clipping_range: float = Field(8.0, gt=0.0, le=1e6, description="weighted update values are clipped to ±this")
    quantization_range: int = Field(2**22, ge=2, description="quantisation levels over ±clipping_range")
    modulus_range: int = Field(2**32, description="masks are uniform modulo this (power of two, ≤ 2**32)")
    max_weight: float = Field(100_000.0, gt=0.0, description="largest num-examples a hospital may report; set "
                                                             "it near the largest hospital's count (precision)")
    mode: Literal["delta", "weights"] = Field("delta", description="mask local − global (delta) or the weights")

    @model_validator(mode="after")
    def _consistent(self) -> "SecureAggregationSection":
        for name in ("num_shares", "reconstruction_threshold"):
            v = getattr(self, name)
            if v > 1.0 and v != int(v):
                raise ValueError(f"{name} = {v:g}: use an integer ≥ 2 or a fraction ≤ 1")
        if self.num_shares > 1.0 and self.num_shares < 2:
            raise ValueError("num_shares must be at least 2 (or a fraction ≤ 1)")
        if self.reconstruction_threshold > 1.0 and self.num_shares > 1.0 \
                and self.reconstruction_threshold > self.num_shares:
            raise ValueError(f"reconstruction_threshold {self.reconstruction_threshold:g} exceeds num_shares "
                             f"{self.num_shares:g}")
        m = self.modulus_range
        if m < 2 or m > 2**32 or m & (m - 1):
            raise ValueError(f"modulus_range = {m}: must be a power of two ≤ 2**32")
        if self.quantization_range >= m:
            raise ValueError(f"quantization_range {self.quantization_range} must be below modulus_range {m}")
        return self


class EvalData(_Strict):
    path: Path | None = Field(None, description="held-out data for server-side evaluation")
    split: str = "test"
    test_fraction: float = Field(0.0, ge=0.0, lt=0.9, description="`path` with no test split of its own (flat "
                                 "ROOT/CLASS folders, NIH without its lists): share of the patients carved as the "
                                 "test split (the hospitals sharing `path` must set the same data.local_test_fraction)")
    val_split: str | None = Field(None, description="split of `path` that no hospital trains on, on which the "
                                                   "server picks the decision threshold stored with each global "
                                                   "model (e.g. \"val\"); unset: threshold 0.5")

    @model_validator(mode="after")
    def _threshold_split_is_not_the_test_split(self) -> "EvalData":
        # The patient is told the model's sensitivity/specificity on `split` as scans it was never tuned
        # on: the threshold picked on those very scans would make that figure a flattering one.
        if self.val_split is not None and self.val_split == self.split:
            raise ValueError(f"val_split = {self.val_split!r} is the test split: the decision threshold must be "
                             "picked on scans other than those its sensitivity/specificity are measured on "
                             "(e.g. split = \"test\", val_split = \"val\")")
        return self


class FederationConfig(_Strict):
    """The operator's configuration (``federation.toml``)."""

    federation: FederationSection = FederationSection()
    model: ModelSpec = Field(None, validate_default=False,  # type: ignore[assignment]
                             description="the architecture; no [model] section: the recommended XrayNet for "
                                         "image_size (common.model.default_model)")
    task: TaskSpec = TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA"))
    image_size: int = Field(224, ge=8, le=2048, description="scans are resized to image_size × image_size px")
    eval: EvalData = EvalData()
    network: ServerNetwork = ServerNetwork()
    secure_aggregation: SecureAggregationSection = SecureAggregationSection()

    @model_validator(mode="after")
    def _outputs_match_task(self) -> "FederationConfig":
        if self.model is None:
            from xrayfed.common.modelspec import default_model

            object.__setattr__(self, "model", default_model(self.image_size, self.task.num_outputs))
        if self.model.num_outputs != self.task.num_outputs:
            object.__setattr__(self, "model", self.model.model_copy(update={"num_outputs": self.task.num_outputs}))
        return self

    @model_validator(mode="after")
    def _secagg_needs_two(self) -> "FederationConfig":
        if self.federation.secure_aggregation and self.federation.min_clients < 2:
            raise ValueError("federation.secure_aggregation needs min_clients ≥ 2 (the sum of one hospital's "
                             "update is that update)")
        return self


# --------------------------------------------------------------------------- hospital role
#: The most a round request may ask of a hospital (``[hospital] max_*`` may only lower them).
MAX_SERVER_LR = 10.0
MAX_PROXIMAL_MU = 10.0
MAX_MODEL_PARAMETERS = 50_000_000

class HospitalSection(_Strict):
    name: str = Field("hospital", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    state_dir: Path = Field(Path("hospital-state"), description="privacy ledger, cached updates")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    require_secure_aggregation: bool = Field(
        False, description="train only under SecAgg+: plain (unmasked) training requests are refused")
    # What a round request may ask of this hospital; checked before anything is charged (a refused
    # request costs no ε). The defaults are the most the project accepts; a hospital may tighten them.
    max_server_lr: float = Field(MAX_SERVER_LR, gt=0.0, le=MAX_SERVER_LR,
                                 description="largest client learning rate a round request may set")
    max_proximal_mu: float = Field(MAX_PROXIMAL_MU, ge=0.0, le=MAX_PROXIMAL_MU,
                                   description="largest FedProx μ a round request may set")
    max_image_size: int = Field(MAX_IMAGE_SIZE, ge=8, le=MAX_IMAGE_SIZE,
                                description="largest scan size (px) a round request may ask for")
    max_model_parameters: int = Field(MAX_MODEL_PARAMETERS, ge=1, le=MAX_MODEL_PARAMETERS,
                                      description="largest global model (weights) a round request may send")
    warm_worker: bool = Field(True, description="run every round in one long-lived process that keeps torch, the "
                                                "decoded scans and the DP engine between rounds (false: a fresh "
                                                "process per message, as Flower does by default)")
    poll_interval_s: float = Field(0.5, ge=0.05, le=60.0,
                                   description="seconds between the SuperNode's requests for work while none is "
                                               "waiting (Flower's own: 3 s); each is one small HTTPS request to the "
                                               "server, docs/secure-federation.md")
    fork_clientapps: bool = Field(True, description="fork each message's ClientApp process from a fork server that "
                                                    "has Flower and the ClientApp imported (false: Flower starts a "
                                                    "new interpreter per message)")
    ledger_key_file: Path | None = Field(
        None, description="key of the privacy ledger's HMAC chain (default: derived from the at-rest key when "
                          "one is set, else state_dir/ledger.key, created on first use); keep it where the "
                          "people who can edit state_dir cannot read it")


class DataSection(_Strict):
    path: Path | None = Field(None, description="the hospital's scans (class folders, NIH CSV, .npz, DICOM)")
    split: str = "train"
    val_fraction: float = Field(0.1, ge=0.0, lt=0.9, description="share of the training split's patients held out "
                                "for validation: the metrics this hospital sends when the server has no test set "
                                "of its own (never used for DP training or the decision threshold)")
    local_test_fraction: float = Field(0.0, ge=0.0, lt=0.9, description="data with no test split of its own (flat "
                                       "ROOT/CLASS folders, NIH without its lists): share of the patients kept out "
                                       "as a local test split; 0 = every scan trains (the federation's test set is "
                                       "the server's)")
    labels: list[str] | None = Field(None, min_length=1, description="the classes (class folders, labels.csv, "
                                     ".npz) or NIH findings this hospital trains; unset: all the data holds")
    partition: str | None = Field(None, pattern=r"^\d+/\d+$",
                                  description="'i/n': use part i of n (demos, benchmarks: hospitals sharing one "
                                              "folder); only this part's files are decoded, and the parts are of "
                                              "the listed files")
    partition_scheme: Literal["iid", "dirichlet", "patient"] = "iid"
    dirichlet_alpha: float = Field(0.5, gt=0.0)
    size_skew: float = Field(0.0, ge=0.0, le=4.0, description="iid partitions of unequal size (simulations): part "
                                                               "k gets a share ∝ (k + 1)^−size_skew; 0 = equal")
    seed: int = 0
    num_workers: int = Field(0, ge=0)

    @field_validator("labels")
    @classmethod
    def _known_labels(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len({x.upper() for x in v}) != len(v):
            raise ValueError(f"labels {v}: each label once")
        return v

    @model_validator(mode="after")
    def _skew_needs_iid(self):
        if self.size_skew > 0 and self.partition_scheme != "iid":
            raise ValueError(f"size_skew {self.size_skew:g} applies to partition_scheme 'iid' only, "
                             f"not {self.partition_scheme!r}")
        return self


class PrivacySection(_Strict):
    """The hospital's differential-privacy budget for the whole federation run."""

    epsilon: float = Field(8.0, gt=0.0, le=100.0, description="total ε budget for the whole federation run")
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="δ of the (ε, δ) guarantee; must be below 1/N (N: "
                                                            "this hospital's training scans), checked at start")
    max_rounds: int = Field(5, ge=1, le=10_000, description="rounds the budget is planned for; σ is derived so "
                                                              "they fit")
    max_grad_norm: float = Field(1.0, gt=0.0, description="per-sample gradient clip norm C (L2)")
    noise_multiplier: float | None = Field(None, gt=0.0, description="σ; derived from the budget when unset")
    accountant: Literal["prv", "rdp"] = "prv"
    secure_rng: bool = Field(True, description="draw DP noise from the OS CSPRNG (os.urandom)")
    unit: Literal["patient", "scan"] | None = Field(
        None, description="what the (ε, δ) guarantee protects: a patient (all of their scans together) or one "
                          "scan. Unset: patient whenever the data carries patient identities; data without them "
                          "is refused until they are given or unit = \"scan\" is set")
    max_scans_per_patient: int = Field(2, ge=1, le=32, description="unit = patient: scans of a sampled patient "
                                                                   "whose gradients are averaged into the "
                                                                   "patient's one contribution (norm ≤ C) per step "
                                                                   "(2: about the compute of the scan unit, "
                                                                   "docs/decisions.md)")


class TrainingSection(_Strict):
    """How a hospital trains. Leave ``batch_size`` and ``local_epochs`` unset and the hospital
    derives them from its own N and budget (:func:`xrayfed.client.dp.auto_training`)."""

    local_epochs: float | None = Field(None, gt=0.0, le=100.0, description="passes over local data per round; "
                                                                          "unset: derived from ε and max_rounds (auto)")
    batch_size: int | None = Field(None, ge=1, description="expected logical batch (Poisson sampling q = B/N); "
                                                         "unset: derived from N (auto)")
    max_physical_batch_size: int = Field(32, ge=1, description="memory cap per forward pass")
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    augment_multiplicity: int = Field(1, ge=1, le=32, description="K augmented views of each sampled scan, "
                                                                  "their gradients averaged before clipping "
                                                                  "(De et al. 2022); 1 = off")
    augment: bool = Field(False, description="train on one randomly transformed view of every sampled scan "
                                             "(the ranges below); implied by augment_multiplicity > 1")
    augment_shift: float = Field(0.0625, ge=0.0, le=0.25, description="augmentation: random translation up to "
                                                                       "this fraction of the image side")
    augment_zoom: float = Field(0.0, ge=0.0, le=0.5, description="augmentation: random zoom factor in "
                                                                  "[1 − z, 1 + z]; 0 = off")
    augment_aspect: float = Field(0.0, ge=0.0, le=0.5, description="augmentation: random aspect change, width "
                                                                    "× s and height ÷ s with s in [1/(1 + a), "
                                                                    "1 + a] (log-uniform); 0 = off")
    augment_rotate: float = Field(0.0, ge=0.0, le=30.0, description="augmentation: random rotation up to this many "
                                                                     "degrees either way; 0 = off")
    augment_contrast: float = Field(0.0, ge=0.0, le=0.5, description="augmentation: random contrast factor in "
                                                                      "[1 − c, 1 + c] about the scan's mean and "
                                                                      "brightness offset up to ±c (input units, "
                                                                      "range [−1, 1]); 0 = off")
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0, description="release the exponential moving average of the "
                                                              "round's DP-SGD iterates (post-processing); 0 = off")


class HospitalConfig(_Strict):
    """A hospital's configuration (``hospital.toml``)."""

    hospital: HospitalSection = HospitalSection()
    data: DataSection = DataSection()
    privacy: PrivacySection = PrivacySection()
    training: TrainingSection = TrainingSection()

    @field_validator("training")
    @classmethod
    def _phys(cls, v: TrainingSection) -> TrainingSection:
        return v


# --------------------------------------------------------------------------- loading
def format_validation_error(err: ValidationError, source: str | None = None) -> str:
    """One line: ``<source>: <field>: <problem> (got <value>)`` for the first error (+N more)."""
    errs = err.errors()
    first = errs[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(root)"
    msg = first["msg"]
    if first.get("type") == "extra_forbidden":
        msg = "unknown setting (check spelling; see README for the allowed keys)"
    got = first.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    more = f" [+{len(errs) - 1} more]" if len(errs) > 1 else ""
    where = f"{source}: " if source else ""
    return f"{where}{loc}: {msg}{got_s}{more}"


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise UserError(f"override {dotted}: {k} is not a section")
    d[keys[-1]] = value


def load_config(cls: type[T], path: Path | str | None, overrides: dict[str, Any] | None = None) -> T:
    """Load ``cls`` from a TOML file (or defaults when ``path`` is None), then apply ``overrides``.

    ``overrides`` maps dotted keys (``privacy.epsilon``) to values; ``None`` values are ignored,
    so argparse defaults of ``None`` mean "not given". Errors are one-line :class:`UserError`.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise UserError(f"config: no file at {p}")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{p}: not valid TOML ({e})") from None
    for k, v in (overrides or {}).items():
        if v is not None:
            _set_dotted(raw, k, v)
    try:
        cfg = cls.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source)) from None
    if path is not None:
        cfg = _resolve_paths(cfg, Path(path).resolve().parent)
    return cfg


def _resolve_paths(model: BaseModel, base: Path):
    """Relative paths in a config file are relative to the file's folder."""
    updates = {}
    for name, value in model:
        if isinstance(value, Path) and not value.is_absolute():
            updates[name] = base / value
        elif isinstance(value, list) and value and all(isinstance(x, Path) for x in value):
            updates[name] = [x if x.is_absolute() else base / x for x in value]
        elif isinstance(value, BaseModel) and not isinstance(value, (ModelSpec, TaskSpec)):
            updates[name] = _resolve_paths(value, base)
    return model.model_copy(update=updates) if updates else model


def dump_toml(cfg: BaseModel) -> str:
    """Serialise a config back to TOML (for run directories and generated demo configs)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines: list[str] = []

    def walk(d: dict, prefix: str) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and v is not None}
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        if scalars:
            if prefix:
                lines.append(f"[{prefix}]")
            lines.extend(f"{k} = {fmt(v)}" for k, v in scalars.items())
            lines.append("")
        for k, v in tables.items():
            walk(v, f"{prefix}.{k}" if prefix else k)

    walk(cfg.model_dump(mode="json"), "")
    return "\n".join(lines)


# =========================================================================== encrypted inference
# (appended section: serve-inference / serve-crypto-provider; owned by the encrypted-inference feature)
# Old keys of InferenceServiceConfig → their names now.
RENAMED_INFERENCE_KEYS = {"ttp": "crypto_provider", "ttp_tls": "crypto_provider_tls",
                          "ttp_secret": "crypto_provider_secret", "ttp_public": "crypto_provider_public"}


class InferenceServiceConfig(_Strict):
    """The hospital's encrypted-inference service (``xrayfed serve-inference``)."""

    listen: str = Field("127.0.0.1:9443", description="gRPC address HOST:PORT patients connect to (TLS)")
    model: Path | None = Field(None, description="federated checkpoint (global model) to serve")
    token_keys: list[Path] = Field(default_factory=list, description="trusted Ed25519 token public keys (PEM)")
    audience: str = Field("xrayfed-inference", min_length=1, description="tokens must name this audience")
    tls: TLSConfig = TLSConfig()
    crypto_provider: str = Field("127.0.0.1:9444", description="the crypto provider's HOST:PORT "
                                                                "(xrayfed serve-crypto-provider)")
    crypto_provider_tls: TLSConfig = Field(TLSConfig(), description="ca_cert verifies the crypto provider's "
                                                                     "certificate")
    crypto_provider_secret: Path | None = Field(None, description="file with the secret shared with the crypto "
                                                                  "provider")
    crypto_provider_public: str | None = Field(None, description="the crypto provider's address HOST:PORT as "
                                                                 "patients reach it (default: crypto_provider)")
    session_timeout_s: float = Field(120.0, gt=1.0, le=3600.0, description="an MPC session is torn down after this")
    max_sessions: int = Field(4, ge=1, le=256, description="concurrent MPC sessions; more are refused (busy)")
    max_sessions_per_token: int = Field(1, ge=1, le=256, description="concurrent sessions one token may hold")
    max_sessions_per_peer: int = Field(2, ge=1, le=256, description="concurrent sessions from one IP address")
    join_timeout_s: float = Field(30.0, gt=1.0, le=3600.0, description="a session nobody joins within this is "
                                                                     "torn down and its slot freed")
    predictions_per_token_per_hour: int = Field(30, ge=1, description="rate limit per token (sliding hour)")
    prediction_budget_per_token: int = Field(200, ge=1, description="predictions one token may ever get (bounds "
                                                                   "model extraction); counted in the audit log")
    revoked_tokens: Path | None = Field(None, description="file of revoked token ids (jti), one per line; "
                                                          "re-read when it changes")
    allow_scans_without_patient_id: bool = Field(
        False, description="accept scans that carry no patient identity (PNG/JPEG); by default only DICOM scans "
                           "whose PatientID is the token's patient are served")
    threads_per_party: int = Field(1, ge=1, le=64, description="torch threads per MPC party process")
    audit_log: Path = Field(Path("inference-audit.jsonl"), description="JSON-lines audit log (no scans, no results)")

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data: Any) -> Any:
        """Old keys (the crypto provider was called the TTP) are still read, with one warning line."""
        if not isinstance(data, dict) or not any(k in data for k in RENAMED_INFERENCE_KEYS):
            return data
        data = dict(data)
        for old, new in RENAMED_INFERENCE_KEYS.items():
            if old not in data:
                continue
            value = data.pop(old)
            warn_deprecated(f"inference config key {old!r}", repr(new))
            if new not in data:
                data[new] = value
            elif isinstance(value, dict) and isinstance(data[new], dict):  # a flag overrides part of the table
                data[new] = {**value, **data[new]}
        return data

    @model_validator(mode="after")
    def _join_before_end(self) -> "InferenceServiceConfig":
        if self.join_timeout_s > self.session_timeout_s:
            object.__setattr__(self, "join_timeout_s", self.session_timeout_s)
        return self


class CryptoProviderConfig(_Strict):
    """The crypto provider, the second computing party of encrypted inference
    (``xrayfed serve-crypto-provider``)."""

    listen: str = Field("127.0.0.1:9444", description="gRPC address HOST:PORT the hospital service calls (TLS)")
    tls: TLSConfig = TLSConfig()
    secret: Path | None = Field(None, description="file with the secret shared with the inference service")
    session_timeout_s: float = Field(120.0, gt=1.0, le=3600.0)
    max_sessions: int = Field(8, ge=1, le=256)
    threads_per_party: int = Field(1, ge=1, le=64)
    mpc_host: str = Field("127.0.0.1", description="address this service's MPC parties listen on for the "
                                                   "hospital's party (TLS; reachable from the inference service)")
