"""Append-only, tamper-evident JSON-lines files (the hospitals' privacy ledgers).

**Keyed chain.** Every line is a JSON object carrying ``seq`` (0, 1, 2, ...), ``prev_hash``
(the previous line's ``hash``; 64 zeros for the first line) and ``hash`` = HMAC-SHA256 under
the hospital's *ledger key* over ``prev_hash`` and the canonical JSON of the line without
``hash``. Editing, deleting, reordering or inserting a line breaks the chain at that line, and
re-computing the chain needs the key: :func:`read_ledger` refuses the file and names the line.

**The ledger key** (:func:`ledger_key`, first match wins): an explicit key file
(``[hospital] ledger_key_file`` / ``--ledger-key-file``, or ``$XRAYFED_LEDGER_KEY_FILE``); else,
when the ledger is encrypted at rest, a subkey of the at-rest key (HKDF); else
``STATE_DIR/ledger.key``, created (32 random bytes, mode 0600) with the ledger's first line.
That default protects against careless edits and against anyone who cannot read the key file;
an insider who can read it can re-sign edits — keep the key elsewhere (an explicit key file
owned by another account, or the at-rest key from the environment) where that matters.

**Head anchors (truncation).** A chain proves that the lines present belong together, not that
none were cut off the end. After every append the head (``seq`` and ``hash`` of the last line)
is written atomically to ``<ledger>.head``; :func:`read_ledger` refuses a ledger that lacks
the anchored line (trailing lines removed, or the file deleted while the anchor remains). The
hospital also reports its head with every reply and the server records it (``metrics.jsonl``)
and sends it back with the next round (:func:`check_anchor`), so a rollback of *both* files to
an older copy is detected no later than the hospital's next round (and in ``xrayfed report``).

Appends are ``O_APPEND`` writes followed by ``fsync``, so a crash never loses a line that was
reported written. (A truncated last line from a crash mid-write is reported as broken.)

**Encryption at rest** (optional ``key``, an :class:`~xrayfed.common.security.atrest.AtRestKey`): every
line is then written as its own AES-256-GCM encrypted JSON line
(:func:`xrayfed.common.security.atrest.encrypt_line`, its line number authenticated). The chain is
computed over the *plaintext* records, exactly as without a key. Reading an encrypted ledger
without a key, or with the wrong one, is a one-line :class:`~xrayfed.common.errors.UserError`
naming the file (never a silently wrong ε); with a key, a plaintext line anywhere is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xrayfed.common.errors import UserError

if TYPE_CHECKING:
    from xrayfed.common.security.atrest import AtRestKey

LEDGER_FILE = "privacy-ledger.jsonl"  # a hospital's ledger in its state folder
GENESIS = "0" * 64
LEDGER_CONTEXT = b"ledger"
ENV_LEDGER_KEY_FILE = "XRAYFED_LEDGER_KEY_FILE"
DEFAULT_KEY_FILE = "ledger.key"
HEAD_SUFFIX = ".head"


class LedgerError(UserError):
    """A ledger file whose chain is broken, that was cut short, or that is not a ledger at all."""

    def __init__(self, path: Path | str, line: int, reason: str) -> None:
        self.path = str(path)
        self.line = line  # 1-based line number in the file
        self.reason = reason
        super().__init__(f"{path}: line {line}: {reason}; the ledger was modified and cannot be trusted")


# --------------------------------------------------------------------------- the key
class LedgerKey:
    """The 256-bit HMAC key of a ledger's chain (the secret never appears in repr/str/logs)."""

    __slots__ = ("_k", "source")

    def __init__(self, raw: bytes, source: str) -> None:
        if len(raw) != 32:
            raise UserError(f"{source}: a ledger key must be 32 bytes (64 hex digits), got {len(raw)} bytes")
        self._k = bytes(raw)
        self.source = source

    def mac(self, data: bytes) -> str:
        return hmac.new(self._k, data, hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        return f"LedgerKey(source={self.source!r})"

    __str__ = __repr__


def _read_key_file(path: Path) -> LedgerKey:
    from xrayfed.common.security.atrest import parse_key

    try:
        text = path.read_bytes()
    except OSError as e:
        raise UserError(f"ledger key file {path}: cannot read ({e.strerror})") from None
    k = parse_key(text, source=str(path))  # 64 hex digits or base64 of 32 bytes, like at-rest keys
    return LedgerKey(k._ledger_mac, source=str(path))  # the same subkey as when the file is the at-rest key


def default_key_file(ledger_path: Path | str) -> Path:
    return Path(ledger_path).parent / DEFAULT_KEY_FILE


def ledger_key(ledger_path: Path | str, atrest_key: "AtRestKey | None" = None, key_file: Path | str | None = None,
               *, create: bool = False, env: dict | None = None) -> LedgerKey:
    """The HMAC key of the ledger at ``ledger_path`` (see the module docstring for the order).

    ``create``: make the default ``ledger.key`` when no key exists yet (only for a ledger that
    does not exist yet: a missing key beside an existing ledger is an error, never a new key).
    """
    env = os.environ if env is None else env
    explicit = key_file or env.get(ENV_LEDGER_KEY_FILE)
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise UserError(f"ledger key file: no file at {p} (make one with `xrayfed certs atrest-key --out {p}`)")
        return _read_key_file(p)
    if atrest_key is not None:
        return LedgerKey(atrest_key._ledger_mac, source=f"at-rest key {atrest_key.key_id.hex()}")
    p = default_key_file(ledger_path)
    if p.is_file():
        return _read_key_file(p)
    if create and not Path(ledger_path).exists():
        from xrayfed.common.files import atomic_write

        atomic_write(p, (os.urandom(32).hex() + "\n").encode(), mode=0o600)
        return _read_key_file(p)
    raise UserError(f"{ledger_path}: its ledger key {p} is missing; without it the ledger cannot be verified "
                    f"(restore the key, or set [hospital] ledger_key_file / ${ENV_LEDGER_KEY_FILE})")


# --------------------------------------------------------------------------- the chain
def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def line_hash(prev_hash: str, record_without_hash: dict[str, Any], mac_key: LedgerKey) -> str:
    """The keyed hash of one line (HMAC-SHA256 over ``prev_hash`` and the canonical record)."""
    return mac_key.mac(prev_hash.encode() + b"\n" + _canonical(record_without_hash))


def _unkeyed_hash(prev_hash: str, record_without_hash: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + _canonical(record_without_hash)).hexdigest()


def head_path(ledger_path: Path | str) -> Path:
    p = Path(ledger_path)
    return p.with_name(p.stem + HEAD_SUFFIX)


def read_head(ledger_path: Path | str) -> dict[str, Any] | None:
    """The head anchor ``{"seq", "hash"}`` written after the last append (None: no anchor)."""
    hp = head_path(ledger_path)
    if not hp.is_file():
        return None
    try:
        head = json.loads(hp.read_text(encoding="utf-8"))
        return {"seq": int(head["seq"]), "hash": str(head["hash"])}
    except (ValueError, KeyError, TypeError, OSError):
        raise LedgerError(hp, 1, "the head anchor is not readable") from None


def _write_head(ledger_path: Path, rec: dict[str, Any]) -> None:
    from xrayfed.common.files import atomic_write

    atomic_write(head_path(ledger_path), json.dumps({"seq": rec["seq"], "hash": rec["hash"]}).encode() + b"\n")


def read_ledger(path: Path | str, key: "AtRestKey | None" = None, *, mac_key: LedgerKey | None = None,
                key_file: Path | str | None = None) -> list[dict[str, Any]]:
    """All records of a ledger, after verifying the whole keyed chain and the head anchor.

    Raises :class:`LedgerError` naming the first bad line. A missing file is an empty ledger
    (unless its head anchor remains: then the ledger was deleted). Encrypted lines need ``key``;
    without it, or with the wrong one, a :class:`~xrayfed.common.errors.UserError` names the file.
    ``mac_key`` defaults to :func:`ledger_key` (``key_file``, ``key``, ``ledger.key``).
    """
    from xrayfed.common.security.atrest import ENV_KEY, ENV_KEY_FILE, decrypt_line, is_encrypted_line

    path = Path(path)
    head = read_head(path)
    if not path.exists():
        if head is not None:
            raise LedgerError(path, 1, f"the ledger file is missing but its head anchor records {head['seq'] + 1} "
                                       "line(s) (deleted)")
        return []
    if mac_key is None:
        try:
            mac_key = ledger_key(path, key, key_file)
        except UserError:
            with path.open("r", encoding="utf-8") as f:
                encrypted = is_encrypted_line(f.readline())
            if key is None and encrypted:  # the more useful message: the at-rest key is what is missing
                raise UserError(f"{path}: the ledger is encrypted; pass --atrest-key-file FILE or set "
                                f"{ENV_KEY_FILE} / {ENV_KEY}") from None
            raise
    records: list[dict[str, Any]] = []
    prev = GENESIS
    with path.open("r", encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                raise LedgerError(path, n, "empty line")
            if is_encrypted_line(raw):
                if key is None:
                    raise UserError(f"{path}: the ledger is encrypted; pass --atrest-key-file FILE or set "
                                    f"{ENV_KEY_FILE} / {ENV_KEY}")
                raw = decrypt_line(raw.strip(), key, line_no=n, context=LEDGER_CONTEXT, source=str(path))
            elif key is not None:
                raise LedgerError(path, n, "a plaintext line in a ledger that is encrypted at rest (an at-rest key "
                                           "is configured; lines written without it are not accepted)")
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                raise LedgerError(path, n, "not valid JSON (truncated or edited)") from None
            if not isinstance(rec, dict) or "hash" not in rec:
                raise LedgerError(path, n, "no hash field")
            body = {k: v for k, v in rec.items() if k != "hash"}
            if body.get("seq") != n - 1:
                raise LedgerError(path, n, f"sequence number {body.get('seq')!r}, expected {n - 1} (line removed or inserted)")
            if body.get("prev_hash") != prev:
                raise LedgerError(path, n, "prev_hash does not match the line before (line removed, inserted or reordered)")
            try:
                want = line_hash(prev, body, mac_key)
            except (TypeError, ValueError):
                raise LedgerError(path, n, "not a ledger record") from None
            if not hmac.compare_digest(want, str(rec["hash"])):
                if _unkeyed_hash(prev, body) == rec["hash"]:
                    raise LedgerError(path, n, "chained with an unkeyed SHA-256 hash, which anyone can recompute "
                                               "(written by xrayfed < 0.2, or forged without the ledger key)")
                raise LedgerError(path, n, f"hash does not match the line's content under the ledger key "
                                           f"({mac_key.source}): line edited, or written without this key")
            prev = rec["hash"]
            records.append(rec)
    if head is None:
        if len(records) > 1:
            raise LedgerError(path, len(records), f"its head anchor {head_path(path).name} is missing (deleted); "
                                                  "lines may have been removed from the end")
    elif head["seq"] >= len(records):
        raise LedgerError(path, len(records), f"the ledger ends at line {len(records)} but its head anchor records "
                                              f"line {head['seq'] + 1}: lines were removed from the end")
    elif not hmac.compare_digest(records[head["seq"]]["hash"], head["hash"]):
        raise LedgerError(path, head["seq"] + 1, "does not match the head anchor (the ledger was replaced)")
    return records


def anchor_id(federation: str, hospital: str) -> str:
    """How the server names a hospital's anchor in a round's config (no hospital name in clear)."""
    return hashlib.sha256(f"xrayfed-anchor|{federation}|{hospital}".encode()).hexdigest()[:16]


def check_anchor(records: list[dict[str, Any]], seq: int, head: str) -> str | None:
    """Whether the ledger ``records`` contain line ``seq`` with hash ``head`` (an anchor kept
    outside the hospital, e.g. by the server). None when they do, else the reason (one line)."""
    if seq < 0:
        return None
    if seq >= len(records):
        return (f"the ledger has {len(records)} line(s) but line {seq + 1} was recorded outside it (the ledger was "
                "truncated, deleted or rolled back)")
    if not hmac.compare_digest(str(records[seq].get("hash")), str(head)):
        return f"line {seq + 1} differs from the one recorded outside the ledger (the ledger was replaced)"
    return None


def unpaid_releases(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``release`` lines that do not name a ``train`` line (charge) of the same request, or that
    name a charge an earlier release already used. Empty for an honest ledger: every update that
    left the hospital was paid for exactly once."""
    charges = {int(r["seq"]): r for r in records if r.get("event") == "train"}
    bad, used = [], set()
    for r in records:
        if r.get("event") != "release":
            continue
        try:
            seq = int(r.get("charge_seq", -1))
        except (TypeError, ValueError):
            seq = -1
        c = charges.get(seq)
        if c is None or c.get("request") != r.get("request") or seq in used:
            bad.append(r)
        used.add(seq)
    return bad


def append_record(path: Path | str, record: dict[str, Any], key: "AtRestKey | None" = None, *,
                  mac_key: LedgerKey | None = None, key_file: Path | str | None = None) -> dict[str, Any]:
    """Verify the chain, then append ``record`` (plus seq/prev_hash/hash) durably; returns it.

    With ``key`` the line is written encrypted (the chain is over the plaintext record). The
    head anchor is updated after the line is on disk (a crash in between leaves the anchor one
    line behind, which :func:`read_ledger` accepts).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mac_key is None:
        mac_key = ledger_key(path, key, key_file, create=True)
    existing = read_ledger(path, key, mac_key=mac_key)
    prev = existing[-1]["hash"] if existing else GENESIS
    body = {k: v for k, v in record.items() if k not in ("seq", "prev_hash", "hash")}
    body["seq"] = len(existing)
    body["prev_hash"] = prev
    full = dict(body, hash=line_hash(prev, body, mac_key))
    line = json.dumps(full, sort_keys=True, allow_nan=False)
    if key is not None:
        from xrayfed.common.security.atrest import encrypt_line

        line = encrypt_line(line, key, line_no=len(existing) + 1, context=LEDGER_CONTEXT)
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    _write_head(path, full)
    return full
