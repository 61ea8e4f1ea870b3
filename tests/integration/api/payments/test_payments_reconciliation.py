"""Receipts reconciliation (api/payments/reconciliation.py) against fakes of RevenueCat's and Lemon Squeezy's
HTTP APIs on 127.0.0.1 (documented shapes, with paging): a purchase whose webhook never arrived is granted once,
a second run grants nothing, the webhook arriving after the job changes nothing (and the job after the webhook
grants nothing), a state change seen only through the API moves the entitlement, and provider errors (5xx, 429
with Retry-After, bad JSON) are reported — not crashes — and lose nothing: the next run applies it once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from payments_testkit import (
    RC_AUTHORIZATION,
    FakeLemonSqueezy,
    FakeRevenueCat,
    Shop,
    fake_provider_api,
    handled,
    ledger_rows,
    rc_body,
    send,
    shop,
)
from sqlalchemy import Engine
from tenancy_testkit import api_client, sql

from api.payments.reconcile_settings import ReconcileSettings
from api.payments.reconciliation import Report, reconcile_provider
from ledger.db import make_engine
from streams import catalog

pytestmark = pytest.mark.integration

PRODUCT, PACK_PRODUCT, USER = "com.meterline.monthly", "com.meterline.tokens_500", "user_rc_1"


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@contextmanager
def _engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url, pool_size=2, application_name="test-reconcile")
    try:
        yield engine
    finally:
        engine.dispose()


def _run(engine: Engine, s: Shop, provider: str, fake: Any) -> Report:
    settings = ReconcileSettings(revenuecat_api_base=fake.base_url, lemonsqueezy_api_base=fake.base_url,
                                 payments_reconcile_retry_after_max_s=1.0, payments_reconcile_timeout_s=5.0)
    return reconcile_provider(engine, settings, project_id=s.project_id, provider=provider, trigger="cli")


def _rc_shop(client: Any, engine: Engine, fake: FakeRevenueCat) -> Shop:
    s = shop(client)
    s.offer("plan", slug="monthly", name="Monthly", credits_minor=700, price_minor=499, currency="usd",
            interval="month", revenuecat_product_id=PRODUCT)
    s.offer("pack", slug="tokens", name="Tokens", credits_minor=500, price_minor=299, currency="usd",
            revenuecat_product_id=PACK_PRODUCT)
    r = client.put(f"{s.base}/payment-providers/revenuecat", json={"webhook_secret": RC_AUTHORIZATION,
                                                                    "api_key": fake.api_key}, headers=s.owner.headers)
    assert r.status_code == 200 and r.json()["api_key_set"], r.text
    with engine.begin() as conn:  # the customer is known to Meterline (its usage created the subject)
        catalog.set_subject_key(conn, project_id=s.project_id, subject=USER)
    return s


def _rc_subscription(fake: FakeRevenueCat, *, transaction: str, bought: datetime, expires: datetime,
                     **extra: Any) -> None:
    fake.subscriber(USER)["subscriptions"][PRODUCT] = {
        "auto_resume_date": None, "billing_issues_detected_at": None, "expires_date": _iso(expires),
        "grace_period_expires_date": None, "is_sandbox": False, "original_purchase_date": _iso(bought),
        "ownership_type": "PURCHASED", "period_type": "normal", "purchase_date": _iso(bought), "refunded_at": None,
        "store": "app_store", "store_transaction_id": transaction, "unsubscribe_detected_at": None,
        "price": {"amount": 4.99, "currency": "USD"}, **extra}


def _rc_webhook(transaction: str, bought: datetime, expires: datetime, **overrides: Any) -> bytes:
    return rc_body("revenuecat/initial_purchase.json", id=f"evt-{transaction}", app_user_id=USER,
                   product_id=PRODUCT, transaction_id=transaction, original_transaction_id=transaction,
                   event_timestamp_ms=int(bought.timestamp() * 1000), purchased_at_ms=int(bought.timestamp() * 1000),
                   expiration_at_ms=int(expires.timestamp() * 1000), environment="PRODUCTION", price=4.99,
                   currency="USD", period_type="NORMAL", **overrides)


def test_revenuecat_missing_purchase_granted_once_then_webhook_changes_nothing(database_url: str, engines: Any,
                                                                                monkeypatch: Any) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    bought, expires = now - timedelta(days=1), now + timedelta(days=29)
    with api_client(database_url, engines) as client, _engine(database_url) as engine, \
            fake_provider_api(FakeRevenueCat()) as fake:
        s = _rc_shop(client, engine, fake)
        _rc_subscription(fake, transaction="T-1001", bought=bought, expires=expires)
        fake.subscriber(USER)["non_subscriptions"][PACK_PRODUCT] = [
            {"id": "rc-np-1", "is_sandbox": False, "purchase_date": _iso(bought), "store": "app_store",
             "store_transaction_id": "T-2001"}]

        first = _run(engine, s, "revenuecat", fake)
        assert first.status == "fixed" and first.fixed == 2 and not first.errors, first.public()
        assert {f["event_type"] for f in first.fixes} == {"INITIAL_PURCHASE", "NON_RENEWING_PURCHASE"}
        wallet = s.wallet_of(USER)
        assert s.balance(wallet) == 700 + 500
        (ent,) = s.entitlements(wallet)
        assert ent["status"] == "active" and ent["plan"] == "monthly"
        rows = ledger_rows(database_url, s.project_id)

        second = _run(engine, s, "revenuecat", fake)
        assert second.status == "clean" and second.fixed == 0 and second.fixes == [], second.public()
        assert ledger_rows(database_url, s.project_id) == rows

        # the lost webhooks turn up after all: applied, and they change nothing
        handled(send(client, s.project_id, "revenuecat", _rc_webhook("T-1001", bought, expires)), "ignored")
        pack = rc_body("revenuecat/non_renewing_purchase.json", id="evt-T-2001", app_user_id=USER,
                       product_id=PACK_PRODUCT, transaction_id="T-2001", original_transaction_id="T-2001",
                       environment="PRODUCTION")
        handled(send(client, s.project_id, "revenuecat", pack), "ignored")
        assert ledger_rows(database_url, s.project_id) == rows
        assert s.balance(wallet) == 1200
        assert [e["status"] for e in s.entitlements(wallet)] == ["active"]

        # run from the API (an admin's "reconcile now"): clean, audited
        monkeypatch.setenv("API_REVENUECAT_API_BASE", fake.base_url)
        monkeypatch.setenv("API_PAYMENTS_RECONCILE_TIMEOUT_S", "5")
        now_run = client.post(f"{s.base}/payments/reconciliation", params={"provider": "revenuecat"},
                              headers=s.owner.headers)
        assert now_run.status_code == 200, now_run.text
        assert [(x["status"], x["fixed"]) for x in now_run.json()] == [("clean", 0)]
        assert ledger_rows(database_url, s.project_id) == rows
        assert sql(database_url, "SELECT after->'reports' FROM audit_log WHERE project_id = %s "
                                 "AND action = 'payments.reconcile'", s.project_id) == [([now_run.json()[0]["id"]],)]

        # served by the API: newest report first
        r = client.get(f"{s.base}/payments/reconciliation", headers=s.owner.headers)
        assert r.status_code == 200, r.text
        assert [(x["status"], x["fixed"]) for x in r.json()] == [("clean", 0), ("clean", 0), ("fixed", 2)]


def test_revenuecat_webhook_first_then_job_grants_nothing(database_url: str, engines: Any) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    bought, expires = now - timedelta(hours=3), now + timedelta(days=30)
    with api_client(database_url, engines) as client, _engine(database_url) as engine, \
            fake_provider_api(FakeRevenueCat()) as fake:
        s = _rc_shop(client, engine, fake)
        handled(send(client, s.project_id, "revenuecat", _rc_webhook("T-3001", bought, expires)), "processed")
        _rc_subscription(fake, transaction="T-3001", bought=bought, expires=expires)
        rows = ledger_rows(database_url, s.project_id)
        report = _run(engine, s, "revenuecat", fake)
        assert report.status == "clean" and report.checked == 1, report.public()
        assert ledger_rows(database_url, s.project_id) == rows
        assert s.balance(s.wallet_of(USER)) == 700


def test_revenuecat_state_seen_only_through_the_api(database_url: str, engines: Any) -> None:
    """Expired and unsubscribed (cancelled) subscriptions whose EXPIRATION / CANCELLATION webhooks never came."""
    now = datetime.now(UTC).replace(microsecond=0)
    with api_client(database_url, engines) as client, _engine(database_url) as engine, \
            fake_provider_api(FakeRevenueCat()) as fake:
        s = _rc_shop(client, engine, fake)
        bought, expired = now - timedelta(days=10), now - timedelta(hours=1)
        handled(send(client, s.project_id, "revenuecat", _rc_webhook("T-4001", bought, expired)), "processed")
        _rc_subscription(fake, transaction="T-4001", bought=bought, expires=expired)
        report = _run(engine, s, "revenuecat", fake)
        assert [(f["event_type"], f["status"]) for f in report.fixes] == [("EXPIRATION", "processed")]
        wallet = s.wallet_of(USER)
        (ent,) = s.entitlements(wallet)
        assert ent["status"] == "ended" and ent["active"] is False
        assert s.balance(wallet) == 700  # a state change moves no credits
        assert _run(engine, s, "revenuecat", fake).fixes == []

        # a second customer: unsubscribed, paid until the period's end → cancelled (still active)
        other = "user_rc_2"
        with engine.begin() as conn:
            catalog.set_subject_key(conn, project_id=s.project_id, subject=other)
        bought, renews = now - timedelta(days=2), now + timedelta(days=28)
        handled(send(client, s.project_id, "revenuecat",
                     rc_body("revenuecat/initial_purchase.json", id="evt-T-5001", app_user_id=other,
                             product_id=PRODUCT, transaction_id="T-5001", original_transaction_id="T-5001",
                             event_timestamp_ms=int(bought.timestamp() * 1000),
                             purchased_at_ms=int(bought.timestamp() * 1000),
                             expiration_at_ms=int(renews.timestamp() * 1000), environment="PRODUCTION",
                             period_type="NORMAL")), "processed")
        fake.subscriber(other)["subscriptions"][PRODUCT] = {
            **fake.subscriber(USER)["subscriptions"][PRODUCT], "store_transaction_id": "T-5001",
            "purchase_date": _iso(bought), "expires_date": _iso(renews),
            "unsubscribe_detected_at": _iso(now - timedelta(hours=5))}
        report = _run(engine, s, "revenuecat", fake)
        assert [(f["event_type"], f["status"]) for f in report.fixes] == [("CANCELLATION", "processed")]
        (ent,) = s.entitlements(s.wallet_of(other))
        assert ent["status"] == "cancelled" and ent["active"] is True and ent["will_renew"] is False


def test_revenuecat_provider_errors_are_reported_and_lose_nothing(database_url: str, engines: Any) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    with api_client(database_url, engines) as client, _engine(database_url) as engine, \
            fake_provider_api(FakeRevenueCat()) as fake:
        s = _rc_shop(client, engine, fake)
        _rc_subscription(fake, transaction="T-6001", bought=now - timedelta(days=1), expires=now + timedelta(days=29))

        fake.scripted.fail(503, times=2)  # retried once, still failing
        report = _run(engine, s, "revenuecat", fake)
        assert report.status == "errors" and [e["kind"] for e in report.errors] == ["server_error"]
        assert s.balance(s.wallet_of(USER)) == 0

        fake.scripted.fail(429, Retry_After="120")  # longer than we wait: reported, run ends
        report = _run(engine, s, "revenuecat", fake)
        assert [(e["kind"], e["retry_after_s"]) for e in report.errors] == [("rate_limited", 120.0)]
        assert s.balance(s.wallet_of(USER)) == 0

        fake.scripted.fail(200, body=b'{"subscriber": {"subscriptions": ')  # truncated JSON
        report = _run(engine, s, "revenuecat", fake)
        assert [e["kind"] for e in report.errors] == ["bad_json"]
        assert s.balance(s.wallet_of(USER)) == 0

        fake.scripted.fail(429, Retry_After="0")  # short: waited out, then applied
        report = _run(engine, s, "revenuecat", fake)
        assert report.status == "fixed" and report.fixed == 1 and not report.errors, report.public()
        assert s.balance(s.wallet_of(USER)) == 700
        assert _run(engine, s, "revenuecat", fake).status == "clean"
        assert s.balance(s.wallet_of(USER)) == 700
        r = client.get(f"{s.base}/payments/reconciliation", params={"provider": "revenuecat"},
                       headers=s.owner.headers)
        assert [x["status"] for x in r.json()] == ["clean", "fixed", "errors", "errors", "errors"]


# ------------------------------------------------------------------------------------------- Lemon Squeezy

STORE = "7001"


def _ls_resource(kind: str, rid: int, created: datetime, **attrs: Any) -> dict[str, Any]:
    stamp = created.strftime("%Y-%m-%dT%H:%M:%S.000000Z")
    return {"type": kind, "id": str(rid), "attributes": {"store_id": int(STORE), "customer_id": 1,
                                                        "created_at": stamp, "updated_at": stamp,
                                                        "test_mode": False, **attrs},
            "relationships": {}, "links": {"self": f"https://api.lemonsqueezy.com/v1/{kind}/{rid}"}}


def _order(rid: int, created: datetime, **attrs: Any) -> dict[str, Any]:
    return _ls_resource("orders", rid, created, identifier=f"ord-{rid}", order_number=rid, currency="EUR",
                        status="paid", total=1859, refunded=False, refunded_at=None, refunded_amount=0,
                        first_order_item={"order_id": rid, "variant_id": 1, "product_id": 1, "price": 1859},
                        **attrs)


def _ls_shop(client: Any, fake: FakeLemonSqueezy) -> Shop:
    s = shop(client)
    s.offer("pack", slug="tokens", name="Tokens", credits_minor=1500, price_minor=1859, currency="eur",
            lemonsqueezy_variant_id="1")
    s.offer("plan", slug="citrus", name="Citrus", credits_minor=3000, price_minor=999, currency="usd",
            lemonsqueezy_variant_id="11")
    r = client.put(f"{s.base}/payment-providers/lemonsqueezy",
                   json={"webhook_secret": "ls-signing-secret-1", "api_key": fake.api_key, "store_id": STORE},
                   headers=s.owner.headers)
    assert r.status_code == 200 and r.json()["store_id"] == STORE, r.text
    return s


def _ls_send(client: Any, s: Shop, event: str, resource: dict[str, Any]) -> Any:
    import json

    from payments_testkit import ls_signature

    body = json.dumps({"meta": {"event_name": event, "custom_data": {"customer_id": "25"}, "test_mode": False},
                       "data": resource}).encode()
    return client.post(f"/api/v1/webhooks/lemonsqueezy/{s.project_id}", content=body,
                       headers={"X-Signature": ls_signature(body, "ls-signing-secret-1"), "X-Event-Name": event,
                                "Content-Type": "application/json"})


def test_lemonsqueezy_orders_subscriptions_invoices_paged(database_url: str, engines: Any) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    with api_client(database_url, engines) as client, _engine(database_url) as engine, \
            fake_provider_api(FakeLemonSqueezy()) as fake:
        s = _ls_shop(client, fake)
        orders = [_order(100 + i, now - timedelta(hours=i + 1)) for i in range(5)]
        orders.append(_order(99, now - timedelta(days=90)))  # older than the window: never granted by the job
        fake.resources["orders"] = orders
        # one order's webhook did arrive (it tells which customer Lemon Squeezy's customer 1 is)
        handled(_ls_send(client, s, "order_created", orders[2]), "processed")
        wallet = s.wallet_of("25")
        assert s.balance(wallet) == 1500

        sub = _ls_resource("subscriptions", 300, now - timedelta(days=3), order_id=100, variant_id=11,
                           status="active", renews_at=_iso(now + timedelta(days=27)), ends_at=None,
                           user_email="c@example.com")
        handled(_ls_send(client, s, "subscription_created", sub), "processed")
        invoice = _ls_resource("subscription-invoices", 400, now - timedelta(days=3), subscription_id=300,
                               status="paid", total=999, currency="USD", refunded_amount=0,
                               billing_reason="initial")
        # Lemon Squeezy now says: expired (no webhook), and its first invoice was paid (no webhook either)
        expired = {**sub, "attributes": {**sub["attributes"], "status": "expired",
                                         "ends_at": _iso(now - timedelta(hours=2)),
                                         "updated_at": _iso(now - timedelta(hours=2))}}
        fake.resources["subscriptions"] = [expired]
        fake.resources["subscription-invoices"] = [invoice]

        report = _run(engine, s, "lemonsqueezy", fake)
        assert not report.errors, report.public()
        got = sorted((f["event_type"], f["status"]) for f in report.fixes)
        assert got == sorted([("order_created", "processed")] * 4 + [("subscription_updated", "processed"),
                                                                       ("subscription_payment_success", "processed")])
        assert s.balance(wallet) == 5 * 1500 + 3000
        (ent,) = s.entitlements(wallet)
        assert ent["status"] == "ended"
        assert any("page%5Bnumber%5D=3" in r or "page[number]=3" in r for r in fake.requests), fake.requests
        rows = ledger_rows(database_url, s.project_id)

        assert _run(engine, s, "lemonsqueezy", fake).fixes == []
        # the lost webhooks arrive late: nothing changes
        handled(_ls_send(client, s, "order_created", orders[0]), "ignored")
        handled(_ls_send(client, s, "subscription_payment_success", invoice), "ignored")
        assert ledger_rows(database_url, s.project_id) == rows


def test_lemonsqueezy_errors_reported_and_next_run_applies_once(database_url: str, engines: Any) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    with api_client(database_url, engines) as client, _engine(database_url) as engine, \
            fake_provider_api(FakeLemonSqueezy()) as fake:
        s = _ls_shop(client, fake)
        orders = [_order(200 + i, now - timedelta(hours=i + 1)) for i in range(3)]
        fake.resources["orders"] = orders
        handled(_ls_send(client, s, "order_created", orders[0]), "processed")
        wallet = s.wallet_of("25")
        fake.scripted.fail(500, times=2)  # /v1/subscriptions fails twice (retry included)
        fake.scripted.fail(200, body=b"<html>gateway</html>")  # /v1/subscription-invoices: not JSON
        report = _run(engine, s, "lemonsqueezy", fake)
        assert sorted(e["kind"] for e in report.errors) == ["bad_json", "server_error"], report.public()
        assert report.fixed == 2  # the orders list still read and reconciled
        assert s.balance(wallet) == 3 * 1500
        report = _run(engine, s, "lemonsqueezy", fake)
        assert report.status == "clean" and s.balance(wallet) == 3 * 1500
