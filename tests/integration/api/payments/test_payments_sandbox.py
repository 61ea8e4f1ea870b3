"""Sandbox purchases: RevenueCat events with ``environment: SANDBOX`` and Lemon Squeezy events with
``meta.test_mode: true`` grant nothing (no credits, no entitlement) unless the project's provider config has
``accept_sandbox``; they are stored and answered ``ignored`` with how to accept them, and can be replayed once
accepted. The fixtures are modified in the test and sent signed / authorized for real."""

from __future__ import annotations

import json
from typing import Any

import pytest
from payments_testkit import LS_SECRET, SECRETS, fixture, handled, rc_body, send, shop
from tenancy_testkit import api_client, sql

pytestmark = pytest.mark.integration


def _provider(client: Any, s: Any, provider: str, body: dict[str, Any] | None = None) -> Any:
    if body is None:
        return client.get(f"{s.base}/payment-providers/{provider}", headers=s.owner.headers)
    return client.put(f"{s.base}/payment-providers/{provider}", json=body, headers=s.owner.headers)


def test_revenuecat_sandbox_is_ignored_until_accepted(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = shop(client)
        s.offer("plan", slug="weekly", name="Weekly", credits_minor=700, price_minor=499, currency="usd",
                interval="week", revenuecat_product_id="com.subscription.weekly", credits_expire="never")
        sandbox = rc_body("revenuecat/initial_purchase.json", id="rc-sandbox-1", environment="SANDBOX")
        ignored = handled(send(client, s.project_id, "revenuecat", sandbox), "ignored")
        assert "SANDBOX" in ignored["detail"] and '"accept_sandbox": true' in ignored["detail"]
        assert f"/webhook-events/{ignored['webhook_event_id']}/replay" in ignored["detail"]
        assert s.wallet_of("1234567890") is None and s.entitlements() == []
        assert sql(database_url, "SELECT count(*) FROM transactions")[0][0] == 0
        handled(send(client, s.project_id, "revenuecat", sandbox), "duplicate")
        # production events of the same project are credited as before
        live = rc_body("revenuecat/initial_purchase.json", id="rc-live-1", transaction_id="rc-live-tx",
                       original_transaction_id="rc-live-sub")
        handled(send(client, s.project_id, "revenuecat", live), "processed")
        assert s.balance(s.wallet_of("1234567890")) == 700

        # accept sandbox purchases (the secret stays as it was and is never returned)
        r = _provider(client, s, "revenuecat", {"accept_sandbox": True})
        assert r.status_code == 200, r.text
        assert r.json()["accept_sandbox"] is True and r.json()["webhook_secret_set"] is True
        assert SECRETS["revenuecat"] not in r.text
        got = _provider(client, s, "revenuecat")
        assert got.json()["accept_sandbox"] is True and SECRETS["revenuecat"] not in got.text
        replay = client.post(f"{s.base}/webhook-events/{ignored['webhook_event_id']}/replay",
                             headers=s.owner.headers)
        assert replay.status_code == 200 and replay.json()["status"] == "processed", replay.text
        assert s.balance(s.wallet_of("1234567890")) == 1400
        assert client.post(f"{s.base}/webhook-events/{ignored['webhook_event_id']}/replay",
                           headers=s.owner.headers).status_code == 404  # settled
        # the old secret still authorizes; new sandbox events are credited at once
        renewal = rc_body("revenuecat/renewal.json", id="rc-sandbox-2", environment="SANDBOX",
                          transaction_id="rc-sandbox-tx-2")
        handled(send(client, s.project_id, "revenuecat", renewal), "processed")
        assert s.balance(s.wallet_of("1234567890")) == 2100
        # and switching it off again stops them
        assert _provider(client, s, "revenuecat", {"accept_sandbox": False}).json()["accept_sandbox"] is False
        third = rc_body("revenuecat/renewal.json", id="rc-sandbox-3", environment="SANDBOX",
                        transaction_id="rc-sandbox-tx-3")
        handled(send(client, s.project_id, "revenuecat", third), "ignored")
        assert s.balance(s.wallet_of("1234567890")) == 2100
        audit = sql(database_url, "SELECT after::text FROM audit_log WHERE action = 'payment_provider.put'")
        assert all(SECRETS["revenuecat"] not in row[0] for row in audit)


def _ls(name: str, *, meta_test_mode: bool | None = None, attr_test_mode: bool | None = None,
        variant_id: int | None = None) -> bytes:
    payload = json.loads(fixture(name))
    if variant_id is not None:
        payload["data"]["attributes"]["variant_id"] = variant_id
    if meta_test_mode is not None:
        payload["meta"]["test_mode"] = meta_test_mode
    if attr_test_mode is not None:
        payload["data"]["attributes"]["test_mode"] = attr_test_mode
    return json.dumps(payload, indent=2).encode()


def test_lemonsqueezy_test_mode_is_ignored_until_accepted(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = shop(client)
        s.offer("pack", slug="tokens", name="Tokens", credits_minor=1500, price_minor=1859, currency="eur",
                lemonsqueezy_variant_id="1")
        s.offer("plan", slug="citrus", name="Citrus", credits_minor=3000, price_minor=999, currency="usd",
                lemonsqueezy_variant_id="2")
        order = _ls("lemonsqueezy/order_created.json", meta_test_mode=True)  # signed for real by send()
        ignored = handled(send(client, s.project_id, "lemonsqueezy", order), "ignored")
        assert "test-mode" in ignored["detail"] and "accept_sandbox" in ignored["detail"]
        sub = _ls("lemonsqueezy/subscription_created.json", meta_test_mode=True, variant_id=2)
        handled(send(client, s.project_id, "lemonsqueezy", sub), "ignored")
        paid = _ls("lemonsqueezy/subscription_payment_success.json", attr_test_mode=True)
        handled(send(client, s.project_id, "lemonsqueezy", paid), "ignored")  # the attribute alone also counts
        assert s.wallet_of("25") is None and s.entitlements() == []
        # a live order still works
        live = _ls("lemonsqueezy/order_created.json", meta_test_mode=False)
        assert live != order
        with_id = json.loads(live)
        with_id["data"]["id"] = "2"
        handled(send(client, s.project_id, "lemonsqueezy", json.dumps(with_id).encode()), "processed")
        assert s.balance(s.wallet_of("25")) == 1500
        # a new secret and acceptance in one PUT
        r = _provider(client, s, "lemonsqueezy", {"webhook_secret": LS_SECRET, "accept_sandbox": True})
        assert r.status_code == 200 and r.json()["accept_sandbox"] is True and LS_SECRET not in r.text
        order2 = json.loads(order)
        order2["data"]["id"] = "3"
        handled(send(client, s.project_id, "lemonsqueezy", json.dumps(order2).encode()), "processed")
        assert s.balance(s.wallet_of("25")) == 3000
        # the ignored subscription and its payment are replayed in order: entitlement, then the period's credits
        events = {e["event_type"]: e for e in s.events(status="ignored")}
        for kind in ("subscription_created", "subscription_payment_success", "order_created"):
            r = client.post(f"{s.base}/webhook-events/{events[kind]['id']}/replay", headers=s.owner.headers)
            assert r.status_code == 200 and r.json()["status"] == "processed", r.text
        assert s.balance(s.wallet_of("25")) == 7500
        (ent,) = s.entitlements()
        assert ent["plan"] == "citrus"


def test_provider_config_validation(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = shop(client, secrets={"stripe": SECRETS["stripe"]})
        r = _provider(client, s, "stripe", {"accept_sandbox": True})
        assert r.status_code == 422 and "test mode" in r.json()["detail"]
        assert _provider(client, s, "stripe").json()["accept_sandbox"] is None
        # no settings yet: the secret is needed first
        r = _provider(client, s, "revenuecat", {"accept_sandbox": True})
        assert r.status_code == 422 and "webhook_secret is required" in r.json()["detail"]
        got = _provider(client, s, "revenuecat").json()
        assert got["accept_sandbox"] is False and got["webhook_secret_set"] is False
        # a non-sandbox ignored event cannot be replayed
        s.offer("plan", slug="weekly", name="Weekly", credits_minor=700, price_minor=499, currency="usd",
                revenuecat_product_id="com.subscription.weekly")
        r = _provider(client, s, "revenuecat", {"webhook_secret": SECRETS["revenuecat"]})
        assert r.status_code == 200 and r.json()["accept_sandbox"] is False
        ignored = handled(send(client, s.project_id, "revenuecat", "revenuecat/product_change.json"), "ignored")
        assert client.post(f"{s.base}/webhook-events/{ignored['webhook_event_id']}/replay",
                           headers=s.owner.headers).status_code == 404
