"""Webhook authenticity, per provider. Each verifier gets the RAW request body (bytes, exactly as received) and
the headers, and raises ``WebhookRejected`` (400) when the delivery cannot be proven to come from the provider.

- Stripe: ``Stripe-Signature: t=...,v1=...`` checked by the real ``stripe`` library
  (``stripe.Webhook.construct_event``): HMAC-SHA256 of ``f"{t}.{body}"`` with the endpoint secret (``whsec_...``),
  any matching ``v1`` accepted, ``v0`` ignored, ``t`` older than the tolerance (300 s) refused (replays).
- Lemon Squeezy: ``X-Signature`` = hex HMAC-SHA256 of the raw body with the signing secret; no timestamp, so a
  replay is caught by the event's idempotency, not here.
- RevenueCat: no body signature; the ``Authorization`` header must equal the configured value exactly
  (e.g. ``Bearer rc_...``), compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

import stripe

from api.errors import ApiError

STRIPE_TOLERANCE_S = 300


class WebhookRejected(ApiError):
    status = 400
    code = "api.webhook_signature_invalid"


class WebhookMalformed(ApiError):
    status = 400
    code = "api.webhook_malformed"


def verify_stripe(body: bytes, headers: Mapping[str, str], secret: str | None,
                  tolerance_s: int = STRIPE_TOLERANCE_S) -> None:
    header = headers.get("stripe-signature")
    if not secret:
        raise WebhookRejected("no Stripe webhook secret is configured for this project")
    if not header:
        raise WebhookRejected("the Stripe-Signature header is missing")
    try:
        stripe.Webhook.construct_event(body, header, secret, tolerance=tolerance_s, api_key="sk_unused")
    except stripe.SignatureVerificationError as exc:
        raise WebhookRejected(f"Stripe signature verification failed: {exc.user_message or exc}") from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # stripe parses the JSON (deep → recursion)
        raise WebhookMalformed("the Stripe webhook body is not a JSON event") from exc


def verify_lemonsqueezy(body: bytes, headers: Mapping[str, str], secret: str | None) -> None:
    given = headers.get("x-signature")
    if not secret:
        raise WebhookRejected("no Lemon Squeezy signing secret is configured for this project")
    if not given:
        raise WebhookRejected("the X-Signature header is missing")
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), given.strip().lower().encode()):
        raise WebhookRejected("the X-Signature does not match the body")


def verify_revenuecat(body: bytes, headers: Mapping[str, str], secret: str | None) -> None:
    given = headers.get("authorization")
    if not secret:
        raise WebhookRejected("no RevenueCat authorization value is configured for this project")
    if not given:
        raise WebhookRejected("the Authorization header is missing")
    if not hmac.compare_digest(given.encode(), secret.encode()):
        raise WebhookRejected("the Authorization header does not match the configured value")


def verify(provider: str, body: bytes, headers: Mapping[str, str], secret: str | None) -> None:
    {"stripe": verify_stripe, "lemonsqueezy": verify_lemonsqueezy, "revenuecat": verify_revenuecat}[provider](
        body, headers, secret)


def signature_header(provider: str, headers: Mapping[str, str]) -> str | None:
    """What is stored with the event for audit: the signature, never RevenueCat's bearer secret."""
    if provider == "stripe":
        return headers.get("stripe-signature")
    if provider == "lemonsqueezy":
        return headers.get("x-signature")
    return None
