"""What the server side (:mod:`xrayfed.server.secagg`) and the hospital side
(:mod:`xrayfed.client.secagg`) of xrayfed's SecAgg+ must agree on.

xrayfed runs Flower's own SecAgg+ protocol (``flwr.server.workflow.SecAggPlusWorkflow`` on the
server, ``flwr.client.mod.secaggplus_mod`` on each hospital) underneath Message-API
strategies. Two things are added on top:

* **Plaintext protocol fields** in the training instructions (legacy ``FitIns`` config) that
  tell the hospital how to map Flower's nameless legacy arrays back to the model's named
  arrays and how to form the vector it masks (``K_*`` below).
* **A cryptographic mask generator.** Flower 1.41's ``pseudo_rand_gen`` folds each 32-byte
  secret into a *32-bit* seed for numpy's Mersenne Twister. An honest-but-curious server
  learns every surviving hospital's private-mask seed during unmasking (that is the protocol),
  so only the pairwise masks hide an individual update, and each of those comes from a 32-bit
  seed: about 2**32 guesses per pair recover it (the first masked element is the hospital's
  weight, sent in clear too, which makes checking a guess cheap). :func:`aes_ctr_prg`
  expands the full 256-bit secret with AES-256-CTR instead; :func:`strong_masks` installs it
  in both Flower modules for the duration of a protocol run. Both sides must use it, so the
  server announces it (``K_PRG``) and a hospital refuses to mask under any other generator.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import threading
from typing import Iterator

import numpy as np

PROTOCOL = "xrayfed-secagg+/1"
PRG_NAME = "aes256-ctr/1"

# Keys added to the (plaintext) training config of the SecAgg+ collect-masked-vectors stage.
K_PROTOCOL = "xrayfed-secagg"  # PROTOCOL
K_PRG = "xrayfed-secagg-prg"  # PRG_NAME
K_KEYS = "xrayfed-secagg-keys"  # JSON list: names of the model arrays, in the legacy order
K_RECORDS = "xrayfed-secagg-records"  # JSON {"arrays": key of the ArrayRecord, "config": key of the ConfigRecord}
K_MODE = "xrayfed-secagg-mode"  # "delta" (mask local - global) or "weights" (mask local weights)
K_WEIGHT_KEY = "xrayfed-secagg-weight-key"  # MetricRecord key of the hospital's weight (num-examples)
K_MAX_WEIGHT = "xrayfed-secagg-max-weight"  # a weight above this would overflow: refused
K_CLIP = "xrayfed-secagg-clipping-range"  # values of weight/max_weight * vector are clipped to ±this

# ConfigRecord the hospital adds to its reply (plaintext): how its vector fitted the quantiser.
SECAGG_INFO_RECORD = "secagg"

# Where Flower 1.41 looks the mask generator up (module globals, resolved at call time).
_PRG_USERS = (
    "flwr.client.mod.secure_aggregation.secaggplus_mod",
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
)
_LOCK = threading.RLock()


def aes_ctr_prg(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Masks uniform in ``[0, num_range)`` from the whole ``seed`` (AES-256-CTR keystream).

    Same signature and output shapes/dtypes as Flower's ``pseudo_rand_gen`` (int64 arrays, a 0-d
    array for an empty shape). ``num_range`` is SecAgg+'s modulus, a power of two.
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if num_range < 2:
        raise ValueError("num_range must be at least 2")
    key = hashlib.sha256(b"xrayfed-secagg-mask/1\x00" + bytes(seed)).digest()
    sizes = [int(np.prod(d)) if len(d) else 1 for d in dimensions_list]
    total = sum(sizes)
    width = 4 if num_range <= 2**32 else 8
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()
    buf = np.zeros(width * total, dtype=np.uint8)
    raw = enc.update(buf) + enc.finalize()
    if width == 4:
        vals = np.frombuffer(raw, dtype="<u4").astype(np.int64)
    else:
        vals = (np.frombuffer(raw, dtype="<u8") >> np.uint64(1)).astype(np.int64)  # < 2**63
    if num_range & (num_range - 1) == 0:
        if num_range < (2**32 if width == 4 else 2**63):
            vals &= num_range - 1
    else:  # not used by SecAgg+ (power-of-two modulus); bias ≤ num_range / 2**(8*width - 1)
        vals %= num_range
    out: list[np.ndarray] = []
    pos = 0
    for dims, n in zip(dimensions_list, sizes):
        chunk = vals[pos : pos + n]
        pos += n
        out.append(np.array(chunk[0], dtype=np.int64) if len(dims) == 0 else chunk.reshape(dims))
    return out


def active_prg(side: str) -> str:
    """Which mask generator Flower's ``side`` ("client" | "server") module uses right now."""
    mod = importlib.import_module(_PRG_USERS[0 if side == "client" else 1])
    return PRG_NAME if mod.pseudo_rand_gen is aes_ctr_prg else "flwr-default (32-bit seed)"


@contextlib.contextmanager
def strong_masks() -> Iterator[None]:
    """Use :func:`aes_ctr_prg` instead of Flower's 32-bit-seeded generator inside this block."""
    with _LOCK:
        saved = []
        for name in _PRG_USERS:
            mod = importlib.import_module(name)
            saved.append((mod, mod.pseudo_rand_gen))
            mod.pseudo_rand_gen = aes_ctr_prg
        try:
            yield
        finally:
            for mod, fn in saved:
                mod.pseudo_rand_gen = fn
