"""RevenueCat webhooks: authenticated by the exact Authorization header value configured for the project (no
body signature). Every fixture sent byte-for-byte (each in its own project: the upstream samples share event
ids), a purchase → refund (CANCELLATION with CUSTOMER_SUPPORT) → refund reversed timeline, renewals credited
once per store transaction, expiry ending the entitlement, and a wrong or missing Authorization refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from payments_testkit import RC_AUTHORIZATION, Shop, fixture, handled, rc_body, send, shop
from tenancy_testkit import api_client, signup, sql

pytestmark = pytest.mark.integration

APP_USER = "1234567890"
ANON_REFUNDED = "$RCAnonymousID:12345678-1234-ABCD-1234-123456789123"


def _catalog(s: Shop) -> None:
    for slug, product in (("weekly", "com.subscription.weekly"), ("monthly", "com.revenuecat.myapp.monthly"),
                          ("yearly", "com.subscription.yearly")):
        s.offer("plan", slug=slug, name=slug, credits_minor=700, price_minor=499, currency="usd",
                interval="week", revenuecat_product_id=product)
    s.offer("pack", slug="tokens_2100", name="2100 tokens", credits_minor=2100, price_minor=2549, currency="cad",
            revenuecat_product_id="2100_tokens")


# (file, status when it arrives alone, credits it adds alone)
ALONE = [
    ("revenuecat/initial_purchase.json", "processed", 700),
    ("revenuecat/renewal.json", "processed", 700),
    ("revenuecat/non_renewing_purchase.json", "processed", 2100),
    ("revenuecat/initial_purchase_trial.json", "processed", 0),  # entitlement (trialing), no credits
    ("revenuecat/cancellation_unsubscribe.json", "deferred", 0),  # about a subscription not seen yet
    ("revenuecat/cancellation_trial.json", "deferred", 0),
    ("revenuecat/uncancellation.json", "deferred", 0),
    ("revenuecat/billing_issue.json", "deferred", 0),
    ("revenuecat/expiration.json", "deferred", 0),
    ("revenuecat/refund_cancellation_customer_support.json", "deferred", 0),  # refund before its purchase
    ("revenuecat/refund_reversed.json", "deferred", 0),
    ("revenuecat/product_change.json", "ignored", 0),  # takes effect with the next RENEWAL
]


def test_every_fixture_byte_for_byte(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        owner = signup(client, "merchant")
        for name, status, credits in ALONE:
            s = shop(client, owner)
            _catalog(s)
            handled(send(client, s.project_id, "revenuecat", name), status)
            handled(send(client, s.project_id, "revenuecat", name), "duplicate")
            wallet = s.wallet_of(APP_USER)
            assert s.balance(wallet) == credits, name
        assert len(ALONE) == 12


def test_purchase_renewal_refund_and_reversal(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = shop(client)
        _catalog(s)
        # the refund fixture refunds transaction 100000000000000 of this anonymous user: buy it first
        purchase = rc_body("revenuecat/initial_purchase.json", id="evt-purchase", app_user_id=ANON_REFUNDED,
                           product_id="com.revenuecat.myapp.monthly", transaction_id="100000000000000",
                           original_transaction_id="100000000000000", event_timestamp_ms=1601258901000,
                           purchased_at_ms=1601258901000, expiration_at_ms=1601336705000)
        handled(send(client, s.project_id, "revenuecat", purchase), "processed")
        handled(send(client, s.project_id, "revenuecat", purchase), "duplicate")
        wallet = s.wallet_of(ANON_REFUNDED)
        assert s.balance(wallet) == 700
        (ent,) = s.entitlements(wallet)
        assert ent["status"] == "active" and ent["plan"] == "monthly"
        s.debit(wallet, 200)
        handled(send(client, s.project_id, "revenuecat", "revenuecat/refund_cancellation_customer_support.json"),
            "processed")
        assert s.balance(wallet) == -200  # all 700 clawed back; 200 were spent → debt
        (ent,) = s.entitlements(wallet)
        assert ent["status"] == "ended"
        reversed_refund = rc_body("revenuecat/refund_reversed.json", id="evt-reversed", app_user_id=ANON_REFUNDED,
                                  transaction_id="100000000000000", original_transaction_id="100000000000000")
        handled(send(client, s.project_id, "revenuecat", reversed_refund), "processed")
        assert s.balance(wallet) == 500
        kinds = [(t["kind"], t["amount_minor"]) for t in s.transactions(wallet)]
        assert kinds == [("subscription_grant", 700), ("debit", -200), ("adjustment", -700), ("adjustment", 700)]


def test_a_pack_refund_takes_the_packs_own_bucket_and_its_reversal_restores(database_url: str,
                                                                           engines: Any) -> None:
    """A 2100-token pack next to a soon-expiring promo (100 of its 200 spent): the refund empties the pack's bucket
    and leaves the promo (which burns first in burn order) alone; once; REFUND_REVERSED posts the credits back."""
    with api_client(database_url, engines) as client:
        s = shop(client)
        _catalog(s)
        handled(send(client, s.project_id, "revenuecat", "revenuecat/non_renewing_purchase.json"), "processed")
        wallet = s.wallet_of(APP_USER)
        assert wallet is not None
        s.grant(wallet, 200, kind="promo", expires_at=(datetime.now(UTC) + timedelta(days=3)).isoformat())
        s.debit(wallet, 100)
        assert s.buckets(wallet) == {"promo": 100, "top_up": 2100}
        ids = {"app_user_id": APP_USER, "product_id": "2100_tokens", "transaction_id": "123456789012345",
               "original_transaction_id": "123456789012345"}
        refund = rc_body("revenuecat/refund_cancellation_customer_support.json", id="evt-pack-refund", **ids)
        handled(send(client, s.project_id, "revenuecat", refund), "processed")
        handled(send(client, s.project_id, "revenuecat", refund), "duplicate")
        assert s.last_allocations(wallet) == {"top_up": -2100}
        assert s.buckets(wallet) == {"promo": 100, "top_up": 0} and s.balance(wallet) == 100
        reversed_refund = rc_body("revenuecat/refund_reversed.json", id="evt-pack-reversed", **ids)
        handled(send(client, s.project_id, "revenuecat", reversed_refund), "processed")
        assert s.last_allocations(wallet) == {"adjustment": 2100} and s.balance(wallet) == 2200


def test_renewals_expiry_and_no_grant_after_the_end(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = shop(client)
        _catalog(s)
        handled(send(client, s.project_id, "revenuecat", "revenuecat/initial_purchase.json"), "processed")
        renewal = rc_body("revenuecat/renewal.json", id="evt-renewal-2", transaction_id="123456789012399",
                          product_id="com.subscription.yearly")
        handled(send(client, s.project_id, "revenuecat", renewal), "processed")
        wallet = s.wallet_of(APP_USER)
        assert s.balance(wallet) == 1400
        assert s.entitlements(wallet)[0]["plan"] == "yearly"  # the renewal named another product
        expired = rc_body("revenuecat/expiration.json", id="evt-expired", expiration_at_ms=1659400000000,
                          event_timestamp_ms=1659400000000)
        handled(send(client, s.project_id, "revenuecat", expired), "processed")
        (ent,) = s.entitlements(wallet)
        assert ent["status"] == "ended" and ent["will_renew"] is False
        late = rc_body("revenuecat/renewal.json", id="evt-after-end", transaction_id="123456789012400",
                       purchased_at_ms=1659500000000, expiration_at_ms=1660000000000, event_timestamp_ms=1659500000000)
        handled(send(client, s.project_id, "revenuecat", late), "ignored")
        assert s.balance(wallet) == 1400 and s.entitlements(wallet)[0]["status"] == "ended"


def test_wrong_or_missing_authorization_changes_nothing(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = shop(client)
        _catalog(s)
        body = fixture("revenuecat/initial_purchase.json")
        url = f"/api/v1/webhooks/revenuecat/{s.project_id}"
        for headers in ({}, {"Authorization": "Bearer guessed"}, {"Authorization": RC_AUTHORIZATION + "x"},
                        {"Authorization": RC_AUTHORIZATION.removeprefix("Bearer ")}):
            r = client.post(url, content=body, headers=headers)
            assert r.status_code == 400, r.text
            assert r.json()["code"] == "api.webhook_signature_invalid"
        assert sql(database_url, "SELECT count(*) FROM transactions")[0][0] == 0
        assert sql(database_url, "SELECT count(*) FROM entitlements")[0][0] == 0
        assert s.wallet_of(APP_USER) is None
        rows = sql(database_url, "SELECT status, signature FROM webhook_events")
        assert rows == [("rejected", None)] * 4  # the bearer value is never stored
