"""Receiving a provider webhook: verify → store → dedupe → apply → wake deferred events, in ONE transaction.

1. The raw body is verified against the project's secret (api/payments/signatures.py). A delivery that fails is
   answered 400 and stored as ``rejected`` (its own transaction) — nothing else changes. Anyone can send one,
   so only its sha256, its size and a ``UNVERIFIED_PREFIX_BYTES`` prefix are kept (a ``duplicate`` likewise),
   and the scheduler's ``purge_webhook_deliveries`` job deletes them after the retention (``purge_unverified``);
   the route rate-limits deliveries per client address and project (api/payments/routes_webhooks.py).
2. Webhooks of one (project, provider) are applied one at a time (a transaction-scoped advisory lock), so a
   deferred event and the event it waits for can never miss each other.
3. The event row is inserted with a settling status; the partial unique index on (project, provider, event id)
   makes a redelivery (or a concurrent twin) a ``duplicate``: 200, and the ledger is not touched.
4. A sandbox / test-mode event (RevenueCat ``environment: SANDBOX``, Lemon Squeezy ``test_mode``) of a project
   whose provider config does not ``accept_sandbox`` is ``ignored`` with how to accept it (the handler does not
   run); after accepting, ``replay`` re-runs it.
   Otherwise the handler runs in a savepoint. ``Defer`` → ``deferred`` (nothing it did is kept); ``Unmatched`` →
   ``unmatched``; otherwise ``processed`` (``ignored`` when it had no effect) with the ledger transaction ids.
5. Every thing the event created (a subscription, a payment) wakes the deferred events waiting for it; they run
   in the same transaction, in arrival order.
An unexpected error rolls everything back, stores a ``failed`` row and answers 500, so the provider retries;
a failed row does not count as settled, so the retry is applied normally.

A purchase for a wallet closed by an account erasure request raises ``Held`` → ``held`` (200): kept, with what
to do; an admin replays it after cancelling the erasure, or dismisses it (``dismissed``) after refunding it in
the provider's dashboard.

Statuses answered 200: processed, ignored, unmatched, deferred, held, duplicate (the provider must not retry those;
deferred and unmatched are completed later by another event or an admin replay)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, text

from api.payments.config import accepts_sandbox, webhook_secret
from api.payments.effects import Ctx, Defer, Held, Unmatched
from api.payments.handlers import HANDLERS, PARSERS, SANDBOX, Parsed
from api.payments.signatures import WebhookMalformed, WebhookRejected, signature_header, verify
from api.settings import ApiSettings

log = logging.getLogger("meterline.api.webhooks")
WAKE_ROUNDS_MAX = 20
#: what is kept of a delivery that did not verify (or repeats a settled one): enough to recognise it, no more
UNVERIFIED_PREFIX_BYTES = 256
UNVERIFIED_STATUSES = ("rejected", "duplicate")
PURGE_BATCH_ROWS = 5_000


@dataclass(frozen=True, slots=True)
class Outcome:
    webhook_event_id: int
    status: str
    event_id: str | None
    detail: str | None = None
    transaction_ids: tuple[int, ...] = ()

    def body(self) -> dict[str, Any]:
        return {"received": True, "status": self.status, "event_id": self.event_id,
                "webhook_event_id": self.webhook_event_id, "detail": self.detail,
                "transaction_ids": list(self.transaction_ids)}


def _project_exists(conn: Connection, project_id: str) -> bool:
    return conn.execute(text("SELECT 1 FROM projects WHERE id = :p"), {"p": project_id}).first() is not None


def _store(conn: Connection, *, project_id: str, provider: str, body: bytes, signature: str | None,
           status: str, event_id: str | None = None, event_type: str | None = None, error: str | None = None,
           on_conflict: bool = False, origin: str = "webhook") -> int | None:
    sql = """
        INSERT INTO webhook_events (project_id, provider, event_id, event_type, status, error, body, body_sha256,
                                    signature, body_bytes, origin)
        VALUES (:p, :v, :e, :t, :s, :err, :b, :h, :sig, :n, :origin)"""
    if on_conflict:
        sql += """ ON CONFLICT (project_id, provider, event_id)
                   WHERE status IN ('processed', 'deferred', 'ignored', 'unmatched', 'held', 'dismissed')
                   DO NOTHING"""
    unverified = status in UNVERIFIED_STATUSES
    row = conn.execute(text(sql + " RETURNING id"), {
        "p": project_id, "v": provider, "e": event_id, "t": event_type, "s": status, "err": error,
        "b": body[:UNVERIFIED_PREFIX_BYTES] if unverified else body, "h": hashlib.sha256(body).hexdigest(),
        "sig": signature[:512] if signature else signature, "n": len(body), "origin": origin}).first()
    return int(row[0]) if row else None


def purge_unverified(conn: Connection, *, cutoff: datetime, limit: int = PURGE_BATCH_ROWS) -> int:
    """Maintenance: delete up to ``limit`` rejected/duplicate deliveries received before ``cutoff``, oldest
    first. They changed nothing and nothing refers to them (deferred events wait in ``processed``-family rows)."""
    return int(conn.execute(text("""
        DELETE FROM webhook_events WHERE id = ANY(ARRAY(
            SELECT id FROM webhook_events WHERE status IN ('rejected', 'duplicate') AND received_at < :cutoff
            ORDER BY received_at LIMIT :limit))"""), {"cutoff": cutoff, "limit": limit}).rowcount or 0)


def receive(engine: Engine, settings: ApiSettings, *, project_id: str, provider: str, body: bytes,
            headers: Mapping[str, str]) -> Outcome:
    """Verify and apply one delivery. Raises WebhookRejected / WebhookMalformed (400) for bad deliveries."""
    signature = signature_header(provider, headers)
    with engine.begin() as conn:
        known = _project_exists(conn, project_id)
        secret = webhook_secret(conn, settings, project_id=project_id, provider=provider) if known else None
    try:
        if not known:
            raise WebhookRejected("no such webhook endpoint")
        verify(provider, body, headers, secret)
        parsed = PARSERS[provider](body)
    except (WebhookRejected, WebhookMalformed) as exc:
        if known:
            with engine.begin() as conn:
                _store(conn, project_id=project_id, provider=provider, body=body, signature=signature,
                       status="rejected", error=f"{exc.code}: {exc.detail}")
        raise
    try:
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 11))"),
                         {"k": f"webhooks:{project_id}:{provider}"})
            row_id = _store(conn, project_id=project_id, provider=provider, body=body, signature=signature,
                            status="processed", event_id=parsed.event_id, event_type=parsed.event_type,
                            on_conflict=True)
            if row_id is None:
                duplicate = _store(conn, project_id=project_id, provider=provider, body=body, signature=signature,
                                   status="duplicate", event_id=parsed.event_id, event_type=parsed.event_type)
                assert duplicate is not None
                return Outcome(duplicate, "duplicate", parsed.event_id, "this event was received before")
            outcome = apply(conn, project_id=project_id, provider=provider, row_id=row_id, parsed=parsed)
            wake(conn, project_id=project_id, provider=provider, refs=outcome[1])
            return outcome[0]
    except Exception as exc:
        log.exception("webhook %s/%s failed", provider, parsed.event_id)
        with engine.begin() as conn:
            _store(conn, project_id=project_id, provider=provider, body=body, signature=signature, status="failed",
                   event_id=parsed.event_id, event_type=parsed.event_type, error=f"{type(exc).__name__}: {exc}"[:2000])
        raise


def apply_reconciled(conn: Connection, *, project_id: str, provider: str, parsed: Parsed,
                     body: bytes) -> Outcome | None:
    """Apply an event the receipts reconciliation rebuilt from the provider's API (api/payments/reconciliation.py)
    exactly as a delivery: same lock, same settle-once row (``origin`` reconciliation, event id ``reconcile:…``),
    same handler, same wake-ups. None when that event was applied before. Its purchases use the ledger key of the
    payment, so the real webhook arriving later (or earlier) credits nothing more."""
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 11))"),
                 {"k": f"webhooks:{project_id}:{provider}"})
    row_id = _store(conn, project_id=project_id, provider=provider, body=body, signature=None, status="processed",
                    event_id=parsed.event_id, event_type=parsed.event_type, on_conflict=True, origin="reconciliation")
    if row_id is None:
        return None
    outcome, woken = apply(conn, project_id=project_id, provider=provider, row_id=row_id, parsed=parsed)
    wake(conn, project_id=project_id, provider=provider, refs=woken)
    return outcome


def apply(conn: Connection, *, project_id: str, provider: str, row_id: int, parsed: Parsed) -> tuple[Outcome, list[str]]:
    """Run the handler for the stored event ``row_id`` and record its status. Returns the refs it woke."""
    ctx = Ctx(conn=conn, project_id=project_id, provider=provider, event_id=parsed.event_id,
              event_type=parsed.event_type, at=parsed.at)
    status, detail, defer_ref = "processed", None, None
    sandbox = SANDBOX[provider](parsed.payload)
    try:
        if sandbox and not accepts_sandbox(conn, project_id=project_id, provider=provider):
            ctx.ignore(
                f"{sandbox}: this project does not accept sandbox purchases from {provider}, nothing was granted. "
                f"To accept them: PUT /api/v1/projects/{project_id}/payment-providers/{provider} with "
                f'{{"accept_sandbox": true}}, then replay this event: '
                f"POST /api/v1/projects/{project_id}/webhook-events/{row_id}/replay")
        else:
            with conn.begin_nested():
                HANDLERS[provider](ctx, parsed.payload)
    except Defer as deferred:
        status, detail, defer_ref = "deferred", deferred.reason, deferred.ref
        ctx.transaction_ids.clear()
        ctx.wakes.clear()
    except Unmatched as unmatched:
        status, detail = "unmatched", str(unmatched)
        ctx.transaction_ids.clear()
        ctx.wakes.clear()
    except Held as held:
        status, detail = "held", str(held).replace("{id}", str(row_id))
        ctx.transaction_ids.clear()
        ctx.wakes.clear()
    else:
        if ctx.ignored and not ctx.transaction_ids and not ctx.wakes:
            status = "ignored"
        detail = "; ".join(ctx.notes) or None
    conn.execute(text("""
        UPDATE webhook_events SET status = :s, error = :d, defer_ref = :r, transaction_ids = :t,
                                  processed_at = CASE WHEN :s = 'deferred' THEN NULL ELSE now() END
        WHERE id = :id"""), {"s": status, "d": detail, "r": defer_ref, "t": ctx.transaction_ids, "id": row_id})
    return Outcome(row_id, status, parsed.event_id, detail, tuple(ctx.transaction_ids)), ctx.wakes


def wake(conn: Connection, *, project_id: str, provider: str, refs: list[str]) -> None:
    """Re-run the deferred events waiting for ``refs`` (and for whatever those create), oldest first."""
    pending = list(dict.fromkeys(refs))
    for _ in range(WAKE_ROUNDS_MAX):
        if not pending:
            return
        rows = conn.execute(text("""
            SELECT id, body FROM webhook_events
            WHERE project_id = :p AND provider = :v AND status = 'deferred' AND defer_ref = ANY(:refs)
            ORDER BY id FOR UPDATE"""), {"p": project_id, "v": provider, "refs": pending}).all()
        pending = []
        for row in rows:
            _, woken = apply(conn, project_id=project_id, provider=provider, row_id=row.id,
                             parsed=PARSERS[provider](bytes(row.body)))
            pending.extend(woken)


def replayable(provider: str, status: str, body: bytes) -> bool:
    """Deferred, unmatched and held events, and sandbox events that were ignored (the project may accept them
    now)."""
    if status in ("deferred", "unmatched", "held"):
        return True
    return status == "ignored" and SANDBOX[provider](PARSERS[provider](body).payload) is not None


def dismiss(conn: Connection, *, project_id: str, webhook_event_id: int, reason: str) -> Outcome | None:
    """Close a HELD event for good (e.g. the operator refunded the purchase in the provider's dashboard): it is
    stored ``dismissed`` with the reason and never applied. None when the event is not held."""
    row = conn.execute(text("""
        UPDATE webhook_events SET status = 'dismissed', error = :reason, processed_at = now()
        WHERE id = :id AND project_id = :p AND status = 'held' RETURNING id, event_id"""),
                       {"id": webhook_event_id, "p": project_id, "reason": f"dismissed: {reason}"}).first()
    return Outcome(int(row.id), "dismissed", row.event_id, f"dismissed: {reason}") if row else None


def replay(conn: Connection, *, project_id: str, webhook_event_id: int) -> Outcome | None:
    """Re-run a stored (already verified) deferred or unmatched event, e.g. after adding the missing offer, or
    an ignored sandbox event after the project accepted sandbox purchases."""
    row = conn.execute(text("""
        SELECT id, provider, body, status FROM webhook_events WHERE id = :id AND project_id = :p FOR UPDATE"""),
                       {"id": webhook_event_id, "p": project_id}).first()
    if row is None or not replayable(row.provider, row.status, bytes(row.body)):
        return None
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 11))"),
                 {"k": f"webhooks:{project_id}:{row.provider}"})
    outcome, woken = apply(conn, project_id=project_id, provider=row.provider, row_id=row.id,
                           parsed=PARSERS[row.provider](bytes(row.body)))
    wake(conn, project_id=project_id, provider=row.provider, refs=woken)
    return outcome
