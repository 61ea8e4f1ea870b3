"""Lemon Squeezy side of the receipts reconciliation: the store's lists (JSON:API, ``filter[store_id]``, 100 a
page, paged by ``meta.page``) and what they show that Meterline has not applied.

- ``GET /v1/subscriptions``: a subscription without an entitlement (created within the window) →
  ``subscription_created``; one whose status or period moved past the entitlement's (by ``updated_at``, the
  time a webhook carries) → ``subscription_updated``. The object is the webhook's ``data`` as it is.
- ``GET /v1/subscription-invoices`` (newest first, until older than the window): a paid invoice without a payment
  → ``subscription_payment_success`` (ledger key ``pay:{project}:lemonsqueezy:invoice:{id}``, the webhook's);
  more refunded than recorded → ``subscription_payment_refunded``.
- ``GET /v1/orders`` (newest first, until older than the window): a paid order without a payment →
  ``order_created`` (``order:{id}``); more refunded than recorded → ``order_refunded``.
The API does not return a checkout's ``custom_data`` (webhooks carry it in ``meta``), so the customer is found by
the Lemon Squeezy ``customer_id``: an entitlement of that customer, else the ``custom_data`` of an earlier
webhook about that customer. Without either the rebuilt event is stored ``unmatched`` (the report says so) and
the real webhook, if it ever comes, still applies (it has another event id)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from api.payments.handlers import LS_STATUS, Parsed
from api.payments.provider_api import ProviderApi, ProviderApiError
from api.payments.reconcile_common import Rebuilt, dump, entitlement, iso, payment, settled

PROVIDER = "lemonsqueezy"
PAGE_SIZE = 100
LISTS = ("subscriptions", "subscription-invoices", "orders")


@dataclass
class StoreLists:
    """What the job read of the store; a list that failed stays empty (its error is in the report)."""

    items: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {name: [] for name in LISTS})


def pages(api: ProviderApi, path: str, *, store_id: str, stop_before: datetime | None, pages_max: int,
          notes: list[str]) -> Iterator[dict[str, Any]]:
    """Every resource of a list, page by page (``page[number]`` from ``meta.page``: currentPage < lastPage); a
    list sorted newest first stops at the first resource created before ``stop_before``."""
    number = 1
    while True:
        body = api.get(path, {"filter[store_id]": store_id, "page[number]": number, "page[size]": PAGE_SIZE})
        data = body.get("data")
        if not isinstance(data, list):
            raise ProviderApiError("bad_json", f"GET {path} page {number}: no data list")
        for resource in data:
            if not isinstance(resource, dict) or resource.get("id") is None:
                raise ProviderApiError("bad_json", f"GET {path} page {number}: a resource without id")
            created = iso((resource.get("attributes") or {}).get("created_at"))
            if stop_before is not None and created is not None and created < stop_before:
                return
            yield resource
        page = (body.get("meta") or {}).get("page") or {}
        try:
            current, last = int(page.get("currentPage", number)), int(page.get("lastPage", number))
        except (TypeError, ValueError):
            raise ProviderApiError("bad_json", f"GET {path} page {number}: meta.page is not numbers") from None
        if current >= last or not data:
            return
        if number >= pages_max:
            notes.append(f"{path}: stopped after {pages_max} pages (API_PAYMENTS_RECONCILE_PAGES_MAX); the rest "
                         "is read by a later run only if it is newer")
            return
        number = current + 1


def _customer_data(conn: Connection, project_id: str, customer_id: Any) -> dict[str, Any]:
    """The ``custom_data`` that names the Meterline customer of a Lemon Squeezy customer, as best known."""
    if customer_id is None:
        return {}
    wallet = conn.execute(text("""
        SELECT wallet_id FROM entitlements WHERE project_id = :p AND provider = 'lemonsqueezy'
          AND external_customer_id = :c ORDER BY created_at DESC LIMIT 1"""),
                          {"p": project_id, "c": str(customer_id)}).scalar()
    if wallet is not None:
        return {"meterline_wallet_id": wallet}
    body = conn.execute(text("""
        SELECT body FROM webhook_events WHERE project_id = :p AND provider = 'lemonsqueezy' AND origin = 'webhook'
          AND status NOT IN ('rejected', 'duplicate', 'failed')
          AND convert_from(body, 'UTF8')::jsonb #>> '{data,attributes,customer_id}' = :c
          AND convert_from(body, 'UTF8')::jsonb #> '{meta,custom_data}' IS NOT NULL
        ORDER BY id DESC LIMIT 1"""), {"p": project_id, "c": str(customer_id)}).scalar()
    if body is None:
        return {}
    custom = (json.loads(bytes(body)).get("meta") or {}).get("custom_data")
    return custom if isinstance(custom, dict) else {}


def _event(conn: Connection, project_id: str, event_name: str, key: str, resource: dict[str, Any],
           what: str) -> Rebuilt:
    attrs = resource.get("attributes") or {}
    event_id = f"reconcile:{event_name}:{key}"
    at = iso(attrs.get("updated_at")) or iso(attrs.get("created_at"))
    assert at is not None
    payload = {"meta": {"event_name": event_name, "meterline_reconcile_id": event_id,
                        "test_mode": bool(attrs.get("test_mode")),
                        "custom_data": _customer_data(conn, project_id, attrs.get("customer_id")) or None},
               "data": resource}
    return Rebuilt(Parsed(event_id, event_name, at, payload), dump(payload), what)


def plan(conn: Connection, *, project_id: str, lists: StoreLists, since: datetime) -> list[Rebuilt]:
    """The events missing for the store, subscriptions first (their invoices need the entitlement)."""
    out: list[Rebuilt] = []
    for sub in lists.items["subscriptions"]:
        out.extend(_subscription(conn, project_id, sub, since=since))
    for invoice in lists.items["subscription-invoices"]:
        out.extend(_paid(conn, project_id, invoice, key=f"invoice:{invoice['id']}", what="subscription invoice",
                         paid_event="subscription_payment_success", refund_event="subscription_payment_refunded"))
    for order in lists.items["orders"]:
        out.extend(_paid(conn, project_id, order, key=f"order:{order['id']}", what="order",
                         paid_event="order_created", refund_event="order_refunded"))
    done = settled(conn, project_id=project_id, provider=PROVIDER, event_ids=[r.parsed.event_id for r in out])
    return [r for r in out if r.parsed.event_id not in done]


def _subscription(conn: Connection, project_id: str, sub: dict[str, Any], *, since: datetime) -> list[Rebuilt]:
    attrs = sub.get("attributes") or {}
    sub_id, updated = str(sub["id"]), iso(attrs.get("updated_at"))
    if updated is None:
        return []
    ent = entitlement(conn, project_id=project_id, provider=PROVIDER, external_subscription_id=sub_id)
    status = LS_STATUS.get(str(attrs.get("status")), "active")
    if ent is None:
        created = iso(attrs.get("created_at")) or updated
        if created < since:
            return []
        return [_event(conn, project_id, "subscription_created", f"{sub_id}:{attrs.get('updated_at')}", sub,
                       f"subscription {sub_id} ({attrs.get('status')}): its webhooks never applied")]
    if ent["status"] == "ended" or updated < ent["state_at"]:
        return []
    period_end = iso(attrs.get("ends_at")) or iso(attrs.get("renews_at"))
    moved = status != ent["status"] and not (ent["status"] == "expired" and status == "past_due")
    longer = period_end is not None and (ent["current_period_end"] is None or period_end > ent["current_period_end"])
    if not moved and not longer:
        return []
    return [_event(conn, project_id, "subscription_updated", f"{sub_id}:{attrs.get('updated_at')}", sub,
                   f"subscription {sub_id}: {ent['status']} → {status}" if moved
                   else f"subscription {sub_id}: period to {period_end.isoformat() if period_end else None}")]


def _paid(conn: Connection, project_id: str, resource: dict[str, Any], *, key: str, what: str, paid_event: str,
          refund_event: str) -> list[Rebuilt]:
    attrs = resource.get("attributes") or {}
    status = str(attrs.get("status"))
    recorded = payment(conn, project_id=project_id, provider=PROVIDER, external_id=key)
    if recorded is None:
        if status != "paid":  # pending / failed / void: nothing paid; refunded before we saw it: nothing to give
            return []
        return [_event(conn, project_id, paid_event, key, resource,
                       f"{what} {resource['id']} ({attrs.get('total')} {attrs.get('currency')}): paid, its "
                       "webhook never applied")]
    refunded = int(attrs.get("refunded_amount") or 0)
    if refunded > int(recorded["refunded_minor"]):
        return [_event(conn, project_id, refund_event, f"{key}:{refunded}", resource,
                       f"{what} {resource['id']}: {refunded} refunded, {recorded['refunded_minor']} recorded")]
    return []


def read_store(api: ProviderApi, *, store_id: str, since: datetime, pages_max: int, notes: list[str],
               errors: list[dict[str, Any]]) -> StoreLists:
    lists = StoreLists()
    for name in LISTS:
        try:
            stop = None if name == "subscriptions" else since
            # appended as read: what came before a failing page is still reconciled
            for resource in pages(api, f"/v1/{name}", store_id=store_id, stop_before=stop, pages_max=pages_max,
                                  notes=notes):
                lists.items[name].append(resource)
        except ProviderApiError as exc:
            errors.append({"list": name, **exc.report()})
            if exc.kind == "rate_limited":
                break
    return lists
