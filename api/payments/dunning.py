"""Dunning: a subscription whose payment failed (``past_due``) keeps access for a grace period, then expires.

- An entitlement entering ``past_due`` (Stripe ``past_due``/``unpaid``/``incomplete``, RevenueCat BILLING_ISSUE,
  Lemon Squeezy ``past_due``/``unpaid``) records ``past_due_since`` (the provider's time of that event;
  api/payments/effects.py ``upsert_entitlement``). Leaving ``past_due`` clears it.
- The scheduler's ``expire_past_due`` job (meterline/scheduler.py) moves every entitlement ``past_due`` for longer
  than ``API_DUNNING_GRACE_S`` to ``expired``: no access (``expired`` is not an access status), ``will_renew``
  false. It does NOT move ``state_at``, so the provider's next event (the payment recovered: ``active``) still
  applies and reopens it; ``expired`` is not final, ``ended`` is.
- Every status change — by a webhook or by this job — is an ``entitlement_events`` row (from, to, why, when),
  listed by ``GET /api/v1/projects/{id}/entitlement-events`` for the dashboard (and, later, outbound webhooks).
- Credits are granted per paid invoice / store transaction (ledger key ``pay:{project}:{provider}:{payment}``), never
  per status: a period's credits come with its payment, so a recovery grants the recovered payment's credits once
  and nothing for the unpaid time, however many events announce it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import Connection, text

BATCH = 500


class DunningSettings(BaseSettings):
    """Read by the scheduler (``expire_past_due``)."""

    model_config = SettingsConfigDict(env_prefix="API_", extra="ignore", populate_by_name=True)

    dunning_grace_s: int = Field(default=7 * 24 * 3600, ge=0, le=90 * 24 * 3600,
                                 description="how long a past_due subscription keeps access before it expires")


def record_change(conn: Connection, *, project_id: str, entitlement_id: str, from_status: str | None,
                  to_status: str, reason: str, at: datetime) -> None:
    conn.execute(text("""
        INSERT INTO entitlement_events (project_id, entitlement_id, from_status, to_status, reason, at)
        VALUES (:p, :e, :f, :t, :r, :at)"""),
                 {"p": project_id, "e": entitlement_id, "f": from_status, "t": to_status, "r": reason, "at": at})


def expire_past_due(conn: Connection, *, now: datetime, grace_s: int, limit: int = BATCH) -> int:
    """Expire up to ``limit`` entitlements past_due since more than ``grace_s``; how many."""
    rows = conn.execute(text("""
        UPDATE entitlements SET status = 'expired', will_renew = false, updated_at = now()
        WHERE id IN (SELECT id FROM entitlements WHERE status = 'past_due' AND past_due_since <= :cutoff
                     ORDER BY past_due_since LIMIT :limit FOR UPDATE SKIP LOCKED)
        RETURNING id, project_id, past_due_since"""),
                        {"cutoff": now - timedelta(seconds=grace_s), "limit": limit}).all()
    for row in rows:
        record_change(conn, project_id=row.project_id, entitlement_id=row.id, from_status="past_due",
                      to_status="expired", at=now,
                      reason=f"dunning: past_due since {row.past_due_since.isoformat()}, the grace period "
                             f"({grace_s} s) ended without a payment")
    return len(rows)


def list_events(conn: Connection, *, project_id: str, wallet_id: str | None, limit: int) -> list[dict[str, Any]]:
    rows = conn.execute(text("""
        SELECT v.id, v.entitlement_id, e.wallet_id, e.provider, e.external_subscription_id, v.from_status,
               v.to_status, v.reason, v.at, v.created_at
        FROM entitlement_events v JOIN entitlements e ON e.id = v.entitlement_id
        WHERE v.project_id = :p AND (CAST(:w AS text) IS NULL OR e.wallet_id = :w)
        ORDER BY v.id DESC LIMIT :limit"""), {"p": project_id, "w": wallet_id, "limit": limit}).mappings().all()
    return [dict(r) for r in rows]
