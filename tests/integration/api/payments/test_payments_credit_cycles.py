"""Subscription credits that end with their billing cycle: a plan's ``credits_expire`` (``period_end`` by default
for new plans, or ``never``) and ``credits_grace_s`` through the offers API; every paid period (Stripe
invoice.paid, RevenueCat INITIAL_PURCHASE / RENEWAL, Lemon Squeezy subscription_payment_success) granted as
its own bucket expiring at the period's end from the event + grace; the ledger's expiry job (the scheduler's
``expire_credits``) posting exactly the unspent remainder as ``expiry`` after that moment; replays granting
nothing twice. Webhooks are signed and verified for real."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from payments_testkit import Shop, handled, rc_body, send, shop, stripe_invoice
from sqlalchemy import Engine
from tenancy_testkit import api_client, sql

from ledger import service
from ledger.db import make_engine

pytestmark = pytest.mark.integration

SUB = "stripe/checkout.session.completed.subscription.json"
INVOICE = "stripe/invoice.paid.json"
PRICE = "price_1PgafmB7WZ01zgkW6dKueIc5"
CUSTOMER = "user_42"
DAY = 86400


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url, pool_size=2)
    yield eng
    eng.dispose()


def _expire(engine: Engine, now: datetime) -> int:
    """One run of the scheduler's expire_credits job at ``now``."""
    with engine.begin() as conn:
        return service.expire_credits(conn, now=now)


def buckets(database_url: str, wallet_id: str | None) -> list[tuple[Any, ...]]:
    """(source_ref, granted, remaining, expires_at, expired?) of the wallet's buckets, oldest first."""
    return sql(database_url, """SELECT source_ref, granted_minor, remaining_minor, expires_at, expired_at IS NOT NULL
                                FROM credit_buckets WHERE wallet_id = %s ORDER BY id""", wallet_id)


# ------------------------------------------------------------------------------------------------ offers API


