"""Dunning: a past_due subscription keeps access for ``API_DUNNING_GRACE_S``, then the scheduler's
``expire_past_due`` job expires it; the provider's recovery event reopens it; every status change is listed by
GET /entitlement-events; the recovered payment's credits are granted once, however many events announce it."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from payments_testkit import Shop, handled, rc_body, send, shop
from tenancy_testkit import api_client, scheduler_round, sql

from api.payments.dunning import DunningSettings
from meterline.scheduler import dunning_jobs

pytestmark = pytest.mark.integration

USER = "dunning-user"
PRODUCT = "com.subscription.weekly"
HOUR_MS = 3600 * 1000
GRACE_S = 2 * 24 * 3600


def _rc(name: str, event_id: str, at: datetime, **fields: Any) -> bytes:
    ms = int(at.timestamp() * 1000)
    return rc_body(name, id=event_id, app_user_id=USER, product_id=PRODUCT, original_transaction_id="T1",
                   event_timestamp_ms=ms, environment="PRODUCTION", **fields)


def _events(s: Shop, client: Any) -> list[tuple[str | None, str]]:
    r = client.get(f"{s.base}/entitlement-events", headers=s.owner.headers)
    assert r.status_code == 200, r.text
    return [(e["from_status"], e["to_status"]) for e in reversed(r.json())]


def _expire(database_url: str, now: datetime) -> int:
    return scheduler_round(database_url, dunning_jobs(DunningSettings(dunning_grace_s=GRACE_S)),
                           now=now)["expire_past_due"]


def test_past_due_keeps_access_for_the_grace_then_expires_and_recovery_grants_once(database_url: str,
                                                                                     engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = shop(client)
        s.offer("plan", slug="weekly", name="Weekly", credits_minor=700, price_minor=499, currency="usd",
                interval="week", revenuecat_product_id=PRODUCT)
        now = sql(database_url, "SELECT now()")[0][0]
        start = now - timedelta(days=1)
        ms = int(start.timestamp() * 1000)
        handled(send(client, s.project_id, "revenuecat", _rc(
            "revenuecat/initial_purchase.json", "evt-init", start, transaction_id="T1", period_type="NORMAL",
            purchased_at_ms=ms, expiration_at_ms=ms + 7 * 24 * HOUR_MS, price=4.99)), "processed")
        wallet = s.wallet_of(USER)
        assert s.balance(wallet) == 700
        handled(send(client, s.project_id, "revenuecat", _rc(
            "revenuecat/billing_issue.json", "evt-bill", now - timedelta(hours=1), transaction_id="T1")), "processed")
        (ent,) = s.entitlements(wallet)
        assert (ent["status"], ent["active"]) == ("past_due", True)  # the grace period: access kept
        assert _expire(database_url, now + timedelta(days=1)) == 0
        assert s.entitlements(wallet)[0]["status"] == "past_due"
        assert _expire(database_url, now + timedelta(days=2)) == 1
        (ent,) = s.entitlements(wallet)
        assert (ent["status"], ent["active"], ent["will_renew"]) == ("expired", False, False)
        assert _expire(database_url, now + timedelta(days=3)) == 0  # once
        assert _events(s, client) == [(None, "active"), ("active", "past_due"), ("past_due", "expired")]

        # the payment recovers: the renewal reopens the plan and grants ITS period once, even announced twice
        renewed = now + timedelta(days=2, hours=1)
        rms = int(renewed.timestamp() * 1000)
        for event_id in ("evt-renew", "evt-renew-again"):
            send_at = _rc("revenuecat/renewal.json", event_id, renewed, transaction_id="T2", period_type="NORMAL",
                          purchased_at_ms=rms, expiration_at_ms=rms + 7 * 24 * HOUR_MS, price=4.99)
            assert send(client, s.project_id, "revenuecat", send_at).status_code == 200
        (ent,) = s.entitlements(wallet)
        assert (ent["status"], ent["active"]) == ("active", True)
        assert s.balance(wallet) == 1400
        assert [t["kind"] for t in s.transactions(wallet)] == ["subscription_grant", "subscription_grant"]
        assert _events(s, client)[-1] == ("expired", "active")
