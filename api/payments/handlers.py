"""Provider events → effects (api/payments/effects.py). ``parse`` turns a VERIFIED raw body into the event's
identity; ``handle`` applies it. Only the fields named here are read; unknown event types are stored as
``ignored``. JSON numbers with a fraction are parsed as Decimal (RevenueCat prices), never float.

How a webhook finds its wallet and offer (first match wins):
- Stripe: the checkout session Meterline created (``checkout_sessions``); else the metadata Meterline puts on
  sessions and subscriptions (``meterline_wallet_id``, ``meterline_offer``); else ``client_reference_id`` as a
  wallet id or subject and ``metadata.plan`` / ``metadata.pack`` as an offer slug; for a one-off payment with
  no offer named, the ONE live pack of exactly that price and currency. Invoices and subscription events find
  the entitlement by subscription id. A subscription invoice's payment is recorded with the payment intent (or
  charge) that paid it — from the invoice's ``payments`` when the event carries them, else from the
  ``invoice_payment.paid`` event — because that is what ``charge.refunded`` / ``charge.dispute.*`` name (since
  API version 2025-03-31.basil neither the invoice nor the charge points at the other).
- RevenueCat: ``app_user_id`` as a wallet id or subject; ``product_id`` → the offer's ``revenuecat_product_id``;
  subscriptions by ``original_transaction_id``, payments by ``transaction_id``.
- Lemon Squeezy: ``meta.custom_data`` (``meterline_wallet_id``, ``wallet_id``, ``subject``, ``customer_id``,
  ``user_id``) and ``meterline_offer``; else the variant id → the offer's ``lemonsqueezy_variant_id``;
  subscriptions by id, invoices by ``subscription_id``, orders by id."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from sqlalchemy import text

from api.payments.effects import (
    Ctx,
    Unmatched,
    find_entitlement,
    grant_payment,
    grant_period,
    link_payment_ref,
    offer_by_id,
    payment_recorded,
    record_unpaid,
    require_entitlement,
    resolve_wallet,
    reverse_payment,
    upsert_entitlement,
)
from api.payments.offers import Offer, get_offer, offer_for_product, pack_by_price
from api.payments.registry import dispatch, on
from api.payments.signatures import WebhookMalformed
from api.validation import InputRefused, check_json_body

#: Real provider events are about a dozen levels deep; deeper is refused (400) before any handler walks it.
WEBHOOK_JSON_DEPTH_MAX = 64


@dataclass(frozen=True, slots=True)
class Parsed:
    event_id: str
    event_type: str
    at: datetime
    payload: dict[str, Any]


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body, parse_float=Decimal)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting overflows json's parser
        raise WebhookMalformed("the webhook body is not JSON (or is nested too deep)") from exc
    if not isinstance(value, dict):
        raise WebhookMalformed("the webhook body is not a JSON object")
    try:  # provider payloads are a handful of levels deep; anything deeper is not a real event
        check_json_body(body, value, depth_max=WEBHOOK_JSON_DEPTH_MAX)
    except InputRefused as exc:
        raise WebhookMalformed(f"the webhook body is refused: {exc}") from None
    return value


def _ts(seconds: Any) -> datetime | None:
    return datetime.fromtimestamp(int(seconds), UTC) if seconds is not None else None


def _ms(millis: Any) -> datetime | None:
    return datetime.fromtimestamp(int(millis) / 1000, UTC) if millis is not None else None


def _iso(value: Any) -> datetime | None:
    if not value:
        return None
    moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _offer_slug(ctx: Ctx, slug: Any, kind: str | None = None) -> Offer | None:
    if not slug:
        return None
    return get_offer(ctx.conn, project_id=ctx.project_id, slug=str(slug), kind=kind)


def _require_kind(offer: Offer | None, kind: str, what: str) -> Offer:
    if offer is None:
        raise Unmatched(f"no {kind} in this project matches {what}")
    if offer.kind != kind:
        raise Unmatched(f"{what} maps to {offer.kind} {offer.slug!r}, not a {kind}")
    return offer


# =============================================================================================== Stripe

STRIPE_STATUS = {"trialing": "trialing", "active": "active", "past_due": "past_due", "unpaid": "past_due",
                 "incomplete": "past_due", "paused": "paused", "canceled": "ended", "incomplete_expired": "ended"}


def parse_stripe(body: bytes) -> Parsed:
    event = _json(body)
    try:
        return Parsed(str(event["id"]), str(event["type"]), _ts(event["created"]) or datetime.now(UTC), event)
    except (KeyError, TypeError, ValueError) as exc:
        raise WebhookMalformed("a Stripe event needs id, type and created") from exc


def handle_stripe(ctx: Ctx, event: dict[str, Any]) -> None:
    dispatch("stripe", ctx, event)


@on("stripe", "checkout.session.completed", "checkout.session.async_payment_succeeded",
    credits="pack (mode payment, paid): `top_up` of the pack's credits, once per session",
    entitlement="plan (mode subscription): created `active` for the session's wallet")
def _stripe_checkout(ctx: Ctx, event: dict[str, Any]) -> None:
    _stripe_session(ctx, event["data"]["object"])


@on("stripe", "invoice.paid", "invoice.payment_succeeded",
    credits="amount > 0: `subscription_grant` of the plan's credits for the period, once per invoice; $0: none "
            "(recorded, nothing to claw back)",
    entitlement="period (lines' `period`) and plan (line price) move forward")
def _stripe_invoice_event(ctx: Ctx, event: dict[str, Any]) -> None:
    _stripe_invoice(ctx, event["data"]["object"])


@on("stripe", "invoice_payment.paid", credits="none (links the payment intent to the invoice's payment; wakes "
    "refunds waiting for it)", entitlement="none")
def _stripe_invoice_payment_event(ctx: Ctx, event: dict[str, Any]) -> None:
    _stripe_invoice_payment(ctx, event["data"]["object"])


@on("stripe", "customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted",
    "customer.subscription.paused", "customer.subscription.resumed",
    credits="none", entitlement="status from the subscription (`canceled` → `ended`, `cancel_at_period_end` → "
    "`cancelled`), period, plan")
def _stripe_subscription_event(ctx: Ctx, event: dict[str, Any]) -> None:
    _stripe_subscription(ctx, event["data"]["object"])


@on("stripe", "charge.refunded",
    credits="claw back `ceil(credits × refunded / paid)` (cumulative per charge; the payment's own bucket first)",
    entitlement="full refund: `ended`")
def _stripe_refund(ctx: Ctx, event: dict[str, Any]) -> None:
    obj = event["data"]["object"]
    reverse_payment(ctx, refs=[obj.get("payment_intent"), obj.get("id")], refunded_minor=int(obj["amount_refunded"]))


@on("stripe", "charge.dispute.created", "charge.dispute.updated", "charge.dispute.closed",
    credits="open or lost: claw back the disputed share; won (`closed`, status won): posted back",
    entitlement="open or lost: `ended` (a won dispute does not reopen it)")
def _stripe_dispute(ctx: Ctx, event: dict[str, Any]) -> None:
    obj = event["data"]["object"]
    won = ctx.event_type == "charge.dispute.closed" and obj.get("status") == "won"
    reverse_payment(ctx, refs=[obj.get("payment_intent"), obj.get("charge")],
                    disputed_minor=0 if won else int(obj["amount"]), monotonic=not won)


def _stripe_metadata_project(ctx: Ctx, metadata: dict[str, Any]) -> None:
    owner = metadata.get("meterline_project_id")
    if owner and owner != ctx.project_id:
        raise Unmatched(f"the object belongs to project {owner}, not this one")


def _stripe_session(ctx: Ctx, session: dict[str, Any]) -> None:
    metadata = session.get("metadata") or {}
    _stripe_metadata_project(ctx, metadata)
    stored = ctx.conn.execute(text("""
        UPDATE checkout_sessions SET completed_at = coalesce(completed_at, now())
        WHERE id = :id AND project_id = :p RETURNING wallet_id, offer_id"""),
                              {"id": session["id"], "p": ctx.project_id}).first()
    mode = session.get("mode")
    if stored is not None:
        offer: Offer | None = offer_by_id(ctx, stored.offer_id)
        wallet_id = stored.wallet_id
    else:
        offer = (_offer_slug(ctx, metadata.get("meterline_offer")) or _offer_slug(ctx, metadata.get("plan"), "plan")
                 or _offer_slug(ctx, metadata.get("pack"), "pack"))
        if offer is None and mode == "payment" and session.get("amount_total") is not None:
            offer = pack_by_price(ctx.conn, project_id=ctx.project_id, price_minor=int(session["amount_total"]),
                                  currency=str(session.get("currency") or ""))
        wallet_id = None
    if mode == "payment":
        offer = _require_kind(offer, "pack", f"checkout session {session['id']}")
        if session.get("payment_status") not in ("paid", "no_payment_required"):
            ctx.ignore("payment not settled yet; credits follow checkout.session.async_payment_succeeded")
            return
        wallet_id = wallet_id or resolve_wallet(ctx, metadata.get("meterline_wallet_id")
                                                or session.get("client_reference_id"))
        grant_payment(ctx, external_id=session["id"], payment_ref=session.get("payment_intent"), wallet_id=wallet_id,
                      offer=offer, amount_minor=int(session.get("amount_total") or 0),
                      currency=str(session.get("currency") or offer.currency))
    elif mode == "subscription":
        offer = _require_kind(offer, "plan", f"checkout session {session['id']}")
        if not session.get("subscription"):
            raise Unmatched("a subscription checkout without a subscription id")
        wallet_id = wallet_id or resolve_wallet(ctx, metadata.get("meterline_wallet_id")
                                                or session.get("client_reference_id"))
        upsert_entitlement(ctx, external_subscription_id=str(session["subscription"]), status="active",
                           wallet_id=wallet_id, offer=offer, customer_id=session.get("customer"))
    else:
        ctx.ignore(f"checkout mode {mode} has no effect")


def _stripe_line_prices(invoice: dict[str, Any]) -> tuple[list[str], datetime | None, datetime | None]:
    prices: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    for line in ((invoice.get("lines") or {}).get("data") or []):
        price = ((line.get("pricing") or {}).get("price_details") or {}).get("price") or \
            (line.get("price") or {}).get("id")
        if price:
            prices.append(str(price))
        period = line.get("period") or {}
        if period.get("start") is not None:
            starts.append(int(period["start"]))
        if period.get("end") is not None:
            ends.append(int(period["end"]))
    return prices, _ts(min(starts)) if starts else None, _ts(max(ends)) if ends else None


def _plan_for_prices(ctx: Ctx, prices: list[str]) -> Offer | None:
    for price in prices:
        offer = offer_for_product(ctx.conn, project_id=ctx.project_id, provider="stripe", product_id=price)
        if offer is not None and offer.kind == "plan":
            return offer
    return None


def _id(value: Any) -> str | None:
    """An object reference as Stripe sends it: an id, or the expanded object."""
    if isinstance(value, dict):
        value = value.get("id")
    return str(value) if value else None


def _stripe_payment_ref(payment: dict[str, Any]) -> str | None:
    """What refunds and disputes of an InvoicePayment's money name: its payment intent, else its charge."""
    return _id(payment.get("payment_intent")) or _id(payment.get("charge"))


