"""The server-side session check: logout, refresh-token reuse and disabling a user end access tokens at once.

An access token carries ``sid``, its login's session (the refresh-token family, api/tenancy/auth.py). Revoking
a session or disabling a user writes a ``session_revocations`` row (migration api_0014; a trigger writes it for
``users.disabled_at``). Each API process holds the recent rows in memory (``SessionRevocations``): the check on
every request — the debit hot path included — is two set lookups, no database round trip.

When it takes effect, stated: in the process that handled the logout or the reuse, before its response is sent
(``note``); in every other process, and for a user disabled in SQL, within ``API_SESSION_SYNC_S`` (0.5 s), the
background ``sync`` period. ``sync`` re-reads an overlap window (rows can commit out of id order), so no row is
missed; rows older than the access-token lifetime are dropped (every token they could stop has expired).
Tokens issued before this check existed have no ``sid``: they are checked by user only and expire within the
access-token lifetime.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import datetime, timedelta

import structlog
from sqlalchemy import Connection, Engine, text

log = structlog.get_logger("meterline.api.sessions")

#: revocations are kept this long (the longest allowed access-token lifetime, ``API_ACCESS_TOKEN_TTL_S`` ≤ 1 day)
RETENTION = timedelta(days=1, minutes=5)
#: rows are re-read this far back on every sync: a transaction that wrote one may commit this much later
OVERLAP = timedelta(seconds=60)


class SessionRevocations:
    def __init__(self, *, horizon_s: float) -> None:
        self.horizon = timedelta(seconds=horizon_s) + OVERLAP
        self._sessions: dict[str, datetime] = {}
        self._users: dict[str, datetime] = {}
        self._since: datetime | None = None
        self._lock = threading.Lock()

    def is_revoked(self, *, session_id: str | None, user_id: str) -> bool:
        return user_id in self._users or (session_id is not None and session_id in self._sessions)

    def note(self, *, session_ids: Iterable[str] = (), user_ids: Iterable[str] = (),
             at: datetime | None = None) -> None:
        """Revoked here and now (the writer's own process does not wait for the next sync)."""
        moment = at or datetime.max.replace(tzinfo=None)
        with self._lock:
            for sid in session_ids:
                self._sessions[sid] = moment
            for uid in user_ids:
                self._users[uid] = moment

    def sync(self, conn: Connection) -> int:
        """Read rows written since the last sync (with overlap); forget rows past the horizon."""
        now = conn.execute(text("SELECT now()")).scalar_one()
        since = (self._since - OVERLAP) if self._since is not None else now - self.horizon
        rows = conn.execute(text("""
            SELECT session_id, user_id, revoked_at FROM session_revocations WHERE revoked_at > :since"""),
            {"since": since}).all()
        floor = now - self.horizon
        with self._lock:
            for session_id, user_id, at in rows:
                if session_id is not None:
                    self._sessions[session_id] = at
                if user_id is not None:
                    self._users[user_id] = at
            for table in (self._sessions, self._users):
                for key in [k for k, at in table.items() if at.tzinfo is not None and at < floor]:
                    del table[key]
            self._since = now
        return len(rows)


def record(conn: Connection, *, session_id: str | None = None, user_id: str | None = None) -> None:
    """Write a revocation in the caller's transaction (every process will see it on its next sync)."""
    conn.execute(text("INSERT INTO session_revocations (session_id, user_id) VALUES (:s, :u)"),
                 {"s": session_id, "u": user_id})


def purge_older_than(conn: Connection, *, cutoff: datetime, limit: int = 5_000) -> int:
    """Maintenance (scheduler): rows older than every access token they could stop."""
    return int(conn.execute(text("""
        DELETE FROM session_revocations WHERE id = ANY(ARRAY(
            SELECT id FROM session_revocations WHERE revoked_at < :cutoff ORDER BY revoked_at LIMIT :limit))"""),
        {"cutoff": cutoff, "limit": limit}).rowcount or 0)


class SessionSync:
    """The background thread that keeps a process's ``SessionRevocations`` current."""

    def __init__(self, engine: Engine, revocations: SessionRevocations, *, every_s: float) -> None:
        self.engine = engine
        self.revocations = revocations
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="session-sync", daemon=True)

    def start(self) -> None:
        self.sync_once()  # the first read happens before the process serves requests
        self._thread.start()

    def sync_once(self) -> bool:
        try:
            with self.engine.begin() as conn:
                self.revocations.sync(conn)
            return True
        except Exception as exc:  # logged; the next round retries
            log.error("session_sync_failed", error=type(exc).__name__)
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sync_once()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
