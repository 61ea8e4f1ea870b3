"""Lemon Squeezy webhooks: every fixture sent byte-for-byte with its X-Signature from the test vectors (hex
HMAC-SHA256 of the raw body; no timestamp), orders credited once and clawed back on refund, the subscription
lifecycle (plan change, renewal payment, cancel, expiry) as an entitlement with grants, a renewal arriving
before its subscription deferred and applied later, and forged signatures refused with nothing changed."""

from __future__ import annotations

from typing import Any

import pytest
from payments_testkit import VECTORS, Shop, fixture, handled, ledger_rows, ls_signature, send, shop
from tenancy_testkit import api_client, sql

pytestmark = pytest.mark.integration

CUSTOMER = "25"  # meta.custom_data.customer_id of every fixture: the customer's id in the merchant's product
ORDER, REFUND = "lemonsqueezy/order_created.json", "lemonsqueezy/order_refunded.json"
CREATED, UPDATED = "lemonsqueezy/subscription_created.json", "lemonsqueezy/subscription_updated.json"
PAID, CANCELLED = "lemonsqueezy/subscription_payment_success.json", "lemonsqueezy/subscription_cancelled.json"
EXPIRED = "lemonsqueezy/subscription_expired.json"


def _plans(client: Any) -> Shop:
    s = shop(client)
    s.offer("plan", slug="citrus", name="Citrus", credits_minor=3000, price_minor=999, currency="usd",
            lemonsqueezy_variant_id="1")
    s.offer("plan", slug="citrus_plus", name="Citrus+", credits_minor=9000, price_minor=1999, currency="usd",
            lemonsqueezy_variant_id="11")
    return s


def test_vectors_are_reproduced() -> None:
    for name, vector in VECTORS["lemonsqueezy"]["vectors"].items():
        assert ls_signature(fixture(name)) == vector["X-Signature"], name


def test_order_credited_once_and_refunded(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = shop(client)
        s.offer("pack", slug="tokens", name="Tokens", credits_minor=1500, price_minor=1859, currency="eur",
                lemonsqueezy_variant_id="1")
        handled(send(client, s.project_id, "lemonsqueezy", ORDER), "processed")
        handled(send(client, s.project_id, "lemonsqueezy", ORDER), "duplicate")
        wallet = s.wallet_of(CUSTOMER)
        assert s.balance(wallet) == 1500
        (tx,) = s.transactions(wallet)
        assert tx["kind"] == "top_up" and tx["source_ref"] == "lemonsqueezy:order:1"
        handled(send(client, s.project_id, "lemonsqueezy", REFUND), "processed")
        handled(send(client, s.project_id, "lemonsqueezy", REFUND), "duplicate")
        assert s.balance(wallet) == 0
        assert [(t["kind"], t["amount_minor"]) for t in s.transactions(wallet)] == [("top_up", 1500),
                                                                                   ("adjustment", -1500)]


def test_every_fixture_through_a_subscription_lifecycle(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = _plans(client)
        handled(send(client, s.project_id, "lemonsqueezy", ORDER), "ignored")  # a plan's order: the invoice pays
        handled(send(client, s.project_id, "lemonsqueezy", CREATED), "processed")
        wallet = s.wallet_of(CUSTOMER)
        (ent,) = s.entitlements(wallet)
        assert (ent["plan"], ent["status"], ent["external_subscription_id"]) == ("citrus", "active", "1")
        handled(send(client, s.project_id, "lemonsqueezy", UPDATED), "processed")  # moves to variant 11
        assert s.entitlements(wallet)[0]["plan"] == "citrus_plus"
        handled(send(client, s.project_id, "lemonsqueezy", PAID), "processed")
        handled(send(client, s.project_id, "lemonsqueezy", PAID), "duplicate")
        assert s.balance(wallet) == 9000
        (tx,) = s.transactions(wallet)
        assert tx["kind"] == "subscription_grant" and tx["source_ref"] == "lemonsqueezy:invoice:2"
        handled(send(client, s.project_id, "lemonsqueezy", CANCELLED), "processed")
        (ent,) = s.entitlements(wallet)
        assert ent["status"] == "cancelled" and ent["will_renew"] is False
        assert ent["current_period_end"].startswith("2026-09-25")
        handled(send(client, s.project_id, "lemonsqueezy", EXPIRED), "processed")
        (ent,) = s.entitlements(wallet)
        assert ent["status"] == "ended" and ent["active"] is False
        handled(send(client, s.project_id, "lemonsqueezy", REFUND), "deferred")  # a plan order was never credited
        assert s.balance(wallet) == 9000


def test_renewal_before_subscription_is_deferred(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        in_order = _plans(client)
        for name in (CREATED, PAID, CANCELLED):
            handled(send(client, in_order.project_id, "lemonsqueezy", name), "processed")
        reordered = _plans(client)
        handled(send(client, reordered.project_id, "lemonsqueezy", PAID), "deferred")
        assert reordered.wallet_of(CUSTOMER) is None
        # a subscription event carries the whole subscription: the cancellation creates it and wakes the renewal
        handled(send(client, reordered.project_id, "lemonsqueezy", CANCELLED), "processed")
        wallet = reordered.wallet_of(CUSTOMER)
        assert reordered.balance(wallet) == 3000
        assert [e["status"] for e in reordered.events()] == ["processed", "processed"]
        handled(send(client, reordered.project_id, "lemonsqueezy", CREATED), "processed")  # older: state kept
        assert [(k, a) for _, k, a, _ in ledger_rows(database_url, reordered.project_id)] == \
            [(k, a) for _, k, a, _ in ledger_rows(database_url, in_order.project_id)]
        keep = ("plan", "status", "will_renew", "current_period_end")
        assert {k: reordered.entitlements()[0][k] for k in keep} == {k: in_order.entitlements()[0][k] for k in keep}


def test_forged_signature_changes_nothing(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = shop(client)
        s.offer("pack", slug="tokens", name="Tokens", credits_minor=1500, price_minor=1859, currency="eur",
                lemonsqueezy_variant_id="1")
        body = fixture(ORDER)
        url = f"/api/v1/webhooks/lemonsqueezy/{s.project_id}"
        for headers in ({"X-Signature": ls_signature(body, "not_the_secret")}, {},
                        {"X-Signature": VECTORS["lemonsqueezy"]["vectors"][REFUND]["X-Signature"]}):
            r = client.post(url, content=body, headers=headers)
            assert r.status_code == 400 and r.json()["code"] == "api.webhook_signature_invalid", r.text
        tampered = body.replace(b'"total": 1859', b'"total": 9999')
        r = client.post(url, content=tampered, headers={"X-Signature": VECTORS["lemonsqueezy"]["vectors"][ORDER][
            "X-Signature"]})
        assert r.status_code == 400
        assert sql(database_url, "SELECT count(*) FROM transactions")[0][0] == 0
        assert s.wallet_of(CUSTOMER) is None
