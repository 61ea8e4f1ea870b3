"""What the receipts reconciliation's provider planners share: the rebuilt event (``Rebuilt``), reading the
state Meterline has (payments, entitlements, settled reconciliation events) without changing it, and times."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, text

from api.payments.handlers import Parsed


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """A provider event rebuilt from the provider's API, in the shape its webhook has, to run through the
    webhook handlers. ``what`` says in words what was missing (for the report)."""

    parsed: Parsed
    body: bytes
    what: str


def dump(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, default=lambda v: str(v) if isinstance(v, Decimal) else v.isoformat(),
                      sort_keys=True).encode()


def iso(value: Any) -> datetime | None:
    if not value or not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def ms(moment: datetime | None) -> int | None:
    return int(moment.timestamp() * 1000) if moment is not None else None


def payment(conn: Connection, *, project_id: str, provider: str, external_id: str) -> Any:
    return conn.execute(text("""
        SELECT id, external_id, status, amount_minor, credits_minor, refunded_minor, entitlement_id FROM payments
        WHERE project_id = :p AND provider = :v AND external_id = :x"""),
                        {"p": project_id, "v": provider, "x": external_id}).mappings().first()


def entitlement(conn: Connection, *, project_id: str, provider: str, external_subscription_id: str) -> Any:
    return conn.execute(text("""
        SELECT id, wallet_id, offer_id, external_subscription_id, status, state_at, current_period_end
        FROM entitlements WHERE project_id = :p AND provider = :v AND external_subscription_id = :s"""),
                        {"p": project_id, "v": provider, "s": external_subscription_id}).mappings().first()


def settled(conn: Connection, *, project_id: str, provider: str, event_ids: list[str]) -> set[str]:
    """Which of these rebuilt events were applied already (settled rows; a deferred one counts: it waits)."""
    if not event_ids:
        return set()
    return set(conn.execute(text("""
        SELECT event_id FROM webhook_events WHERE project_id = :p AND provider = :v AND event_id = ANY(:e)
          AND status IN ('processed', 'deferred', 'ignored', 'unmatched', 'held', 'dismissed')"""),
                            {"p": project_id, "v": provider, "e": event_ids}).scalars())
