"""Backfill sessions: usage from another system or after an outage, held, reviewed as a dry-run, then posted
exactly once (close) or dropped (revert). Routes: api/ingest/routes_backfills.py; HTTP contract: api/README.md.

Lifecycle and the invariant each step protects:

1. ``open_session``: a row ``backfill_sessions`` (status ``open``) of the caller's project.
2. ``hold_events`` (``POST /api/v1/events?backfill_session_id=…``): the edge validates events exactly as for live
   ingestion, then INSERTs them into ``backfill_events`` — never into usage.events.v1, so no live worker meters
   them. The session row is read ``FOR SHARE`` first: no event joins a session that is closing or closed (a
   close holds the row ``FOR UPDATE`` and reads the events only after it has it). One row per identity
   (project, source, id) per session (``ON CONFLICT DO NOTHING``): a resent event is held once.
3. ``evaluate``: the held events, minus identities already charged — live (the ledger's dedupe keys,
   ``ledger.backfills.already_charged``) or by an earlier CLOSED session of the project — metered with the
   workers' core in their original periods (``streams.backfill``) into one checkpoint of the virtual source
   ``backfill:{session}``.
4. ``dry_run``: ``ledger.backfills.apply_backfill`` in a transaction that is ROLLED BACK after reading what it
   posted — the close's own computation against the ledger's counters of that instant (allowance, tiers and
   price versions continue the period). Nothing is committed.
5. ``close``: under the session's row lock and a per-project lock (two sessions holding one identity cannot both
   post it): steps 3–4 again, COMMITTED together with status ``closed`` and the result. The virtual source's
   applied mark makes a second application ``stale`` and the status makes a retried close return the stored
   result: a close that crashes (before or after its commit) and is retried posts once.
6. ``revert``: status ``reverted``; nothing was ever posted, nothing is. Held events stay for the record."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, text

from api.errors import ApiError, NotFound
from api.ingest.validate import Accepted
from ledger.backfills import Posted, already_charged, apply_backfill, backfill_source, posted
from ledger.checkpoints import Key
from ledger.sqlrows import rows_json
from streams.backfill import BackfillMetering, HeldEvent, KeyPeriod, meter_backfill

__all__ = ["SESSION_PARAM", "BackfillNotFound", "BackfillNotOpen", "close", "dry_run", "get_session",
           "hold_events", "list_sessions", "open_session", "revert"]

#: The query parameter that routes an ingest request into a session instead of the live topic.
SESSION_PARAM = "backfill_session_id"


class BackfillNotFound(NotFound):
    code = "backfill.not_found"


class BackfillNotOpen(ApiError):
    status = 409
    code = "backfill.not_open"


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    project_id: str
    status: str
    description: str | None
    opened_by: str | None
    opened_at: datetime
    ended_by: str | None
    ended_at: datetime | None
    events: int
    result: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "project_id": self.project_id, "status": self.status,
                "description": self.description, "opened_by": self.opened_by, "opened_at": self.opened_at,
                "ended_by": self.ended_by, "ended_at": self.ended_at, "events": self.events}


_SESSION_COLUMNS = """s.id, s.project_id, s.status, s.description, s.opened_by, s.opened_at, s.ended_by, s.ended_at,
    s.result, (SELECT count(*) FROM backfill_events e WHERE e.session_id = s.id) AS events"""


def _session(row: Any) -> Session:
    return Session(row.id, row.project_id, row.status, row.description, row.opened_by, row.opened_at, row.ended_by,
                   row.ended_at, int(row.events), dict(row.result) if row.result is not None else None)


def open_session(conn: Connection, *, project_id: str, description: str | None, actor: str | None) -> Session:
    sid = f"bf_{uuid.uuid4().hex}"
    conn.execute(text("""INSERT INTO backfill_sessions (id, project_id, description, opened_by)
                         VALUES (:id, :project, :description, :actor)"""),
                 {"id": sid, "project": project_id, "description": description, "actor": actor})
    return get_session(conn, project_id=project_id, session_id=sid)


def get_session(conn: Connection, *, project_id: str, session_id: str, lock: str = "") -> Session:
    """The session of ``project_id``; 404 ``backfill.not_found`` for an unknown id or another project's (never
    revealing which). ``lock``: '' | 'FOR SHARE' | 'FOR UPDATE' of the session row."""
    if lock:
        # lock first (aggregates cannot be locked), then read with the count
        locked = conn.execute(text(f"SELECT id FROM backfill_sessions WHERE id = :id AND project_id = :project "
                                   f"{lock}"), {"id": session_id, "project": project_id}).first()
        if locked is None:
            raise BackfillNotFound(f"backfill session {session_id!r} not found in this project")
    row = conn.execute(text(f"SELECT {_SESSION_COLUMNS} FROM backfill_sessions s "
                            f"WHERE s.id = :id AND s.project_id = :project"),
                       {"id": session_id, "project": project_id}).first()
    if row is None:
        raise BackfillNotFound(f"backfill session {session_id!r} not found in this project")
    return _session(row)


def list_sessions(conn: Connection, *, project_id: str, limit: int) -> list[Session]:
    return [_session(r) for r in conn.execute(text(
        f"SELECT {_SESSION_COLUMNS} FROM backfill_sessions s WHERE s.project_id = :project "
        f"ORDER BY s.opened_at DESC, s.id LIMIT :limit"), {"project": project_id, "limit": limit})]


def _require_open(session: Session, action: str) -> None:
    if session.status != "open":
        raise BackfillNotOpen(f"backfill session {session.id} is {session.status}: cannot {action}",
                              extra={"session_id": session.id, "session_status": session.status})


# --------------------------------------------------------------------------------------------------- hold

_HOLD = text("""
    INSERT INTO backfill_events (session_id, project_id, event_source, event_id, event_time, payload)
    SELECT :sid, :project, e.source, e.id, e.time, convert_to(e.payload, 'UTF8')
    FROM json_to_recordset(CAST(:rows AS json)) AS e(source text, id text, time timestamptz, payload text)
    ORDER BY e.source, e.id
    ON CONFLICT (session_id, event_source, event_id) DO NOTHING
    RETURNING event_id