def test_offers_api_takes_the_expiry_policy(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = shop(client)
        plan = s.offer("plan", slug="pro", name="Pro", credits_minor=5000, price_minor=2000, currency="usd")
        assert (plan["credits_expire"], plan["credits_grace_s"]) == ("period_end", 0)  # the default for new plans
        rolling = s.offer("plan", slug="team", name="Team", credits_minor=9000, price_minor=5000, currency="usd",
                          interval="year", credits_expire="never")
        assert (rolling["credits_expire"], rolling["credits_grace_s"]) == ("never", 0)
        grace = s.offer("plan", slug="pro_grace", name="Pro+", credits_minor=5000, price_minor=2500, currency="usd",
                        credits_expire="period_end", credits_grace_s=3 * DAY)
        assert grace["credits_grace_s"] == 3 * DAY
        pack = s.offer("pack", slug="starter", name="Starter", credits_minor=1000, price_minor=1000, currency="usd")
        assert (pack["credits_expire"], pack["credits_grace_s"]) == ("never", 0)

        r = client.get(f"{s.base}/plans/pro_grace", headers=s.owner.headers)
        assert r.status_code == 200 and r.json() == grace
        r = client.get(f"{s.base}/credit-packs/starter", headers=s.owner.headers)
        assert r.status_code == 200 and r.json() == pack
        assert client.get(f"{s.base}/plans/starter", headers=s.owner.headers).status_code == 404
        listed = client.get(f"{s.base}/plans", headers=s.owner.headers).json()
        assert {p["slug"]: p["credits_expire"] for p in listed} == {"pro": "period_end", "team": "never",
                                                                    "pro_grace": "period_end"}

        def refused(path: str, body: dict[str, Any]) -> str:
            r = client.post(f"{s.base}/{path}", json=body, headers=s.owner.headers)
            assert r.status_code == 422, r.text
            assert r.json()["code"] == "api.validation_failed"
            return json.dumps(r.json()["errors"])

        base = {"name": "X", "credits_minor": 10, "price_minor": 10, "currency": "usd"}
        why = refused("credit-packs", {**base, "slug": "p2", "credits_expire": "period_end"})
        assert "for plans" in why and "POST /plans" in why
        assert "for plans" in refused("credit-packs", {**base, "slug": "p3", "credits_grace_s": 60})
        why = refused("plans", {**base, "slug": "x1", "credits_expire": "never", "credits_grace_s": 60})
        assert "set credits_expire to 'period_end'" in why
        assert "period_end" in refused("plans", {**base, "slug": "x2", "credits_expire": "monthly"})
        assert "credits_grace_s" in refused("plans", {**base, "slug": "x3", "credits_grace_s": -1})
        assert "credits_grace_s" in refused("plans", {**base, "slug": "x4", "credits_grace_s": 366 * DAY})

        schema = client.get("/openapi.json").json()["components"]["schemas"]
        examples = schema["PlanIn"]["examples"]
        assert {e.get("credits_expire") for e in examples} >= {"never", "period_end"}
        assert "period_end" in schema["PlanIn"]["properties"]["credits_expire"]["description"]


# -------------------------------------------------------------------------------------------------- Stripe


def _stripe_plan_shop(client: Any, **policy: Any) -> Shop:
    s = shop(client)
    s.offer("plan", slug="pro_monthly", name="Pro", credits_minor=5000, price_minor=2000, currency="usd",
            interval="month", stripe_price_id=PRICE, **policy)
    return s


def test_stripe_period_credits_expire_at_period_end(database_url: str, engines: Any, engine: Engine) -> None:
    now = int(datetime.now(UTC).timestamp())
    start1, end1 = now - 10 * DAY, now + 20 * DAY
    end2 = end1 + 30 * DAY
    grace = 3600
    with api_client(database_url, engines) as client:
        s = _stripe_plan_shop(client, credits_grace_s=grace)
        handled(send(client, s.project_id, "stripe", SUB), "processed")
        wallet = s.wallet_of(CUSTOMER)
        assert wallet is not None
        first = handled(send(client, s.project_id, "stripe", stripe_invoice("evt_p1", "in_p1", start1, end1)),
                    "processed")
        expires1 = datetime.fromtimestamp(end1 + grace, UTC)
        assert buckets(database_url, wallet) == [("stripe:in_p1", 5000, 5000, expires1, False)]
        payment = client.get(f"{s.base}/payments", headers=s.owner.headers).json()[0]
        assert payment["credits_expire_at"] == expires1.isoformat().replace("+00:00", "Z")
        assert first["transaction_ids"]
        # a pack bought meanwhile does not expire; usage burns the period's credits first (sooner expiry)
        s.grant(wallet, 700)
        s.debit(wallet, 1200)
        assert s.balance(wallet) == 4500

        # replays: the same event (duplicate) and the same invoice under another event (invoice.payment_succeeded)
        handled(send(client, s.project_id, "stripe", stripe_invoice("evt_p1", "in_p1", start1, end1)), "duplicate")
        again = handled(send(client, s.project_id, "stripe", stripe_invoice(
            "evt_p1_succeeded", "in_p1", start1, end1, event_type="invoice.payment_succeeded")), "ignored")
        assert "already credited" in again["detail"]
        assert s.balance(wallet) == 4500 and len(buckets(database_url, wallet)) == 2

        # the job before the moment expires nothing; after it, exactly the unspent remainder (5000 - 1200)
        assert _expire(engine, expires1 - timedelta(seconds=1)) == 0
        assert _expire(engine, expires1 + timedelta(seconds=1)) == 1
        assert _expire(engine, expires1 + timedelta(seconds=2)) == 0  # a bucket expires once
        kinds = [(t["kind"], t["amount_minor"]) for t in s.transactions(wallet)]
        assert kinds[-1] == ("expiry", -3800)
        assert s.balance(wallet) == 700  # the pack's credits, exactly

        # the next period's renewal is its own bucket, expiring at ITS end
        handled(send(client, s.project_id, "stripe", stripe_invoice("evt_p2", "in_p2", end1, end2)), "processed")
        handled(send(client, s.project_id, "stripe", stripe_invoice("evt_p2", "in_p2", end1, end2)), "duplicate")
        expires2 = datetime.fromtimestamp(end2 + grace, UTC)
        rows = buckets(database_url, wallet)
        assert rows[0] == ("stripe:in_p1", 5000, 0, expires1, True)
        assert rows[2] == ("stripe:in_p2", 5000, 5000, expires2, False)
        assert s.balance(wallet) == 5700
        (ent,) = s.entitlements(wallet)
        assert ent["current_period_end"] == datetime.fromtimestamp(end2, UTC).isoformat().replace("+00:00", "Z")
        assert _expire(engine, expires2 + timedelta(seconds=1)) == 1
        assert s.balance(wallet) == 700
        expiries = sql(database_url, """SELECT amount_minor, source_ref FROM transactions
                                        WHERE wallet_id = %s AND kind = 'expiry' ORDER BY id""", wallet)
        assert [a for a, _ in expiries] == [-3800, -5000]


def test_stripe_never_plan_credits_roll_over(database_url: str, engines: Any, engine: Engine) -> None:
    now = int(datetime.now(UTC).timestamp())
    with api_client(database_url, engines) as client:
        s = _stripe_plan_shop(client, credits_expire="never")
        handled(send(client, s.project_id, "stripe", SUB), "processed")
        handled(send(client, s.project_id, "stripe", stripe_invoice("evt_n1", "in_n1", now - DAY, now + DAY)),
            "processed")
        handled(send(client, s.project_id, "stripe", stripe_invoice("evt_n2", "in_n2", now + DAY, now + 2 * DAY)),
            "processed")
        wallet = s.wallet_of(CUSTOMER)
        assert [(b[0], b[3]) for b in buckets(database_url, wallet)] == [("stripe:in_n1", None),
                                                                         ("stripe:in_n2", None)]
        assert _expire(engine, datetime.now(UTC) + timedelta(days=400)) == 0
        assert s.balance(wallet) == 10000
        assert client.get(f"{s.base}/payments", headers=s.owner.headers).json()[0]["credits_expire_at"] is None


def test_plan_existing_before_the_migration_rolls_over(database_url: str, engines: Any) -> None:
    """Rows created without the column (as api_0003 left them) get the DB default 'never'."""
    with api_client(database_url, engines) as client:
        s = shop(client)
        sql(database_url, """INSERT INTO payment_offers (id, project_id, slug, kind, name, credits_minor, price_minor,
                                 currency, billing_interval) VALUES ('off_old', %s, 'old', 'plan', 'Old', 1, 1, 'usd',
                                 'month')""", s.project_id)
        r = client.get(f"{s.base}/plans/old", headers=s.owner.headers)
        assert r.status_code == 200 and r.json()["credits_expire"] == "never"


def test_period_already_over_when_paid_expires_at_the_next_run(database_url: str, engines: Any,
                                                                engine: Engine) -> None:
    """The fixture's period (July-August 2026) is over: granted, noted, and expired by the next job run."""
    with api_client(database_url, engines) as client:
        s = _stripe_plan_shop(client)
        handled(send(client, s.project_id, "stripe", SUB), "processed")
        paid = handled(send(client, s.project_id, "stripe", INVOICE), "processed")
        assert "expiry job" in paid["detail"]
        wallet = s.wallet_of(CUSTOMER)
        assert s.balance(wallet) == 5000
        assert _expire(engine, datetime.now(UTC)) == 1
        assert s.balance(wallet) == 0
        assert [t["kind"] for t in s.transactions(wallet)] == ["subscription_grant", "expiry"]


# ---------------------------------------------------------------------------------------------- RevenueCat


def test_revenuecat_periods_expire_at_expiration_at(database_url: str, engines: Any, engine: Engine) -> None:
    now_ms = int(datetime.now(UTC).timestamp()) * 1000
    week_ms = 7 * DAY * 1000
    with api_client(database_url, engines) as client:
        s = shop(client)
        s.offer("plan", slug="weekly", name="Weekly", credits_minor=700, price_minor=499, currency="usd",
                interval="week", revenuecat_product_id="com.subscription.weekly", credits_grace_s=60)
        first = rc_body("revenuecat/initial_purchase.json", id="rc-evt-1", purchased_at_ms=now_ms - DAY * 1000,
                        expiration_at_ms=now_ms + week_ms, event_timestamp_ms=now_ms)
        handled(send(client, s.project_id, "revenuecat", first), "processed")
        wallet = s.wallet_of("1234567890")
        end1 = datetime.fromtimestamp((now_ms + week_ms) // 1000 + 60, UTC)
        assert [(b[1], b[3]) for b in buckets(database_url, wallet)] == [(700, end1)]
        s.debit(wallet, 100)
        renewal = rc_body("revenuecat/renewal.json", id="rc-evt-2", transaction_id="rc-tx-2",
                          original_transaction_id="123456789012345", purchased_at_ms=now_ms + week_ms,
                          expiration_at_ms=now_ms + 2 * week_ms, event_timestamp_ms=now_ms + 1)
        handled(send(client, s.project_id, "revenuecat", renewal), "processed")
        handled(send(client, s.project_id, "revenuecat", renewal), "duplicate")
        # RevenueCat re-sent the renewal under a new event id: the store transaction is credited once
        resent = rc_body("revenuecat/renewal.json", id="rc-evt-2b", transaction_id="rc-tx-2",
                         original_transaction_id="123456789012345", purchased_at_ms=now_ms + week_ms,
                         expiration_at_ms=now_ms + 2 * week_ms, event_timestamp_ms=now_ms + 2)
        handled(send(client, s.project_id, "revenuecat", resent), "ignored")
        end2 = datetime.fromtimestamp((now_ms + 2 * week_ms) // 1000 + 60, UTC)
        assert [(b[1], b[2], b[3]) for b in buckets(database_url, wallet)] == [(700, 600, end1), (700, 700, end2)]
        assert _expire(engine, end1 + timedelta(seconds=1)) == 1
        assert s.balance(wallet) == 700
        assert [(t["kind"], t["amount_minor"]) for t in s.transactions(wallet)][-1] == ("expiry", -600)


# ------------------------------------------------------------------------------------------- Lemon Squeezy


def test_lemonsqueezy_invoice_states_no_period_one_interval_from_its_creation(database_url: str, engines: Any,
                                                                             engine: Engine) -> None:
    with api_client(database_url, engines) as client:
        s = shop(client)
        s.offer("plan", slug="citrus", name="Citrus", credits_minor=3000, price_minor=999, currency="usd",
                lemonsqueezy_variant_id="1")
        handled(send(client, s.project_id, "lemonsqueezy", "lemonsqueezy/subscription_created.json"), "processed")
        paid = handled(send(client, s.project_id, "lemonsqueezy", "lemonsqueezy/subscription_payment_success.json"),
                   "processed")
        # created_at 2026-08-25T17:20:04Z + one month
        assert "states no period end" in paid["detail"] and "2026-09-25T17:20:04" in paid["detail"]
        wallet = s.wallet_of("25")
        ((_, granted, _, expires_at, _),) = buckets(database_url, wallet)
        assert (granted, expires_at) == (3000, datetime(2026, 9, 25, 17, 20, 4, tzinfo=UTC))
        assert _expire(engine, datetime(2026, 9, 25, 17, 20, 3, tzinfo=UTC)) == 0
        assert _expire(engine, datetime(2026, 9, 25, 17, 20, 5, tzinfo=UTC)) == 1
        assert s.balance(wallet) == 0