def _stripe_invoice_payment_refs(invoice: dict[str, Any]) -> tuple[str, ...]:
    """Every payment intent (or charge) that paid the invoice: the paid entries of ``invoice.payments`` (the
    default one first) when the event includes them; else the pre-basil ``payment_intent`` / ``charge`` fields.
    An invoice may be paid by several payments: each one's refunds must find the invoice's payment."""
    entries = [p for p in ((invoice.get("payments") or {}).get("data") or [])
               if isinstance(p, dict) and p.get("status", "paid") == "paid"]
    refs = [_stripe_payment_ref(entry.get("payment") or {})
            for entry in sorted(entries, key=lambda p: not p.get("is_default"))]
    refs.append(_id(invoice.get("payment_intent")) or _id(invoice.get("charge")))
    return tuple(dict.fromkeys(r for r in refs if r))


def _stripe_invoice_payment(ctx: Ctx, invoice_payment: dict[str, Any]) -> None:
    """``invoice_payment.paid``: which payment intent paid which invoice — recorded on the invoice's payment so a
    later (or earlier, deferred) ``charge.refunded`` / ``charge.dispute.*`` finds the period it paid for."""
    if invoice_payment.get("status") not in (None, "paid"):
        ctx.ignore(f"invoice payment status {invoice_payment.get('status')}: nothing paid")
        return
    invoice = _id(invoice_payment.get("invoice"))
    ref = _stripe_payment_ref(invoice_payment.get("payment") or {})
    if not invoice or not ref:
        ctx.ignore("an invoice payment without invoice or payment intent has no effect")
        return
    link_payment_ref(ctx, external_id=invoice, payment_ref=ref)


