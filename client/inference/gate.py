"""The access gate of the hospital's encrypted-inference service: who may ask for a prediction,
how often, and the record of every request. Nothing here knows gRPC or MPC.

* :class:`AuditLog`: one JSON line per request (``time, event, patient_id, claimed_patient_id,
  token_id, identity_claim, model_version, outcome, reason, duration_s, session, peer``;
  ``claimed_patient_id`` is the unverified subject of a refused token; ``identity_claim`` says
  whether the request carried the scan's patient identity — ``dicom_patient_id`` — or
  ``none``) — never the scan, never the result (the service never has either), never the token
  itself or the session id (``session`` is a hash of it).
* :class:`RevocationList` / :func:`revoke_token`: revoked tokens (by ``jti``, the
  ``revoked_tokens`` file that ``xrayfed token revoke`` appends to) are refused.
* :class:`Admission`: one caller cannot hold the service: at most ``max_sessions_per_token``
  concurrent sessions per token and ``max_sessions_per_peer`` per IP address, at most
  ``predictions_per_token_per_hour`` per token and ``prediction_budget_per_token`` per token
  ever (counted from the audit log, so a restart does not reset them; this also bounds model
  extraction through the prediction API).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import threading
import time
from pathlib import Path

from xrayfed.client.inference import tokens
from xrayfed.common.errors import UserError

log = logging.getLogger("xrayfed.inference")


# --------------------------------------------------------------------------- audit log
class AuditLog:
    """Append-only JSON-lines audit log (thread-safe; flushed and fsynced per line)."""

    FIELDS = ("time", "event", "patient_id", "claimed_patient_id", "token_id", "identity_claim", "model_version",
              "outcome", "reason", "duration_s", "session", "peer")

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.f = os.fdopen(fd, "a", encoding="utf-8")

    def write(self, **fields) -> None:
        rec = {k: fields.get(k) for k in self.FIELDS}
        rec["time"] = rec["time"] or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
        if rec["duration_s"] is not None:
            rec["duration_s"] = round(float(rec["duration_s"]), 3)
        line = json.dumps(rec, separators=(",", ":"), sort_keys=False)
        with self.lock:
            if self.f.closed:  # a session ending while the service shuts down
                log.warning("audit log closed; dropped: %s", line)
                return
            self.f.write(line + "\n")
            self.f.flush()
            os.fsync(self.f.fileno())

    def close(self) -> None:
        with self.lock:
            self.f.close()


# --------------------------------------------------------------------------- admission
def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string (``ipv4:1.2.3.4:555``, ``ipv6:[::1]:555``)."""
    kind, _, rest = str(peer).partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return str(peer)


class RevocationList:
    """Revoked token ids (``jti``), one per line (``#`` comments), re-read when the file changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path else None
        self._mtime: float | None = None
        self._ids: frozenset[str] = frozenset()
        if self.path is not None and not self.path.is_file():
            raise UserError(f"revoked_tokens: no file at {self.path} (create an empty one, or add ids with "
                            "`xrayfed token revoke`)")

    def __contains__(self, jti: str) -> bool:
        if self.path is None:
            return False
        try:
            m = self.path.stat().st_mtime_ns
        except OSError:  # a revocation list that disappears revokes everything: fail closed
            log.error("revocation list %s cannot be read: refusing every token", self.path)
            return True
        if m != self._mtime:
            ids = set()
            for line in self.path.read_text(encoding="utf-8").splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    ids.add(line)
            self._ids, self._mtime = frozenset(ids), m
        return jti in self._ids


def revoke_token(list_path: Path, token_or_jti: str) -> str:
    """Append a token id to a revocation list (from a token file, a token or a bare jti)."""
    text = token_or_jti.strip()
    p = Path(text)
    if len(text) < 256 and p.is_file():
        text = tokens.read_token_file(p)
    if text.startswith(tokens.PREFIX + "."):
        jti = tokens.peek_claims(text).get("jti")
        if not jti:
            raise UserError("token revoke: that token has no jti")
    else:
        jti = text
    if not jti or any(c.isspace() or c == "#" for c in jti):
        raise UserError(f"token revoke: {token_or_jti!r} is neither a token file, a token nor a token id")
    list_path = Path(list_path)
    list_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(list_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(jti + "\n")
        f.flush()
        os.fsync(f.fileno())
    return jti


class Admission:
    """Who may open a session now: per-token and per-peer concurrency, per-token rate and
    lifetime budget. Sessions opened before a restart count (read back from the audit log)."""

    HOUR = 3600.0

    def __init__(self, cfg, audit_path: Path | None = None) -> None:
        self.cfg = cfg
        self.lock = threading.Lock()
        self.by_token: dict[str, int] = {}
        self.by_peer: dict[str, int] = {}
        self.starts: dict[str, list[float]] = {}  # wall-clock starts per token (last hour kept)
        self.total: dict[str, int] = {}
        if audit_path is not None and Path(audit_path).is_file():
            self._replay(Path(audit_path))

    def _replay(self, path: Path) -> None:
        now = time.time()
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                r = json.loads(line)
                if r.get("event") != "predict" or r.get("outcome") in (None, "refused") or not r.get("token_id"):
                    continue
                jti = str(r["token_id"])
                self.total[jti] = self.total.get(jti, 0) + 1
                t = _dt.datetime.fromisoformat(str(r["time"])).timestamp()
                if now - t < self.HOUR:
                    self.starts.setdefault(jti, []).append(t)
            except (ValueError, TypeError, KeyError):
                continue

    def admit(self, jti: str, peer: str) -> tuple[str, str] | None:
        """Reserve a session for ``jti`` from ``peer``; None, or ``(reason, message)`` when refused."""
        c, now = self.cfg, time.time()
        with self.lock:
            if self.by_token.get(jti, 0) >= c.max_sessions_per_token:
                return "busy_token", (f"this token already has {self.by_token[jti]} session(s) open (at most "
                                      f"{c.max_sessions_per_token}); finish or wait for it")
            if self.by_peer.get(peer, 0) >= c.max_sessions_per_peer:
                return "busy_peer", (f"{self.by_peer[peer]} session(s) are already open from your address (at most "
                                     f"{c.max_sessions_per_peer}); try again shortly")
            if self.total.get(jti, 0) >= c.prediction_budget_per_token:
                return "budget_spent", (f"this token has used its {c.prediction_budget_per_token} predictions; ask "
                                        "the hospital for a new token")
            recent = [t for t in self.starts.get(jti, []) if now - t < self.HOUR]
            self.starts[jti] = recent
            if len(recent) >= c.predictions_per_token_per_hour:
                wait = int(self.HOUR - (now - min(recent))) + 1
                return "rate_limited", (f"at most {c.predictions_per_token_per_hour} predictions per hour per token; "
                                        f"try again in {wait} s")
            self.by_token[jti] = self.by_token.get(jti, 0) + 1
            self.by_peer[peer] = self.by_peer.get(peer, 0) + 1
            recent.append(now)
            self.total[jti] = self.total.get(jti, 0) + 1
        return None

    def release(self, jti: str, peer: str, *, counted: bool = True) -> None:
        """End a reservation; ``counted = False`` when no session was started (gives the
        prediction back)."""
        with self.lock:
            for d, k in ((self.by_token, jti), (self.by_peer, peer)):
                n = d.get(k, 0) - 1
                if n > 0:
                    d[k] = n
                else:
                    d.pop(k, None)
            if not counted:
                self.total[jti] = max(0, self.total.get(jti, 0) - 1)
                if self.starts.get(jti):
                    self.starts[jti].pop()

