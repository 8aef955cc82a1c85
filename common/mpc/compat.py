"""CrypTen 0.4.1 on torch 2.14: every workaround of this project (the numbered list in
:mod:`xrayfed.common.mpc`): the import shim, the TTP provider, building the encrypted model from
the same layer plan as the plaintext one, and TTP seeds from the OS."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys

import torch

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
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------- 3. TTP provider
def use_ttp_provider(crypten=None) -> None:
    """Select CrypTen's trusted-third-party provider (must happen before ``crypten.init``)."""
    crypten = crypten or sys.modules["crypten"]
    crypten.cfg.mpc.provider = PROVIDER


def assert_ttp_provider() -> None:
    """Refuse to run MPC with any provider but the TTP (``TFP`` lets party 0 open everything)."""
    import crypten

    name = crypten.cfg.mpc.provider
    provider = crypten.mpc.get_default_provider()
    if name != PROVIDER or getattr(provider, "NAME", None) != PROVIDER or not crypten.mpc.ttp_required():
        raise RuntimeError(
            f"CrypTen provider is {name!r}; xrayfed only runs with the trusted third party ('TTP'): "
            "with the default 'TFP' the model owner would generate the randomness and could open the patient's shares"
        )


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


def build_crypten_model(spec):
    """A plaintext (not yet encrypted) ``crypten.nn.Sequential`` for ``spec``: same layer plan,
    same state-dict keys as :func:`xrayfed.common.model.build_model`. Parameters start at zero."""
    from xrayfed.common.errors import UserError
    from xrayfed.common.model import layer_plan

    if spec.arch != "xraynet":
        raise UserError(
            f"model architecture {spec.arch!r} cannot run under MPC (GroupNorm has no CrypTen implementation); "
            "encrypted inference needs arch 'xraynet'"
        )
    crypten = import_crypten()
    cnn = crypten.nn
    model = cnn.Sequential(*[_crypten_layer(cnn, k, kw) for k, kw in layer_plan(spec)])
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
    from xrayfed.common.checkpoint import load_weights, strip_prefix
    from xrayfed.common.errors import UserError
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


# --------------------------------------------------------------------------- 4. secure TTP
def fresh_process_randomness() -> None:
    """Reseed torch's default generator from the OS (forked workers share the parent's state)."""
    torch.manual_seed(int.from_bytes(os.urandom(8), "big") >> 1)


def secure_ttp_class():
    import crypten.communicator as comm
    import torch.distributed as dist
    from crypten.mpc.provider.ttp_provider import TTPServer

    class SecureTTPServer(TTPServer):
        """CrypTen's TTP server with per-party seeds from ``os.urandom`` (see module docstring)."""

        def _setup_generators(self):
            ws = comm.get().get_world_size()
            seeds = [torch.tensor(int.from_bytes(os.urandom(8), "big", signed=True), dtype=torch.long)
                     for _ in range(ws)]
            reqs = [dist.isend(tensor=seeds[i], dst=i, group=self.ttp_group) for i in range(ws)]
            self.generators = [torch.Generator(device="cpu") for _ in range(ws)]
            self.generators_cuda = [None for _ in range(ws)]
            for i in range(ws):
                self.generators[i].manual_seed(int(seeds[i].item()))
                reqs[i].wait()
            self.seeds_sent = len(seeds)
            dist.barrier(group=self.ttp_group)

    return SecureTTPServer