def _stripe_invoice(ctx: Ctx, invoice: dict[str, Any]) -> None:
    parent = invoice.get("parent") or {}
    subscription = (parent.get("subscription_details") or {}).get("subscription") or invoice.get("subscription")
    if not subscription:
        ctx.ignore("an invoice outside a subscription has no effect")
        return
    if invoice.get("status") != "paid":
        ctx.ignore(f"invoice status {invoice.get('status')}: nothing paid")
        return
    ent = require_entitlement(ctx, str(subscription))
    prices, period_start, period_end = _stripe_line_prices(invoice)
    plan = _plan_for_prices(ctx, prices)
    ent = upsert_entitlement(ctx, external_subscription_id=str(subscription), status=None, offer=plan,
                             period_start=period_start, period_end=period_end)
    amount = int(invoice.get("amount_paid") or 0)
    refs = _stripe_invoice_payment_refs(invoice)
    if amount <= 0:
        # recorded (no credits), so its invoice_payment.paid and any refund naming it resolve at once
        ctx.notes.append("a $0 invoice (trial) grants no credits")
        record_unpaid(ctx, external_id=str(invoice["id"]), wallet_id=ent.wallet_id, offer=plan or
                      offer_by_id(ctx, ent.offer_id), currency=str(invoice.get("currency") or "usd"),
                      entitlement_id=ent.id, payment_refs=refs)
        return
    grant_period(ctx, ent, external_id=str(invoice["id"]), amount_minor=amount,
                 currency=str(invoice.get("currency") or ""), period_start=period_start, period_end=period_end,
                 offer=plan, payment_ref=refs[0] if refs else None)
    if refs and payment_recorded(ctx, str(invoice["id"])):
        for ref in refs[1:]:  # the invoice's other payments (a multi-payment invoice)
            link_payment_ref(ctx, external_id=str(invoice["id"]), payment_ref=ref)


