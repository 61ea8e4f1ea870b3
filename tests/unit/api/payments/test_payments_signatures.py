"""Webhook authenticity without a database: the fixtures' signature vectors verified by the real ``stripe``
library and the Lemon Squeezy / RevenueCat checks, and what each refuses; event identities parsed from the
fixtures (Lemon Squeezy has no event id; RevenueCat prices are Decimals, never floats)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from decimal import Decimal
from pathlib import Path

import pytest

from api.payments.handlers import _rc_amount_minor, parse_lemonsqueezy, parse_revenuecat, parse_stripe
from api.payments.signatures import (
    WebhookMalformed,
    WebhookRejected,
    verify_lemonsqueezy,
    verify_revenuecat,
    verify_stripe,
)

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "webhooks"
VECTORS = json.loads((FIXTURES / "signature-test-vectors.json").read_text())
STRIPE_SECRET = VECTORS["stripe"]["endpoint_secret"]
LS_SECRET = VECTORS["lemonsqueezy"]["signing_secret"]
FOREVER = 10**10


def _sign(body: bytes, secret: str, t: int) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


@pytest.mark.parametrize("name", sorted(VECTORS["stripe"]["vectors"]))
def test_stripe_vectors_verify_and_expire(name: str) -> None:
    body = (FIXTURES / name).read_bytes()
    vector = VECTORS["stripe"]["vectors"][name]
    assert hashlib.sha256(body).hexdigest() == vector["body_sha256"]
    header = {"stripe-signature": vector["Stripe-Signature"]}
    verify_stripe(body, header, STRIPE_SECRET, tolerance_s=FOREVER)
    with pytest.raises(WebhookRejected, match=r"(?i)timestamp"):
        verify_stripe(body, header, STRIPE_SECRET)  # the default 300 s tolerance
    with pytest.raises(WebhookRejected):
        verify_stripe(body, header, "whsec_another_secret", tolerance_s=FOREVER)
    with pytest.raises(WebhookRejected):
        verify_stripe(body + b" ", header, STRIPE_SECRET, tolerance_s=FOREVER)


def test_stripe_header_forms() -> None:
    body = (FIXTURES / "stripe/invoice.paid.json").read_bytes()
    now = int(time.time())
    good = _sign(body, STRIPE_SECRET, now)
    verify_stripe(body, {"stripe-signature": f"t={now},v1={good}"}, STRIPE_SECRET)
    # a secret being rolled: several v1, any may match; the test-mode v0 is ignored
    verify_stripe(body, {"stripe-signature": f"t={now},v1={'0' * 64},v1={good},v0={'1' * 64}"}, STRIPE_SECRET)
    for header in ({}, {"stripe-signature": f"t={now},v0={good}"}, {"stripe-signature": "garbage"},
                   {"stripe-signature": f"t={now + 1},v1={good}"}):
        with pytest.raises(WebhookRejected):
            verify_stripe(body, header, STRIPE_SECRET)
    with pytest.raises(WebhookRejected):
        verify_stripe(body, {"stripe-signature": f"t={now},v1={good}"}, None)


@pytest.mark.parametrize("name", sorted(VECTORS["lemonsqueezy"]["vectors"]))
def test_lemonsqueezy_vectors(name: str) -> None:
    body = (FIXTURES / name).read_bytes()
    vector = VECTORS["lemonsqueezy"]["vectors"][name]
    verify_lemonsqueezy(body, {"x-signature": vector["X-Signature"]}, LS_SECRET)
    verify_lemonsqueezy(body, {"x-signature": vector["X-Signature"].upper()}, LS_SECRET)
    for headers, secret in (({"x-signature": vector["X-Signature"]}, "other_secret"), ({}, LS_SECRET),
                            ({"x-signature": "00"}, LS_SECRET), ({"x-signature": vector["X-Signature"]}, None)):
        with pytest.raises(WebhookRejected):
            verify_lemonsqueezy(body, headers, secret)
    parsed = parse_lemonsqueezy(body)
    assert parsed.event_type == vector["X-Event-Name"] and parsed.event_id.startswith(vector["X-Event-Name"] + ":")


def test_revenuecat_authorization_is_exact() -> None:
    value = VECTORS["revenuecat"]["authorization_header_value"]
    verify_revenuecat(b"{}", {"authorization": value}, value)
    for given in ("", value.lower(), value + " ", value.removeprefix("Bearer ")):
        with pytest.raises(WebhookRejected):
            verify_revenuecat(b"{}", {"authorization": given} if given else {}, value)
    with pytest.raises(WebhookRejected):
        verify_revenuecat(b"{}", {"authorization": value}, None)


def test_event_identities_and_money_without_floats() -> None:
    event = parse_revenuecat((FIXTURES / "revenuecat/non_renewing_purchase.json").read_bytes())
    assert event.event_type == "NON_RENEWING_PURCHASE" and isinstance(event.payload["price"], Decimal)
    assert _rc_amount_minor(event.payload) == 2549  # 25.487 → 2549 minor units, half-even
    refund = parse_revenuecat((FIXTURES / "revenuecat/refund_cancellation_customer_support.json").read_bytes())
    assert _rc_amount_minor(refund.payload) == 999
    stripe_event = parse_stripe((FIXTURES / "stripe/invoice.paid.json").read_bytes())
    assert (stripe_event.event_id, int(stripe_event.at.timestamp())) == ("evt_1Pgc7CB7WZ01zgkWinvPaid01", 1785000002)
    for bad in (b"[]", b"{", b'{"id": "evt"}'):
        with pytest.raises(WebhookMalformed):
            parse_stripe(bad)
    with pytest.raises(WebhookMalformed):
        parse_lemonsqueezy(b'{"meta": {}}')
