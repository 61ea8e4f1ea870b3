"""Stripe Checkout Sessions for an offer and a wallet, through the real ``stripe`` library.

The session carries everything the webhook needs to credit the right wallet without trusting the browser:
``metadata`` (and the payment intent's / subscription's metadata) = ``meterline_project_id``,
``meterline_wallet_id``, ``meterline_offer``, ``meterline_offer_id``; ``client_reference_id`` = the wallet id.
The session is also stored (``checkout_sessions``), and the webhook prefers the stored row.

Idempotency: the client's ``Idempotency-Key`` becomes Stripe's ``Idempotency-Key``
(``meterline:{project}:{key}``), so a retried request gets the same session back from Stripe (Stripe refuses
the same key with different parameters → 409 here). No database transaction is held open while Stripe is
called. The API base is ``API_STRIPE_API_BASE`` (tests point it at a local fake of Stripe's HTTP API)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import stripe
from sqlalchemy import Connection, text

from api.errors import ApiError, Conflict
from api.payments.offers import Offer


class StripeNotConfigured(ApiError):
    status = 503
    code = "api.stripe_not_configured"


class StripeFailed(ApiError):
    status = 502
    code = "api.stripe_error"


class StripeIdempotencyConflict(Conflict):
    code = "api.idempotency_conflict"


@dataclass(frozen=True, slots=True)
class CreatedSession:
    id: str
    url: str | None
    mode: str
    stripe_idempotency_key: str


def session_params(*, project_id: str, wallet_id: str, offer: Offer, success_url: str, cancel_url: str,
                   customer_email: str | None) -> dict[str, Any]:
    metadata = {"meterline_project_id": project_id, "meterline_wallet_id": wallet_id,
                "meterline_offer": offer.slug, "meterline_offer_id": offer.id}
    if offer.stripe_price_id:
        line: dict[str, Any] = {"price": offer.stripe_price_id, "quantity": 1}
    else:
        price_data: dict[str, Any] = {"currency": offer.currency, "unit_amount": offer.price_minor,
                                      "product_data": {"name": offer.name}}
        if offer.kind == "plan":
            price_data["recurring"] = {"interval": offer.billing_interval, "interval_count": offer.interval_count}
        line = {"price_data": price_data, "quantity": 1}
    params: dict[str, Any] = {
        "mode": "subscription" if offer.kind == "plan" else "payment",
        "line_items": [line], "success_url": success_url, "cancel_url": cancel_url,
        "client_reference_id": wallet_id, "metadata": metadata,
    }
    if offer.kind == "plan":
        params["subscription_data"] = {"metadata": metadata}
    else:
        params["payment_intent_data"] = {"metadata": metadata}
    if customer_email:
        params["customer_email"] = customer_email
    return params


def create_session(*, api_key: str | None, api_base: str, project_id: str, client_key: str,
                   params: dict[str, Any]) -> CreatedSession:
    if not api_key:
        raise StripeNotConfigured("no Stripe secret key is configured (API_STRIPE_SECRET_KEY or the project's "
                                  "stripe provider settings)")
    client = stripe.StripeClient(api_key, base_addresses={"api": api_base.rstrip("/")}, max_network_retries=2)
    idempotency_key = f"meterline:{project_id}:{client_key}"
    try:
        session = client.v1.checkout.sessions.create(params=params,  # type: ignore[arg-type]
                                                     options={"idempotency_key": idempotency_key})
    except stripe.IdempotencyError as exc:
        raise StripeIdempotencyConflict("this Idempotency-Key was already used for a different checkout") from exc
    except stripe.StripeError as exc:
        raise StripeFailed(f"Stripe refused or failed the checkout: {exc.user_message or exc}",
                           extra={"stripe_status": exc.http_status}) from exc
    return CreatedSession(id=session.id, url=session.url, mode=session.mode, stripe_idempotency_key=idempotency_key)


def store_session(conn: Connection, *, project_id: str, wallet_id: str, offer: Offer, session: CreatedSession,
                  user_id: str | None) -> None:
    conn.execute(text("""
        INSERT INTO checkout_sessions (id, project_id, wallet_id, offer_id, mode, url, stripe_idempotency_key,
                                       created_by_user_id)
        VALUES (:id, :p, :w, :o, :m, :u, :k, :by) ON CONFLICT (id) DO NOTHING"""),
                 {"id": session.id, "p": project_id, "w": wallet_id, "o": offer.id, "m": session.mode,
                  "u": session.url, "k": session.stripe_idempotency_key, "by": user_id})