""")


def hold_events(engine: Engine, *, project_id: str, session_id: str, accepted: list[Accepted]) -> tuple[int, int]:
    """Hold validated events in an open session (one transaction). Returns (held, duplicates)."""
    with engine.begin() as conn:
        session = get_session(conn, project_id=project_id, session_id=session_id, lock="FOR SHARE")
        _require_open(session, "ingest into it")
        unique = {(a.event["source"], a.event["id"]): a for a in accepted}  # a repeat inside one request: once
        rows = rows_json({"source": a.event["source"], "id": a.event["id"], "time": a.event["time"],
                          "payload": a.payload.decode()} for a in unique.values())
        held = len(conn.execute(_HOLD, {"sid": session_id, "project": project_id, "rows": rows}).all())
    return held, len(accepted) - held


# ----------------------------------------------------------------------------------------------- evaluate

_HELD = text("""
    SELECT event_source, event_id, event_time, payload FROM backfill_events WHERE session_id = :sid ORDER BY seq
""")

# identities of this session that an earlier CLOSED session of the project held (and so posted or skipped)
_IN_CLOSED_SESSIONS = text("""
    SELECT DISTINCT mine.event_source, mine.event_id
    FROM backfill_events mine
    JOIN backfill_events other ON other.project_id = mine.project_id AND other.event_source = mine.event_source
         AND other.event_id = mine.event_id AND other.session_id <> mine.session_id
    JOIN backfill_sessions s ON s.id = other.session_id AND s.status = 'closed'
    WHERE mine.session_id = :sid
""")


def _evaluate(conn: Connection, session: Session, *, now: datetime) -> BackfillMetering:
    from streams import catalog as catalog_db
    from streams.catalog_model import ProjectPolicy
    from streams.replay import metering_limits
    from streams.settings import get_settings

    events = [HeldEvent(session.project_id, r.event_source, r.event_id, r.event_time, bytes(r.payload))
              for r in conn.execute(_HELD, {"sid": session.id})]
    skip: dict[int, str] = {}
    for h in already_charged(conn, (e.identity_hash for e in events)):
        skip[h] = "charged_live"
    in_closed = {(r.event_source, r.event_id) for r in conn.execute(_IN_CLOSED_SESSIONS, {"sid": session.id})}
    for e in events:
        if (e.source, e.id) in in_closed:
            skip.setdefault(e.identity_hash, "charged_by_backfill")
    settings = get_settings()
    catalog = catalog_db.load_catalog(conn, default_policy=ProjectPolicy(
        settings.unknown_subjects, settings.allowed_lateness_s))  # type: ignore[arg-type]
    return meter_backfill(events, source_topic=backfill_source(session.id), catalog=catalog,
                          limits=metering_limits(settings), now=now, skip=skip)


def _notes(session_id: str, keys: Mapping[tuple[str, str, datetime, str], KeyPeriod]) -> Any:
    def notes(key: Key) -> dict[str, Any]:
        period = keys.get((key.wallet_id, key.meter_id, key.period_start.astimezone(UTC), key.price_version_id))
        out: dict[str, Any] = {"backfill_session_id": session_id,
                               "original_period_start": key.period_start.astimezone(UTC).isoformat()}
        if period is not None:
            out |= {"original_period_end": period.period_end.isoformat(), "period_closed": period.closed}
        return out
    return notes


def _report(session: Session, metering: BackfillMetering, posts: list[Posted], *, dry_run: bool,
            now: datetime) -> dict[str, Any]:
    """Per wallet, meter, period and price version: the session's units and what is (or would be) charged."""
    by_key: dict[tuple[str, str, datetime, str], list[Posted]] = {}
    for p in posts:
        by_key.setdefault((p.wallet_id, p.meter_id, p.period_start.astimezone(UTC), p.price_version_id), []).append(p)
    charges: list[dict[str, Any]] = []
    wallets: dict[str, int] = {}
    for key in sorted(set(metering.keys) | set(by_key)):
        wallet_id, meter_id, period_start, version_id = key
        period = metering.keys.get(key)
        amount = sum(p.amount_minor for p in by_key.get(key, []))
        charges.append({
            "wallet_id": wallet_id, "meter_id": meter_id, "meter_slug": period.meter_slug if period else None,
            "period_start": period_start.isoformat(),
            "period_end": period.period_end.isoformat() if period else None,
            "period_closed": period.closed if period else None, "price_version_id": version_id,
            "units": format(period.units, "f") if period else None, "events": period.events if period else 0,
            "charge_minor": -amount,
        })
        wallets[wallet_id] = wallets.get(wallet_id, 0) - amount
    return {
        "session_id": session.id, "dry_run": dry_run, "as_of": now.isoformat(),
        "events": metering.events, "accepted": metering.accepted, "unmetered": metering.unmetered,
        "skipped": metering.skipped, "rejected": metering.rejected,
        "charges": charges,
        "wallets": [{"wallet_id": w, "charge_minor": c} for w, c in sorted(wallets.items())],
        "charge_minor": sum(wallets.values()),
        "transactions": len(posts),
    }


