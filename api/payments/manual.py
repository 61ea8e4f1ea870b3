"""Entitlements granted by an admin instead of a payment provider (``provider = 'manual'``).

For local testing (try ``requires_entitlement`` without Stripe) and for sales-led customers (a contract, not a
checkout). Same table and same meaning as a paid subscription: access checks read it like any other. Rules:

- one grant per (project, reference): the reference is the admin's (a contract number) or generated, so a
  retried grant with the same reference returns the entitlement it made (and never grants credits twice);
- the plan is a plan of the project (a credit pack is not an entitlement); the period ends at ``period_end``
  (null: until ended by an admin);
- optional credits: the plan's ``credits_minor`` as a subscription grant on the wallet, expiring with the period
  when the plan's credits do (``credits_expire = period_end`` + grace) — the ledger's idempotency key is derived
  from the entitlement, so the credits are granted at most once;
- only manual entitlements can be ended here (a paid one ends through its provider); ending is final.
Every change is audited by the route.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, text

from api.errors import Conflict, NotFound
from api.payments import offers
from api.payments.dunning import record_change
from api.payments.effects import Entitlement
from ledger import service
from ledger.contracts import TransactionKind

PROVIDER = "manual"


def find(conn: Connection, *, project_id: str, reference: str) -> Entitlement | None:
    row = conn.execute(text("""
        SELECT * FROM entitlements WHERE project_id = :p AND provider = :v AND external_subscription_id = :r"""),
                       {"p": project_id, "v": PROVIDER, "r": reference}).mappings().first()
    return Entitlement.of(row) if row else None


def grant(conn: Connection, *, project_id: str, wallet_id: str, plan: str, reference: str | None,
          period_end: datetime | None, grant_credits: bool, reason: str) -> tuple[Entitlement, bool, int | None]:
    """(entitlement, created now, credits transaction id)."""
    offer = offers.require_offer(conn, project_id=project_id, slug=plan, kind="plan")
    ref = reference or f"manual_{uuid.uuid4().hex[:20]}"
    existing = find(conn, project_id=project_id, reference=ref)
    if existing is not None:
        if existing.wallet_id != wallet_id or existing.offer_id != offer.id:
            raise Conflict(f"reference {ref!r} already granted another plan or wallet", extra={"entitlement_id":
                                                                                              existing.id})
        return existing, False, None
    now = datetime.now(UTC)
    if period_end is not None and period_end <= now:
        raise Conflict("period_end is in the past: the entitlement would grant nothing")
    row = conn.execute(text("""
        INSERT INTO entitlements (id, project_id, wallet_id, offer_id, provider, external_subscription_id, status,
            will_renew, current_period_start, current_period_end, state_at)
        VALUES (:id, :p, :w, :o, :v, :r, 'active', false, :start, :end, :start)
        ON CONFLICT (project_id, provider, external_subscription_id) DO NOTHING
        RETURNING *"""), {"id": f"ent_{uuid.uuid4().hex[:20]}", "p": project_id, "w": wallet_id, "o": offer.id,
                          "v": PROVIDER, "r": ref, "start": now, "end": period_end}).mappings().first()
    if row is None:  # a concurrent grant with the same reference won: answer with it
        again = find(conn, project_id=project_id, reference=ref)
        assert again is not None
        return again, False, None
    entitlement = Entitlement.of(row)
    record_change(conn, project_id=project_id, entitlement_id=entitlement.id, from_status=None, to_status="active",
                  reason=f"manual grant: {reason}", at=now)
    transaction_id = None
    if grant_credits and offer.credits_minor > 0:
        expires_at = (period_end + timedelta(seconds=offer.credits_grace_s)
                      if period_end is not None and offer.expires_with_period else None)
        posted = service.grant_credits(conn, wallet_id=wallet_id, amount_minor=offer.credits_minor,
                                       idempotency_key=f"manual-entitlement:{entitlement.id}:credits",
                                       kind=TransactionKind.SUBSCRIPTION_GRANT, expires_at=expires_at,
                                       source_ref=f"plan:{offer.slug}:{entitlement.id}", reason=reason)
        transaction_id = posted.transaction.id
    return entitlement, True, transaction_id


def end(conn: Connection, *, project_id: str, wallet_id: str, entitlement_id: str) -> tuple[dict[str, Any], Entitlement]:
    """End a manual entitlement now; returns (its state before, after)."""
    row = conn.execute(text("""
        SELECT * FROM entitlements WHERE id = :id AND project_id = :p AND wallet_id = :w FOR UPDATE"""),
                       {"id": entitlement_id, "p": project_id, "w": wallet_id}).mappings().first()
    if row is None:
        raise NotFound(f"no entitlement {entitlement_id!r} on this wallet")
    if row["provider"] != PROVIDER:
        raise Conflict(f"a {row['provider']} subscription ends through {row['provider']}, not here")
    before = {"status": row["status"], "current_period_end": row["current_period_end"]}
    after = conn.execute(text("""
        UPDATE entitlements SET status = 'ended', ended_at = coalesce(ended_at, now()), will_renew = false,
                                state_at = now(), updated_at = now()
        WHERE id = :id RETURNING *"""), {"id": entitlement_id}).mappings().one()
    if row["status"] != "ended":
        record_change(conn, project_id=project_id, entitlement_id=entitlement_id, from_status=row["status"],
                      to_status="ended", reason="manual end", at=after["state_at"])
    return before, Entitlement.of(after)
