"""The patient's side of an encrypted prediction, in numpy only (no torch, no CrypTen).

The two computing parties are the hospital (rank 0, holds the weights) and the crypto provider
(rank 1). The patient is the input owner, the output receiver and the **dealer** of the
correlated randomness (Beaver triples, random bits) that the two parties use — the role that
CrypTen's trusted third party plays. Dealing needs only a pseudo-random generator and a few
integer products, so a patient's process starts in a fraction of a second (no torch import).

What the patient sends and receives (:mod:`xrayfed.common.mpc.parties` is the other side):

* to the hospital: its share ``x0`` of the fixed-point scan after the model's public first layer
  (:func:`public_front`: input pool, ScatterNet features) and a 128-bit seed
  ``s0``; the hospital derives all its triple shares from ``s0``;
* to the crypto provider: ``x1`` (``x0 + x1 = encode(x)`` mod 2⁶⁴), a seed ``s1`` for the
  ``a``/``b`` halves of its triples, and the *corrections* — its shares of every ``c`` (``c1 =
  a·b − c0``), computed here for the whole :data:`tape` at once;
* back from each party: a share of the logits, re-randomised by the two parties with a fresh
  sharing of zero that the patient does not know (so the two shares tell it the logits and
  nothing about the shares the parties computed with).

Neither party learns anything from what the patient sends: ``x0``/``x1`` are uniformly random on
their own, and each party's triple shares are uniformly random. The patient never sees a value
opened between the parties (those travel on the hospital ↔ crypto provider link only), so
knowing the triples tells it nothing about the weights. Collusion breaks it exactly as it breaks
CrypTen's TTP mode: the dealer (patient) together with the crypto provider could open the
weights; the hospital together with the crypto provider could open the scan.

The **tape** is the list of correlated-randomness requests of one encrypted forward pass of a
given architecture and input shape (public: it depends on nothing secret). The hospital records
it once per model (:func:`xrayfed.common.mpc.compat.record_tape`) and sends it in ``ModelInfo``;
both parties check each request of the session against it, so a tape that does not match the
model ends the session instead of computing garbage.

Ring arithmetic: int64 with wrap-around (numpy does not check integer overflow in arrays), the
same ring as CrypTen's ``ArithmeticSharedTensor``; fixed point with 16 fractional bits.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable

import numpy as np

from xrayfed.common.scatter import scatter_numpy

SCALE_BITS = 16
SCALE = 1 << SCALE_BITS
SEED_BYTES = 16
TAPE_FUNCTIONS = ("additive", "binary", "B2A", "square")


# --------------------------------------------------------------------------- randomness
def new_seed() -> bytes:
    """A fresh 128-bit seed from the OS CSPRNG."""
    return os.urandom(SEED_BYTES)


class Stream:
    """The pseudo-random stream a party and the dealer both run from one seed (numpy Philox,
    128-bit key): identical draws on both sides, consumed in tape order."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"seed must be {SEED_BYTES} bytes")
        self._g = np.random.Philox(key=np.frombuffer(seed, dtype="<u8").copy())

    def ring(self, shape: Iterable[int]) -> np.ndarray:
        """Uniform int64 ring elements of ``shape``."""
        shape = tuple(int(s) for s in shape)
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        return self._g.random_raw(n).view(np.int64).reshape(shape)

    def bits(self, shape: Iterable[int]) -> np.ndarray:
        """Uniform bits (0/1, int64) of ``shape``."""
        return self.ring(shape) & 1


# --------------------------------------------------------------------------- fixed point
def encode(x: np.ndarray) -> np.ndarray:
    """Float → int64 fixed point (16 fractional bits), as CrypTen's encoder."""
    return np.round(np.asarray(x, dtype=np.float64) * SCALE).astype(np.int64)


def decode(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.int64).astype(np.float64) / SCALE