def _stripe_subscription(ctx: Ctx, sub: dict[str, Any]) -> None:
    metadata = sub.get("metadata") or {}
    _stripe_metadata_project(ctx, metadata)
    items = (sub.get("items") or {}).get("data") or []
    starts = [int(i["current_period_start"]) for i in items if i.get("current_period_start") is not None]
    ends = [int(i["current_period_end"]) for i in items if i.get("current_period_end") is not None]
    plan = _plan_for_prices(ctx, [str((i.get("price") or {}).get("id")) for i in items if i.get("price")])
    status = STRIPE_STATUS.get(str(sub.get("status")), "active")
    if status == "active" and sub.get("cancel_at_period_end"):
        status = "cancelled"
    wallet_id = None
    if metadata.get("meterline_wallet_id"):
        wallet_id = resolve_wallet(ctx, metadata["meterline_wallet_id"])
        plan = plan or _offer_slug(ctx, metadata.get("meterline_offer"), "plan")
    upsert_entitlement(ctx, external_subscription_id=str(sub["id"]), status=status, wallet_id=wallet_id, offer=plan,
                       will_renew=status in ("active", "trialing", "past_due") and not sub.get("cancel_at_period_end"),
                       period_start=_ts(min(starts)) if starts else None, period_end=_ts(max(ends)) if ends else None,
                       customer_id=sub.get("customer"), ended_at=_ts(sub.get("ended_at")))


# =========================================================================================== RevenueCat


def parse_revenuecat(body: bytes) -> Parsed:
    payload = _json(body)
    event = payload.get("event")
    if not isinstance(event, dict) or not event.get("id") or not event.get("type"):
        raise WebhookMalformed("a RevenueCat webhook needs event.id and event.type")
    at = _ms(event.get("event_timestamp_ms")) or datetime.now(UTC)
    return Parsed(str(event["id"]), str(event["type"]), at, event)


