"""CrypTen 0.4.1 on torch 2.14: every workaround of this project (the numbered list in
:mod:`xrayfed.common.mpc`): the import shim, the TTP provider, building the encrypted model from
the same layer plan as the plaintext one, and TTP seeds from the OS."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
import warnings

import torch

from xrayfed.common.errors import UserError
from xrayfed.common.mpc.dealer import Stream

log = logging.getLogger(__name__)

PROVIDER = "TTP"
CRYPTEN_VERSION = "0.4.1"

_OLD_REGISTRATION = "torch.onnx._internal.registration"
_NEW_REGISTRATION = "torch.onnx._internal.torchscript_exporter.registration"



# --------------------------------------------------------------------------- 1. import shim
def import_crypten():
    """Import CrypTen 0.4.1 on torch 2.14 (alias the moved ONNX module), with the TTP provider.

    Returns the ``crypten`` module. Safe to call many times.
    """
    if "crypten" not in sys.modules and _OLD_REGISTRATION not in sys.modules:
        try:
            sys.modules[_OLD_REGISTRATION] = importlib.import_module(_NEW_REGISTRATION)
        except ImportError:  # an older torch that still has the original module
            pass
    with warnings_quiet():
        import crypten  # noqa: WPS433 (import inside the shim on purpose)
    if getattr(crypten, "__version__", None) != CRYPTEN_VERSION:
        log.warning("CrypTen %s found; xrayfed is tested with %s", crypten.__version__, CRYPTEN_VERSION)
    use_ttp_provider(crypten)
    return crypten


@contextlib.contextmanager
def warnings_quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------- 3. the dealt provider
def use_ttp_provider(crypten=None) -> None:
    """Select the trusted-third-party provider slot (``TTP``) and put :class:`DealtProvider`
    in it: triples dealt by the patient (never CrypTen's ``TFP``, where party 0 makes them)."""
    crypten = crypten or sys.modules["crypten"]
    crypten.cfg.mpc.provider = PROVIDER
    providers = vars(crypten.mpc)["__SUPPORTED_PROVIDERS"]
    if not isinstance(providers.get(PROVIDER), _provider_class()):
        providers[PROVIDER] = _provider_class()()


def assert_ttp_provider() -> None:
    """Refuse to run MPC with any provider but the dealt one (``TFP`` lets party 0 open everything;
    CrypTen's own TTP needs a third MPC party that xrayfed does not run)."""
    import crypten

    name = crypten.cfg.mpc.provider
    provider = crypten.mpc.get_default_provider()
    if name != PROVIDER or not isinstance(provider, _provider_class()) or not crypten.mpc.ttp_required():
        raise RuntimeError(
            f"CrypTen provider is {name!r}; xrayfed only runs with randomness dealt by a third party (the patient): "
            "with the default 'TFP' the model owner would generate the randomness and could open the patient's shares"
        )


_PROVIDER_CLASS = None


def _provider_class():
    """:class:`DealtProvider`, defined once CrypTen is imported."""
    global _PROVIDER_CLASS
    if _PROVIDER_CLASS is not None:
        return _PROVIDER_CLASS
    from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor
    from crypten.mpc.provider.provider import TupleProvider

    def _norm(v):
        return json.loads(json.dumps(v, default=list))

    class DealtProvider(TupleProvider):
        """Correlated randomness dealt by the patient (:mod:`xrayfed.common.mpc.dealer`).

        Party 0 (hospital) draws its shares of ``a``, ``b`` and ``c`` from its seed; party 1
        (crypto provider) draws ``a`` and ``b`` from its seed and takes ``c`` from the
        patient's corrections. Every request is checked against the session's tape. With
        ``record()`` it instead writes the tape (shapes only, zeros returned).
        """

        NAME = PROVIDER

        def __init__(self) -> None:
            super().__init__()  # CrypTen's tracing/caching attributes (never used: tracing stays off)
            self.reset()

        def reset(self) -> None:
            self.party = None
            self.stream = None
            self.tape: list[dict] | None = None
            self.corrections = None
            self.pos = self.i = 0
            self.recording: list[dict] | None = None

        def start(self, rank: int, seed: bytes, tape: list[dict], corrections=None) -> None:
            self.reset()
            self.party, self.stream, self.tape = rank, Stream(seed), _norm(tape)
            if rank == 1:
                if corrections is None:
                    raise RuntimeError("the crypto provider's party needs the patient's corrections")
                self.corrections = torch.from_numpy(corrections)
            self.pos = 0

        def record(self) -> list[dict]:
            self.reset()
            self.recording = []
            return self.recording

        def finish(self) -> None:
            if self.tape is not None and self.i != len(self.tape):
                raise RuntimeError(f"the session used {self.i} of the tape's {len(self.tape)} requests")
            if self.corrections is not None and self.pos != self.corrections.numel():
                raise RuntimeError("the patient's corrections do not match the tape")
            self.reset()

        # -- one request
        def _entry(self, entry: dict) -> dict:
            entry = _norm(entry)
            if self.recording is not None:
                self.recording.append(entry)
                return entry
            if self.tape is None:
                raise RuntimeError("no dealt randomness for this session (DealtProvider not started)")
            if self.i >= len(self.tape) or self.tape[self.i] != entry:
                raise RuntimeError(f"MPC request {self.i} ({entry['f']}) does not match the session's tape")
            self.i += 1
            return entry

        def _ring(self, shape):
            if self.recording is not None:
                return torch.zeros(tuple(shape), dtype=torch.long)
            return torch.from_numpy(self.stream.ring(shape))

        def _bits(self, shape):
            if self.recording is not None:
                return torch.zeros(tuple(shape), dtype=torch.long)
            return torch.from_numpy(self.stream.bits(shape))

        def _c(self, shape):
            if self.recording is not None or self.party == 0:
                return self._ring(shape)
            n = 1
            for s in shape:
                n *= int(s)
            if self.pos + n > self.corrections.numel():
                raise RuntimeError("the patient's corrections are too short for this model")
            out = self.corrections[self.pos:self.pos + n].reshape(tuple(shape))
            self.pos += n
            return out

        # -- the TupleProvider API
        def generate_additive_triple(self, size0, size1, op, device=None, *args, **kwargs):
            s0, s1 = list(size0), list(size1)
            out = list(getattr(torch, op)(torch.zeros(s0), torch.zeros(s1), *args, **kwargs).size())
            self._entry({"f": "additive", "s0": s0, "s1": s1, "op": op, "args": list(args), "kw": kwargs, "out": out})
            a, b, c = self._ring(s0), self._ring(s1), self._c(out)
            return (ArithmeticSharedTensor.from_shares(a, precision=0), ArithmeticSharedTensor.from_shares(b, precision=0),
                    ArithmeticSharedTensor.from_shares(c, precision=0))

        def square(self, size, device=None):
            s = list(size)
            self._entry({"f": "square", "s": s, "out": s})
            r, r2 = self._ring(s), self._c(s)
            return ArithmeticSharedTensor.from_shares(r, precision=0), ArithmeticSharedTensor.from_shares(r2, precision=0)

        def generate_binary_triple(self, size0, size1, device=None):
            s0, s1 = list(size0), list(size1)
            out = list(torch.broadcast_shapes(tuple(s0), tuple(s1)))
            self._entry({"f": "binary", "s0": s0, "s1": s1, "out": out})
            a, b, c = self._ring(s0), self._ring(s1), self._c(out)
            return BinarySharedTensor.from_shares(a), BinarySharedTensor.from_shares(b), BinarySharedTensor.from_shares(c)

        def wrap_rng(self, size, device=None):
            raise RuntimeError("wrap_rng is only used with more than two computing parties")

        def B2A_rng(self, size, device=None):
            s = list(size)
            self._entry({"f": "B2A", "s": s, "out": s})
            r_bit = self._bits(s)
            r_arith = self._c(s)
            return ArithmeticSharedTensor.from_shares(r_arith, precision=0), BinarySharedTensor.from_shares(r_bit)

    _PROVIDER_CLASS = DealtProvider
    return DealtProvider


def provider():
    """The active :class:`DealtProvider` instance."""
    import crypten

    assert_ttp_provider()
    return crypten.mpc.get_default_provider()


# --------------------------------------------------------------------------- 5. the communicator
@contextlib.contextmanager
def use_link_communicator(communicator):
    """CrypTen's communicator is ``communicator`` (a two-party
    :func:`~xrayfed.common.mpc.channel.make_link_communicator`) inside this block: CrypTen's
    modules call ``crypten.communicator.get()`` at run time, which is pointed at it; the
    pairwise PRZS seeds are set up over it (``crypten._setup_prng``)."""
    crypten = import_crypten()
    import crypten.communicator as comm

    saved = comm.get, comm.is_initialized
    comm.get = lambda: communicator
    comm.is_initialized = lambda: True
    try:
        crypten._setup_prng()
        yield crypten
    finally:
        comm.get, comm.is_initialized = saved


# --------------------------------------------------------------------------- 2. model building
def _crypten_layer(cnn, kind: str, kw: dict):
    if kind == "avgpool":
        return cnn.AvgPool2d(kw["kernel_size"])
    if kind == "conv":  # weight standardisation is folded into the weights (load_crypten_weights)
        return cnn.Conv2d(kw["in_channels"], kw["out_channels"], kw["kernel_size"], padding=kw.get("padding", 0))
    if kind == "relu":
        return cnn.ReLU()
    if kind == "gap":
        return cnn.AdaptiveAvgPool2d(1)
    if kind == "flatten":
        return cnn.Flatten(1)
    if kind == "linear":
        return cnn.Linear(kw["in_features"], kw["out_features"])
    raise ValueError(f"layer kind {kind!r} has no CrypTen implementation")


def _identity(cnn):
    class Identity(cnn.Module):
        def forward(self, x):
            return x

    return Identity()


def build_crypten_model(spec, *, pooled_input: bool = False):
    """A plaintext (not yet encrypted) ``crypten.nn.Sequential`` for ``spec``: same layer plan,
    same state-dict keys as :func:`xrayfed.common.model.xraynet.build_model`. Parameters start at zero.

    ``pooled_input``: the plan's first layer, the input average pool, is applied by the patient
    to its own scan before sharing it (linear and public), so here it is an identity (same
    module indices, hence the same keys). A ScatterNet model's first layer (the fixed scattering
    transform) is always the patient's: here it is always an identity, and the model's input is
    the scattering features."""
    # lazy: the crypto provider's main process loads this module (via parties), not the model code (opacus)
    from xrayfed.common.model.xraynet import layer_plan

    if spec.arch != "xraynet":
        raise UserError(
            f"model architecture {spec.arch!r} cannot run under MPC (GroupNorm has no CrypTen implementation); "
            "encrypted inference needs arch 'xraynet'"
        )
    crypten = import_crypten()
    cnn = crypten.nn
    plan = layer_plan(spec)
    layers = [_identity(cnn) if i == 0 and (k == "scatter" or (pooled_input and k == "avgpool"))
              else _crypten_layer(cnn, k, kw) for i, (k, kw) in enumerate(plan)]
    model = cnn.Sequential(*layers)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.zero_()
    return model


def load_crypten_weights(cmodel, spec, state_dict: dict, what: str = "checkpoint") -> None:
    """Load a plaintext state dict into a (not yet encrypted) CrypTen model, verified.

    The key/shape check is the same as the plaintext loader's (a clear :class:`UserError` for a
    checkpoint of another architecture); after the load every parameter is compared with the
    checkpoint, so a key that CrypTen silently skipped (``strict=False``) cannot go unnoticed.
    """
    # lazy: the crypto provider's main process loads this module (via parties), not the model code (opacus)
    from xrayfed.common.checkpoint import load_weights, strip_prefix
    from xrayfed.common.model import build_model, fold_standardization

    sd = strip_prefix(state_dict)
    load_weights(build_model(spec), sd, what=what)  # raises UserError on any mismatch
    sd = fold_standardization(spec, sd)  # weight-standardised convolutions → plain ones, same outputs
    own = dict(cmodel.state_dict())
    if set(own) != set(sd):
        raise UserError(f"{what}: CrypTen model keys differ from the checkpoint's ({sorted(set(own) ^ set(sd))[:3]})")
    cmodel.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    for name, buf in list(cmodel.named_buffers()):
        if name in sd:  # XrayNet has no buffers today; keep the route for the day it has
            mod_name, _, leaf = name.rpartition(".")
            (cmodel._modules[mod_name] if mod_name else cmodel).set_buffer(leaf, sd[name].clone())
    loaded = dict(cmodel.state_dict())
    for k, v in sd.items():
        if not torch.equal(loaded[k].detach().float(), v.float()):
            raise RuntimeError(f"CrypTen did not load weight {k!r} (compat shim out of date)")


# --------------------------------------------------------------------------- 4. worker randomness
def fresh_process_randomness() -> None:
    """Reseed torch's default generator from the OS (forked workers share the parent's state)."""
    torch.manual_seed(int.from_bytes(os.urandom(8), "big") >> 1)