def dry_run(engine: Engine, *, project_id: str, session_id: str) -> dict[str, Any]:
    """What closing the session now would post (a closed session: what it posted). Commits nothing."""
    with engine.connect() as conn:
        transaction = conn.begin()
        try:
            session = get_session(conn, project_id=project_id, session_id=session_id)
            if session.status == "closed" and session.result is not None:
                return session.result
            _require_open(session, "compute its charges")
            now = datetime.now(UTC)
            metering = _evaluate(conn, session, now=now)
            if metering.checkpoint.counters:
                apply_backfill(conn, metering.checkpoint, session_id=session.id,
                               notes=_notes(session.id, metering.keys))
            return _report(session, metering, posted(conn, session.id), dry_run=True, now=now)
        finally:
            transaction.rollback()  # a dry-run: the postings above were only read, never committed


_LOCK_PROJECT_BACKFILLS = text("SELECT pg_advisory_xact_lock(hashtextextended('backfill-close:' || :project, 0))")

_END = text("""
    UPDATE backfill_sessions SET status = :status, ended_by = :actor, ended_at = now(), result = CAST(:result AS jsonb)
    WHERE id = :id AND status = 'open'
""")


def close(conn: Connection, *, project_id: str, session_id: str, actor: str | None) -> tuple[dict[str, Any], bool]:
    """Post the session once, in the caller's transaction (the caller commits). Returns (result, posted now?):
    a session already closed returns its stored result and posts nothing."""
    conn.execute(_LOCK_PROJECT_BACKFILLS, {"project": project_id})  # closes of one project, one at a time
    session = get_session(conn, project_id=project_id, session_id=session_id, lock="FOR UPDATE")
    if session.status == "closed" and session.result is not None:
        return session.result, False
    _require_open(session, "close it")
    now = datetime.now(UTC)
    metering = _evaluate(conn, session, now=now)
    if metering.checkpoint.counters:
        # ``stale`` cannot happen while the status and the mark commit together; should a row ever be restored
        # without the other, the mark wins: nothing is posted twice, and ``posted`` reads what the first posted
        apply_backfill(conn, metering.checkpoint, session_id=session.id, notes=_notes(session.id, metering.keys))
    posts = posted(conn, session.id)
    result = _report(session, metering, posts, dry_run=False, now=now) | {
        "transaction_ids": [p.transaction_id for p in posts]}
    conn.execute(_END, {"status": "closed", "actor": actor, "id": session.id,
                        "result": orjson.dumps(result).decode()})
    return result, True


def revert(conn: Connection, *, project_id: str, session_id: str, actor: str | None) -> Session:
    """Drop the session: nothing is posted. Reverting a reverted session is a no-op; a closed one is a 409."""
    session = get_session(conn, project_id=project_id, session_id=session_id, lock="FOR UPDATE")
    if session.status == "reverted":
        return session
    _require_open(session, "revert it (a closed session's charges stay; correct them with an adjustment)")
    conn.execute(_END, {"status": "reverted", "actor": actor, "id": session.id, "result": None})
    return get_session(conn, project_id=project_id, session_id=session_id)