def _rc_amount_minor(event: dict[str, Any]) -> int:
    price = event.get("price")
    if price is None:
        return 0
    return int((abs(Decimal(str(price))) * 100).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def _rc_offer(ctx: Ctx, product_id: Any) -> Offer | None:
    if not product_id:
        return None
    return offer_for_product(ctx.conn, project_id=ctx.project_id, provider="revenuecat", product_id=str(product_id))


def handle_revenuecat(ctx: Ctx, event: dict[str, Any]) -> None:
    dispatch("revenuecat", ctx, event)


def _rc_ids(event: dict[str, Any]) -> tuple[str, str]:
    """(subscription = original transaction, this transaction)"""
    return (str(event.get("original_transaction_id") or event.get("transaction_id") or ""),
            str(event.get("transaction_id") or ""))


@on("revenuecat", "INITIAL_PURCHASE", "RENEWAL",
    credits="outside a trial: `subscription_grant` of the plan's credits for the period, once per transaction",
    entitlement="`active` (trial: `trialing`), period to `expiration_at_ms`")
def _rc_purchase(ctx: Ctx, event: dict[str, Any]) -> None:
    subscription, transaction = _rc_ids(event)
    offer = _require_kind(_rc_offer(ctx, event.get("product_id")), "plan", f"product {event.get('product_id')}")
    trial = event.get("period_type") == "TRIAL"
    found = find_entitlement(ctx, subscription)
    existing_wallet = found.wallet_id if found else None
    wallet_id = existing_wallet or resolve_wallet(ctx, event.get("app_user_id"))
    ent = upsert_entitlement(ctx, external_subscription_id=subscription, status="trialing" if trial else "active",
                             wallet_id=wallet_id, offer=offer, will_renew=True,
                             period_start=_ms(event.get("purchased_at_ms")),
                             period_end=_ms(event.get("expiration_at_ms")))
    if trial:
        ctx.notes.append("a trial period grants no credits")
        return
    grant_period(ctx, ent, external_id=transaction, amount_minor=_rc_amount_minor(event),
                 currency=str(event.get("currency") or "usd"), period_start=_ms(event.get("purchased_at_ms")),
                 period_end=_ms(event.get("expiration_at_ms")), offer=offer)


@on("revenuecat", "NON_RENEWING_PURCHASE", credits="`top_up` of the pack's credits, once per transaction",
    entitlement="none")
def _rc_pack(ctx: Ctx, event: dict[str, Any]) -> None:
    _, transaction = _rc_ids(event)
    offer = _require_kind(_rc_offer(ctx, event.get("product_id")), "pack", f"product {event.get('product_id')}")
    grant_payment(ctx, external_id=transaction, wallet_id=resolve_wallet(ctx, event.get("app_user_id")),
                  offer=offer, amount_minor=_rc_amount_minor(event), currency=str(event.get("currency") or "usd"))


@on("revenuecat", "CANCELLATION",
    credits="`cancel_reason` CUSTOMER_SUPPORT (a refund): claw back all of the transaction's credits; else none",
    entitlement="refund: `ended`; else `cancelled` (paid until the period's end)")
def _rc_cancellation(ctx: Ctx, event: dict[str, Any]) -> None:
    subscription, transaction = _rc_ids(event)
    if event.get("cancel_reason") == "CUSTOMER_SUPPORT":
        # RevenueCat's refund: the whole transaction's credits come back, and access ends now
        _rc_refund(ctx, event, transaction, subscription, refunded=True)
        return
    require_entitlement(ctx, subscription)
    upsert_entitlement(ctx, external_subscription_id=subscription, status="cancelled", will_renew=False)


@on("revenuecat", "REFUND_REVERSED", credits="the clawed back credits posted back (debt first)",
    entitlement="none (an ended entitlement stays ended)")
def _rc_refund_reversed(ctx: Ctx, event: dict[str, Any]) -> None:
    subscription, transaction = _rc_ids(event)
    _rc_refund(ctx, event, transaction, subscription, refunded=False)


@on("revenuecat", "UNCANCELLATION", credits="none", entitlement="`active`, renews")
def _rc_uncancellation(ctx: Ctx, event: dict[str, Any]) -> None:
    subscription, _ = _rc_ids(event)
    require_entitlement(ctx, subscription)
    upsert_entitlement(ctx, external_subscription_id=subscription, status="active", will_renew=True)


@on("revenuecat", "BILLING_ISSUE", credits="none", entitlement="`past_due`")
def _rc_billing_issue(ctx: Ctx, event: dict[str, Any]) -> None:
    subscription, _ = _rc_ids(event)
    require_entitlement(ctx, subscription)
    upsert_entitlement(ctx, external_subscription_id=subscription, status="past_due")


@on("revenuecat", "EXPIRATION", credits="none", entitlement="`ended` at `expiration_at_ms`")
def _rc_expiration(ctx: Ctx, event: dict[str, Any]) -> None:
    subscription, _ = _rc_ids(event)
    require_entitlement(ctx, subscription)
    upsert_entitlement(ctx, external_subscription_id=subscription, status="ended", will_renew=False,
                       ended_at=_ms(event.get("expiration_at_ms")) or ctx.at)
# PRODUCT_CHANGE is not registered (ignored): it takes effect with the next RENEWAL, which names the new product


def _rc_refund(ctx: Ctx, event: dict[str, Any], transaction: str, subscription: str, *, refunded: bool) -> None:
    payment = ctx.conn.execute(text("""
        SELECT amount_minor, entitlement_id FROM payments
        WHERE project_id = :p AND provider = 'revenuecat' AND external_id = :x"""),
                               {"p": ctx.project_id, "x": transaction}).first()
    full = int(payment.amount_minor) if payment is not None else 0
    # a full refund: reverse_payment claws the credits back and ends the entitlement (as for every provider)
    reverse_payment(ctx, refs=[transaction], refunded_minor=max(full, 1) if refunded else 0, monotonic=False)


# ======================================================================================== Lemon Squeezy

LS_STATUS = {"on_trial": "trialing", "active": "active", "past_due": "past_due", "unpaid": "past_due",
             "paused": "paused", "cancelled": "cancelled", "expired": "ended"}
LS_CUSTOMER_KEYS = ("meterline_wallet_id", "wallet_id", "subject", "customer_id", "user_id")


def parse_lemonsqueezy(body: bytes) -> Parsed:
    payload = _json(body)
    meta = payload.get("meta") or {}
    data = payload.get("data") or {}
    if not meta.get("event_name") or not data.get("type") or data.get("id") is None:
        raise WebhookMalformed("a Lemon Squeezy webhook needs meta.event_name and data.type/id")
    attributes = data.get("attributes") or {}
    # Lemon Squeezy sends no event id: the event is identified by what happened to which object, when. An event
    # the receipts reconciliation rebuilt from the API carries its own id (``reconcile:…``), so it never takes
    # the id of the real delivery, which may still arrive and must then be applied (as a no-op or not)
    rebuilt = meta.get("meterline_reconcile_id")
    event_id = str(rebuilt) if isinstance(rebuilt, str) and rebuilt.startswith("reconcile:") else \
        f"{meta['event_name']}:{data['type']}:{data['id']}:{attributes.get('updated_at') or ''}"
    at = _iso(attributes.get("updated_at")) or _iso(attributes.get("created_at")) or datetime.now(UTC)
    return Parsed(event_id, str(meta["event_name"]), at, payload)


def _ls_customer(payload: dict[str, Any]) -> Any:
    custom = (payload.get("meta") or {}).get("custom_data") or {}
    for key in LS_CUSTOMER_KEYS:
        if custom.get(key) not in (None, ""):
            return custom[key]
    return None


def _ls_offer(ctx: Ctx, payload: dict[str, Any], variant_id: Any) -> Offer | None:
    custom = (payload.get("meta") or {}).get("custom_data") or {}
    return _offer_slug(ctx, custom.get("meterline_offer")) or (
        offer_for_product(ctx.conn, project_id=ctx.project_id, provider="lemonsqueezy", product_id=str(variant_id))
        if variant_id is not None else None)


def handle_lemonsqueezy(ctx: Ctx, payload: dict[str, Any]) -> None:
    dispatch("lemonsqueezy", ctx, payload)


@on("lemonsqueezy", "order_created",
    credits="a pack's paid order: `top_up` of the pack's credits, once per order (a plan's order: none — its "
            "invoice pays)", entitlement="none")
def _ls_order(ctx: Ctx, payload: dict[str, Any]) -> None:
    data = payload["data"]
    attrs = data.get("attributes") or {}
    if attrs.get("status") != "paid":
        ctx.ignore(f"order status {attrs.get('status')}: nothing paid")
        return
    variant = (attrs.get("first_order_item") or {}).get("variant_id")
    offer = _ls_offer(ctx, payload, variant)
    if offer is not None and offer.kind == "plan":
        ctx.ignore("a subscription's order: credits follow subscription_payment_success")
        return
    offer = _require_kind(offer, "pack", f"variant {variant}")
    grant_payment(ctx, external_id=f"order:{data['id']}", wallet_id=resolve_wallet(ctx, _ls_customer(payload)),
                  offer=offer, amount_minor=int(attrs.get("total") or 0),
                  currency=str(attrs.get("currency") or offer.currency))


@on("lemonsqueezy", "order_refunded", credits="claw back `ceil(credits × refunded_amount / total)`",
    entitlement="none (an order pays a pack)")
def _ls_order_refunded(ctx: Ctx, payload: dict[str, Any]) -> None:
    data = payload["data"]
    attrs = data.get("attributes") or {}
    reverse_payment(ctx, refs=[f"order:{data['id']}"], refunded_minor=int(attrs.get("refunded_amount") or 0))


@on("lemonsqueezy", "subscription_created", "subscription_updated", "subscription_cancelled",
    "subscription_resumed", "subscription_expired", "subscription_paused", "subscription_unpaused",
    credits="none", entitlement="status from the subscription (`expired` → `ended`), plan from the variant, "
    "period end from `ends_at` / `renews_at`")
def _ls_subscription(ctx: Ctx, payload: dict[str, Any]) -> None:
    data = payload["data"]
    attrs = data.get("attributes") or {}
    subscription = str(data["id"])
    offer = _ls_offer(ctx, payload, attrs.get("variant_id"))
    plan = offer if offer is not None and offer.kind == "plan" else None
    status = LS_STATUS.get(str(attrs.get("status")), "active")
    wallet_id = None
    if find_entitlement(ctx, subscription) is None:
        if plan is None:
            raise Unmatched(f"no plan in this project matches variant {attrs.get('variant_id')}")
        wallet_id = resolve_wallet(ctx, _ls_customer(payload))
    upsert_entitlement(ctx, external_subscription_id=subscription, status=status, wallet_id=wallet_id, offer=plan,
                       will_renew=status in ("active", "trialing", "past_due"),
                       period_end=_iso(attrs.get("ends_at")) or _iso(attrs.get("renews_at")),
                       customer_id=str(attrs["customer_id"]) if attrs.get("customer_id") is not None else None,
                       ended_at=_iso(attrs.get("ends_at")))


@on("lemonsqueezy", "subscription_payment_success",
    credits="`subscription_grant` of the plan's credits for one plan interval from the invoice's `created_at`, "
            "once per invoice", entitlement="none (subscription events move it)")
def _ls_invoice_paid(ctx: Ctx, payload: dict[str, Any]) -> None:
    data = payload["data"]
    attrs = data.get("attributes") or {}
    if attrs.get("status") != "paid":
        ctx.ignore(f"invoice status {attrs.get('status')}: nothing paid")
        return
    ent = require_entitlement(ctx, str(attrs.get("subscription_id")))
    # a subscription invoice states no period: it pays one interval of the plan from its creation
    grant_period(ctx, ent, external_id=f"invoice:{data['id']}", amount_minor=int(attrs.get("total") or 0),
                 currency=str(attrs.get("currency") or "usd"), period_start=_iso(attrs.get("created_at")),
                 period_end=None)


@on("lemonsqueezy", "subscription_payment_refunded",
    credits="claw back `ceil(credits × refunded_amount / total)` of that invoice's grant",
    entitlement="full refund: `ended`")
def _ls_invoice_refunded(ctx: Ctx, payload: dict[str, Any]) -> None:
    data = payload["data"]
    attrs = data.get("attributes") or {}
    reverse_payment(ctx, refs=[f"invoice:{data['id']}"], refunded_minor=int(attrs.get("refunded_amount") or 0))


# ============================================================================================== sandbox


def sandbox_revenuecat(event: dict[str, Any]) -> str | None:
    return "a RevenueCat SANDBOX event" if str(event.get("environment") or "").upper() == "SANDBOX" else None


def sandbox_lemonsqueezy(payload: dict[str, Any]) -> str | None:
    attrs = (payload.get("data") or {}).get("attributes") or {}
    test = (payload.get("meta") or {}).get("test_mode") is True or attrs.get("test_mode") is True
    return "a Lemon Squeezy test-mode event" if test else None


def sandbox_stripe(event: dict[str, Any]) -> None:
    """Stripe's test mode has its own keys and endpoint secret: a test event only verifies with the test secret."""
    return None


PARSERS = {"stripe": parse_stripe, "revenuecat": parse_revenuecat, "lemonsqueezy": parse_lemonsqueezy}
HANDLERS = {"stripe": handle_stripe, "revenuecat": handle_revenuecat, "lemonsqueezy": handle_lemonsqueezy}
SANDBOX = {"stripe": sandbox_stripe, "revenuecat": sandbox_revenuecat, "lemonsqueezy": sandbox_lemonsqueezy}