def share(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Additive shares (x0, x1) of ``encode(x)``: x0 uniform from the OS CSPRNG."""
    enc = encode(x)
    x0 = np.frombuffer(os.urandom(enc.size * 8), dtype=np.int64).reshape(enc.shape).copy()
    return x0, enc - x0


def reconstruct(y0: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """The logits from the two parties' (re-randomised) shares."""
    return decode(np.asarray(y0, dtype=np.int64) + np.asarray(y1, dtype=np.int64))


def input_pool(x: np.ndarray, k: int) -> np.ndarray:
    """Average pooling by ``k`` (non-overlapping, floor), the model's first layer, applied by the
    patient in plaintext to its own scan (linear and public: identical to the model's)."""
    if k <= 1:
        return x
    n, c, h, w = x.shape
    h2, w2 = h // k, w // k
    return x[:, :, :h2 * k, :w2 * k].reshape(n, c, h2, k, w2, k).mean(axis=(3, 5))


# --------------------------------------------------------------------------- ring products
def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


def conv2d(a: np.ndarray, b: np.ndarray, stride=1, padding=0, dilation=1, groups=1) -> np.ndarray:
    """``torch.conv2d`` over the int64 ring (wrap-around), by im2col and an integer matmul."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, c, h, w = a.shape
    o, cg, kh, kw = b.shape
    g = int(groups)
    ap = np.pad(a, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, ho, wo), dtype=np.int64)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = ap[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
    out = np.empty((n, o, ho, wo), dtype=np.int64)
    og = o // g
    for gi in range(g):
        col = cols[:, gi * cg:(gi + 1) * cg].reshape(n, cg * kh * kw, ho * wo)
        wmat = b[gi * og:(gi + 1) * og].reshape(og, cg * kh * kw)
        out[:, gi * og:(gi + 1) * og] = np.matmul(wmat, col).reshape(n, og, ho, wo)
    return out


def ring_op(op: str, a: np.ndarray, b: np.ndarray, args: list, kwargs: dict) -> np.ndarray:
    with np.errstate(over="ignore"):
        if op == "mul":
            return a * b
        if op == "matmul":
            return np.matmul(a, b)
        if op == "conv2d":
            return conv2d(a, b, *args, **kwargs)
    raise ValueError(f"the dealer does not support the product {op!r}")


# --------------------------------------------------------------------------- the tape
def tape_digest(tape: list[dict]) -> str:
    """A short fingerprint of a tape (both parties and the patient compare it)."""
    return hashlib.sha256(json.dumps(tape, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def correction_sizes(tape: list[dict]) -> int:
    """Number of int64 elements the patient sends to the crypto provider for ``tape``."""
    total = 0
    for e in tape:
        total += int(np.prod(e["out"], dtype=np.int64))
    return total


def deal(tape: list[dict], s0: bytes, s1: bytes) -> np.ndarray:
    """The crypto provider's shares of every ``c`` of ``tape`` (flat int64, in order).

    Mirrors what each party draws (:class:`Stream`): per request, party ``i`` draws its ``a``
    and ``b`` halves (and party 0 its ``c``); the dealer, knowing both streams, opens ``a`` and
    ``b``, computes ``c`` and returns ``c1 = c − c0`` (XOR for binary triples).
    """
    g0, g1 = Stream(s0), Stream(s1)
    out = []
    with np.errstate(over="ignore"):
        for e in tape:
            f = e["f"]
            if f == "additive":
                a = g0.ring(e["s0"]) + g1.ring(e["s0"])
                b = g0.ring(e["s1"]) + g1.ring(e["s1"])
                c = ring_op(e["op"], a, b, e.get("args", []), e.get("kw", {}))
                c1 = c - g0.ring(c.shape)
            elif f == "binary":
                a = g0.ring(e["s0"]) ^ g1.ring(e["s0"])
                b = g0.ring(e["s1"]) ^ g1.ring(e["s1"])
                c = a & b
                c1 = c ^ g0.ring(c.shape)
            elif f == "B2A":
                r_bit = g0.bits(e["s"]) ^ g1.bits(e["s"])
                c1 = r_bit - g0.ring(e["s"])
            elif f == "square":
                r = g0.ring(e["s"]) + g1.ring(e["s"])
                c1 = r * r - g0.ring(e["s"])
            else:
                raise ValueError(f"tape request {f!r} is not one of {TAPE_FUNCTIONS}")
            if list(c1.shape) != list(e["out"]):
                raise ValueError(f"tape entry {f} declares output {e['out']}, the product has {list(c1.shape)}")
            out.append(c1.ravel())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def pack(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr, dtype="<i8").tobytes()


def unpack(data: bytes, shape: Iterable[int] | None = None) -> np.ndarray:
    a = np.frombuffer(data, dtype="<i8").astype(np.int64)
    return a.reshape(tuple(shape)) if shape is not None else a


def check_tape(tape: Any) -> list[dict]:
    """A tape received over the network: a list of known requests with integer shapes."""
    if not isinstance(tape, list) or not tape:
        raise ValueError("tape must be a non-empty list")
    for e in tape:
        if not isinstance(e, dict) or e.get("f") not in TAPE_FUNCTIONS:
            raise ValueError("tape entry is not a known request")
        for k in ("s", "s0", "s1", "out"):
            if k in e and not (isinstance(e[k], list) and all(isinstance(v, int) and 0 <= v < 1 << 24 for v in e[k])):
                raise ValueError(f"tape entry {e['f']}: {k} must be a list of sizes")
    if correction_sizes(tape) > 64 << 20:
        raise ValueError("tape asks for more than 512 MiB of corrections")
    return tape


MAX_SCATTER_J, MAX_SCATTER_L = 3, 16


def front_plan(front) -> tuple[int, tuple[int, int] | None]:
    """``(pool, (J, L) or None)`` from what the inference service announces (``ModelInfo.mpc``:
    ``input_pool`` and ``scattering``). ValueError with the reason for anything else (a service
    cannot make the patient run an unbounded transform)."""
    pool = front["input_pool"]
    if not isinstance(pool, int) or not 1 <= pool <= 64:
        raise ValueError(f"input_pool must be an integer 1-64, not {pool!r}")
    sc = front.get("scattering")
    if sc is None:
        return pool, None
    if (not isinstance(sc, (list, tuple)) or len(sc) != 2 or not all(isinstance(v, int) for v in sc)
            or not 1 <= sc[0] <= MAX_SCATTER_J or not 1 <= sc[1] <= MAX_SCATTER_L):
        raise ValueError(f"scattering must be [J, L] with J 1-{MAX_SCATTER_J} and L 1-{MAX_SCATTER_L}, not {sc!r}")
    return pool, (sc[0], sc[1])


def public_front(scan: np.ndarray, front) -> np.ndarray:
    """The model's public first layer, applied by the patient in plaintext to its own scan: the
    input pool, then (for a ScatterNet model) the scattering transform
    (:func:`xrayfed.common.scatter.scatter_numpy`, identical to the model's ``ScatterFront``).
    Nothing in it depends on the weights; its non-linear parts never run under MPC."""
    pool, sc = front_plan(front)
    x = input_pool(np.asarray(scan, dtype=np.float64), pool)
    if sc is not None:
        x = scatter_numpy(x, *sc)
    return x


def contributions(scan: np.ndarray, front, tape: list[dict]) -> tuple[dict, dict]:
    """The patient's part of a session: its scan after the model's public first layer
    (:func:`public_front`; ``front``: the service's ``mpc`` plan) shared
    ``x = x0 + x1``, two fresh seeds, and the corrections of the whole ``tape``. Returns what goes
    to the hospital ``{x, seed}`` and to the crypto provider ``{x, seed, corrections}`` (int64
    arrays)."""
    x0, x1 = share(public_front(scan, front))
    s0, s1 = new_seed(), new_seed()
    return {"x": x0, "seed": s0}, {"x": x1, "seed": s1, "corrections": deal(tape, s0, s1)}


def to_blobs(c: dict) -> dict:
    """A contribution as the byte blobs of an ``Evaluate`` frame (read back by :func:`contribution`)."""
    return {k: v if isinstance(v, bytes) else pack(v) for k, v in c.items()}


def contribution(blobs: dict, shape: Iterable[int], corrections: int | None) -> dict:
    """The patient's contribution to one party, checked (ValueError with the reason): ``x`` (int64
    share of ``shape``), ``seed`` (16 bytes) and, for the crypto provider, ``corrections``
    int64 values."""
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape))
    x, seed = blobs.get("x", b""), blobs.get("seed", b"")
    if len(x) != 8 * n:
        raise ValueError(f"the scan share has {len(x)} bytes; this model takes {8 * n} ({shape} int64)")
    if len(seed) != SEED_BYTES:
        raise ValueError(f"the seed must be {SEED_BYTES} bytes")
    out = {"x": unpack(x, shape), "seed": bytes(seed)}
    if corrections is not None:
        c = blobs.get("corrections", b"")
        if len(c) != 8 * corrections:
            raise ValueError(f"the dealt randomness has {len(c)} bytes; this model's tape needs {8 * corrections}")
        out["corrections"] = unpack(c)
    elif "corrections" in blobs:
        raise ValueError("only the crypto provider takes dealt randomness")
    return out
