"""RevenueCat side of the receipts reconciliation: which customers to look up, and what their Customer Info
(``GET /v1/subscribers/{app_user_id}``, REST API v1) shows that Meterline has not applied.

The API has no list of customers, so the job looks up the customers Meterline knows could have bought: subjects
seen within the look-back window (``subject_keys``), the wallets of RevenueCat entitlements that have not
ended, and the ``app_user_id`` of RevenueCat webhooks received within the window — newest first, at most
``payments_reconcile_subscribers_max`` a run (the report says how many were left out).

From ``subscriber.subscriptions`` (one entry per product: its LATEST store transaction ``store_transaction_id``,
``purchase_date``, ``expires_date``, ``period_type``, ``unsubscribe_detected_at``, ``billing_issues_detected_at``,
``refunded_at``, ``price``) and ``subscriber.non_subscriptions`` (per product, every purchase with its
``store_transaction_id``) the planner rebuilds the webhook events that are missing:

- a transaction with no payment row, bought within the window → INITIAL_PURCHASE (no entitlement yet) or RENEWAL
  (ledger key ``pay:{project}:revenuecat:{store transaction}``, the same as the webhook's ``transaction_id``);
  a NON_RENEWING_PURCHASE for a pack (the API states no price for it: the payment records 0);
- then the state the API shows and the entitlement lacks, each at the provider's own moment: refunded →
  CANCELLATION (CUSTOMER_SUPPORT, the webhook's refund), expired → EXPIRATION at ``expires_date``, billing issue →
  BILLING_ISSUE, unsubscribed → CANCELLATION, re-subscribed → UNCANCELLATION (at the request's date).
A transaction without ``store_transaction_id`` is never granted (nothing would tie it to its webhook): noted.
The subscription of an entitlement is found by its payment (the transaction), else by the transaction as the
original one, else by the customer's live RevenueCat entitlement for that product."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from api.payments.handlers import Parsed
from api.payments.provider_api import ProviderApiError
from api.payments.reconcile_common import Rebuilt, dump, entitlement, iso, ms, payment, settled

PROVIDER = "revenuecat"


def candidates(conn: Connection, *, project_id: str, since: datetime, limit: int) -> tuple[list[str], int]:
    """App user ids to look up, newest activity first, and how many more there were beyond ``limit``."""
    rows = conn.execute(text("""
        WITH refs AS (
            SELECT subject AS ref, created_at AS at FROM subject_keys WHERE project_id = :p AND created_at >= :since
            UNION ALL
            SELECT CASE WHEN w.owner_kind = 'subject' THEN w.owner_ref ELSE w.id END, e.updated_at
            FROM entitlements e JOIN wallets w ON w.id = e.wallet_id
            WHERE e.project_id = :p AND e.provider = 'revenuecat' AND e.status <> 'ended'
            UNION ALL
            SELECT convert_from(body, 'UTF8')::jsonb #>> '{event,app_user_id}', received_at FROM webhook_events
            WHERE project_id = :p AND provider = 'revenuecat' AND origin = 'webhook' AND received_at >= :since
              AND status NOT IN ('rejected', 'duplicate'))
        SELECT ref FROM refs WHERE ref IS NOT NULL AND ref <> '' GROUP BY ref ORDER BY max(at) DESC, ref
        LIMIT :n"""), {"p": project_id, "since": since, "n": limit + 1}).scalars().all()
    refs = list(rows)
    if len(refs) <= limit:
        return refs, 0
    total = conn.execute(text("""
        SELECT count(DISTINCT ref) FROM (
            SELECT subject AS ref FROM subject_keys WHERE project_id = :p AND created_at >= :since
            UNION ALL SELECT e.wallet_id FROM entitlements e
            WHERE e.project_id = :p AND e.provider = 'revenuecat' AND e.status <> 'ended') r"""),
                         {"p": project_id, "since": since}).scalar_one()
    return refs[:limit], max(1, int(total) - limit)


def _known_wallet(conn: Connection, project_id: str, app_user_id: str) -> str | None:
    return conn.execute(text("""
        SELECT id FROM wallets WHERE id = :u AND project_id = :p
        UNION ALL SELECT wallet_id FROM subject_keys WHERE project_id = :p AND subject = :u LIMIT 1"""),
                        {"p": project_id, "u": app_user_id}).scalar()


def _entitlement_of(conn: Connection, project_id: str, transaction: str, wallet_id: str | None,
                    product: str) -> Any:
    paid = payment(conn, project_id=project_id, provider=PROVIDER, external_id=transaction)
    if paid is not None and paid["entitlement_id"] is not None:
        row = conn.execute(text("SELECT external_subscription_id FROM entitlements WHERE id = :id"),
                           {"id": paid["entitlement_id"]}).scalar()
        if row is not None:
            return entitlement(conn, project_id=project_id, provider=PROVIDER, external_subscription_id=row)
    found = entitlement(conn, project_id=project_id, provider=PROVIDER, external_subscription_id=transaction)
    if found is not None or wallet_id is None:
        return found
    other = conn.execute(text("""
        SELECT e.external_subscription_id FROM entitlements e JOIN payment_offers o ON o.id = e.offer_id
        WHERE e.project_id = :p AND e.provider = 'revenuecat' AND e.wallet_id = :w
          AND o.revenuecat_product_id = :product AND e.status <> 'ended'
        ORDER BY e.created_at DESC LIMIT 1"""), {"p": project_id, "w": wallet_id, "product": product}).scalar()
    return entitlement(conn, project_id=project_id, provider=PROVIDER, external_subscription_id=other) if other \
        else None


def _event(app_user_id: str, event_type: str, key: str, at: datetime, what: str, **fields: Any) -> Rebuilt:
    event_id = f"reconcile:{event_type}:{key}"
    event = {"id": event_id, "type": event_type, "app_user_id": app_user_id, "event_timestamp_ms": ms(at),
             "meterline_reconciliation": f"GET /v1/subscribers/{app_user_id}", **fields}
    return Rebuilt(Parsed(event_id, event_type, at, event), dump({"api_version": "1.0", "event": event}), what)


def plan(conn: Connection, *, project_id: str, app_user_id: str, info: dict[str, Any], now: datetime,
         since: datetime, notes: list[str]) -> list[Rebuilt]:
    """The events missing for one customer, purchases first (a state change needs its entitlement: it is
    planned on the next pass, after the purchase created it)."""
    subscriber = info.get("subscriber")
    if not isinstance(subscriber, dict):
        raise ProviderApiError("bad_json", f"GET /v1/subscribers/{app_user_id}: no subscriber object")
    request_at = iso(info.get("request_date")) or now
    wallet_id = _known_wallet(conn, project_id, app_user_id)
    out: list[Rebuilt] = []
    for product, sub in (subscriber.get("subscriptions") or {}).items():
        if isinstance(sub, dict):
            out.extend(_subscription(conn, project_id, app_user_id, wallet_id, str(product), sub, now=now,
                                     since=since, request_at=request_at, notes=notes))
    for product, items in (subscriber.get("non_subscriptions") or {}).items():
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict):
                out.extend(_one_time(conn, project_id, app_user_id, str(product), item, since=since, notes=notes))
    done = settled(conn, project_id=project_id, provider=PROVIDER, event_ids=[r.parsed.event_id for r in out])
    return [r for r in out if r.parsed.event_id not in done]


def _subscription(conn: Connection, project_id: str, app_user_id: str, wallet_id: str | None, product: str,
                  sub: dict[str, Any], *, now: datetime, since: datetime, request_at: datetime,
                  notes: list[str]) -> list[Rebuilt]:
    transaction = sub.get("store_transaction_id")
    if not transaction:
        notes.append(f"{app_user_id}: subscription {product} has no store_transaction_id; not matched")
        return []
    transaction = str(transaction)
    ent = _entitlement_of(conn, project_id, transaction, wallet_id, product)
    original = ent["external_subscription_id"] if ent is not None else transaction
    purchased, expires = iso(sub.get("purchase_date")), iso(sub.get("expires_date"))
    refunded_at = iso(sub.get("refunded_at"))
    trial = str(sub.get("period_type") or "").lower() == "trial"
    paid = payment(conn, project_id=project_id, provider=PROVIDER, external_id=transaction)
    common = {"product_id": product, "transaction_id": transaction, "original_transaction_id": original,
              "environment": "SANDBOX" if sub.get("is_sandbox") else "PRODUCTION",
              "store": str(sub.get("store") or "").upper() or None}
    if paid is None and refunded_at is None and purchased is not None and (ent is None or not trial):
        if purchased < since:
            notes.append(f"{app_user_id}: transaction {transaction} ({product}) was bought before the look-back "
                         "window and never credited; not granted by the job")
        else:
            raw_price = sub.get("price")
            price: dict[str, Any] = raw_price if isinstance(raw_price, dict) else {}
            kind = "INITIAL_PURCHASE" if ent is None else "RENEWAL"
            return [_event(app_user_id, kind, transaction, purchased,
                           f"{product} transaction {transaction} of {app_user_id}: "
                           f"{'trial started' if trial else 'paid'}, its webhook never applied",
                           purchased_at_ms=ms(purchased), expiration_at_ms=ms(expires),
                           period_type=str(sub.get("period_type") or "normal").upper(),
                           price=price.get("amount"), currency=price.get("currency"), **common)]
    if ent is None or ent["status"] == "ended":
        return []
    state_at = ent["state_at"]
    billing = iso(sub.get("billing_issues_detected_at"))
    unsubscribed = iso(sub.get("unsubscribe_detected_at"))
    grace = iso(sub.get("grace_period_expires_date"))
    if refunded_at is not None:
        if paid is not None and paid["status"] != "refunded" and paid["credits_minor"] > 0:
            return [_event(app_user_id, "CANCELLATION", f"{transaction}:refund", refunded_at,
                           f"{product} transaction {transaction} of {app_user_id} was refunded",
                           cancel_reason="CUSTOMER_SUPPORT", **common)]
        return []
    if expires is not None and expires <= now and (grace is None or grace <= now):
        if expires >= state_at:
            return [_event(app_user_id, "EXPIRATION", f"{original}:{ms(expires)}", expires,
                           f"{product} subscription {original} of {app_user_id} expired",
                           expiration_at_ms=ms(expires), **common)]
        return []
    if billing is not None and ent["status"] not in ("past_due", "expired") and billing >= state_at:
        return [_event(app_user_id, "BILLING_ISSUE", f"{original}:{ms(billing)}", billing,
                       f"{product} subscription {original} of {app_user_id} has a billing issue", **common)]
    if billing is None and unsubscribed is not None and ent["status"] != "cancelled" and unsubscribed >= state_at:
        return [_event(app_user_id, "CANCELLATION", f"{original}:{ms(unsubscribed)}", unsubscribed,
                       f"{product} subscription {original} of {app_user_id} will not renew",
                       cancel_reason="UNSUBSCRIBE", **common)]
    if billing is None and unsubscribed is None and ent["status"] == "cancelled" and request_at >= state_at:
        return [_event(app_user_id, "UNCANCELLATION", f"{original}:{ms(request_at)}", request_at,
                       f"{product} subscription {original} of {app_user_id} renews again", **common)]
    return []


def _one_time(conn: Connection, project_id: str, app_user_id: str, product: str, item: dict[str, Any], *,
              since: datetime, notes: list[str]) -> list[Rebuilt]:
    transaction = item.get("store_transaction_id")
    if not transaction:
        notes.append(f"{app_user_id}: purchase {item.get('id')} ({product}) has no store_transaction_id; not "
                     "matched")
        return []
    transaction = str(transaction)
    purchased = iso(item.get("purchase_date"))
    if purchased is None or payment(conn, project_id=project_id, provider=PROVIDER, external_id=transaction):
        return []
    if purchased < since:
        notes.append(f"{app_user_id}: purchase {transaction} ({product}) is older than the look-back window; "
                     "not granted by the job")
        return []
    return [_event(app_user_id, "NON_RENEWING_PURCHASE", transaction, purchased,
                   f"{product} purchase {transaction} of {app_user_id}: paid, its webhook never applied",
                   product_id=product, transaction_id=transaction, original_transaction_id=transaction,
                   purchased_at_ms=ms(purchased),
                   environment="SANDBOX" if item.get("is_sandbox") else "PRODUCTION",
                   store=str(item.get("store") or "").upper() or None)]
