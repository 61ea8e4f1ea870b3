"""The offer catalog (credit packs, plans) and Stripe Checkout through the real ``stripe`` library against a
fake of Stripe's HTTP API on 127.0.0.1: what is sent (metadata naming project, wallet and offer; the
idempotency key; price data or the Stripe price), retries with one Idempotency-Key giving one session, roles,
archived and unknown offers, and the webhook of a Meterline-created session crediting the stored wallet."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from payments_testkit import fake_stripe, fixture, send, shop
from tenancy_testkit import add_member, api_client, signup, sql

pytestmark = pytest.mark.integration

STRIPE_KEY = "sk_test_meterline_fake_0001"
URLS = {"success_url": "https://app.example.com/paid", "cancel_url": "https://app.example.com/cancel"}


def test_catalog_roles_conflicts_archive_and_audit(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = shop(client)
        member, viewer = signup(client, "member"), signup(client, "viewer")
        add_member(client, s.project_id, s.owner, member, "member")
        add_member(client, s.project_id, s.owner, viewer, "viewer")
        pack = {"slug": "starter", "name": "Starter", "credits_minor": 1000, "price_minor": 1000, "currency": "USD"}
        r = client.post(f"{s.base}/credit-packs", json=pack, headers=member.headers)
        assert r.status_code == 403
        created = s.offer("pack", **pack)
        assert created["kind"] == "pack" and created["currency"] == "usd" and created["interval"] is None
        r = client.post(f"{s.base}/credit-packs", json=pack, headers=s.owner.headers)
        assert r.status_code == 409 and r.json()["code"] == "api.offer_conflict"
        plan = s.offer("plan", slug="pro_monthly", name="Pro", credits_minor=5000, price_minor=2000, currency="usd",
                       interval="month", revenuecat_product_id="pro.monthly")
        assert plan["interval"] == "month" and plan["interval_count"] == 1
        r = client.post(f"{s.base}/plans", json={"slug": "pro2", "name": "Pro", "credits_minor": 1, "price_minor": 1,
                                                 "currency": "usd", "revenuecat_product_id": "pro.monthly"},
                        headers=s.owner.headers)
        assert r.status_code == 409  # one live offer per provider product id
        bad = client.post(f"{s.base}/credit-packs", json={**pack, "slug": "x", "price_minor": 10.5},
                          headers=s.owner.headers)
        assert bad.status_code == 422
        listed = client.get(f"{s.base}/credit-packs", headers=viewer.headers).json()
        assert [o["slug"] for o in listed] == ["starter"]
        assert [o["slug"] for o in client.get(f"{s.base}/plans", headers=viewer.headers).json()] == ["pro_monthly"]
        r = client.post(f"{s.base}/credit-packs/starter/archive", headers=s.owner.headers)
        assert r.status_code == 200 and r.json()["archived_at"]
        assert client.get(f"{s.base}/credit-packs", headers=viewer.headers).json() == []
        assert len(client.get(f"{s.base}/credit-packs", params={"include_archived": True},
                              headers=viewer.headers).json()) == 1
        assert client.post(f"{s.base}/plans/starter/archive", headers=s.owner.headers).status_code == 404
        # provider secrets: admin only, never echoed, audited without the secret
        assert client.get(f"{s.base}/payment-providers/stripe", headers=member.headers).status_code == 403
        cfg = client.get(f"{s.base}/payment-providers/stripe", headers=s.owner.headers).json()
        assert cfg["webhook_secret_set"] and cfg["webhook_url"].endswith(f"/api/v1/webhooks/stripe/{s.project_id}")
        actions = [a for (a,) in sql(database_url, "SELECT action FROM audit_log WHERE project_id = %s ORDER BY id",
                                     s.project_id)]
        assert actions.count("payment_provider.put") == 3
        assert {"pack.create", "plan.create", "pack.archive"} <= set(actions)
        audited = sql(database_url, "SELECT after::text FROM audit_log WHERE action = 'payment_provider.put'")
        assert all("fixture_secret" not in a and "rc_fixture" not in a for (a,) in audited)


def test_checkout_session_sent_to_stripe_and_credited_by_its_webhook(database_url: str, engines: Any) -> None:
    with fake_stripe() as stripe_api, api_client(database_url, engines, stripe_secret_key=STRIPE_KEY,
                                                 stripe_api_base=stripe_api.base_url) as client:
        s = shop(client)
        member, viewer = signup(client, "member"), signup(client, "viewer")
        add_member(client, s.project_id, s.owner, member, "member")
        add_member(client, s.project_id, s.owner, viewer, "viewer")
        s.offer("pack", slug="starter", name="Starter pack", credits_minor=1000, price_minor=1000, currency="usd")
        wallet = client.post(f"{s.base}/wallets", json={"owner_kind": "subject", "owner_ref": "cust-9"},
                             headers=s.owner.headers).json()["id"]
        body = {"wallet_id": wallet, "offer": "starter", **URLS}
        url = f"{s.base}/checkout/sessions"
        assert client.post(url, json=body, headers={**member.headers}).status_code == 400  # no Idempotency-Key
        assert client.post(url, json=body, headers={**viewer.headers, "Idempotency-Key": "k1"}).status_code == 403
        r = client.post(url, json=body, headers={**member.headers, "Idempotency-Key": "k1"})
        assert r.status_code == 201, r.text
        session = r.json()
        assert session["mode"] == "payment" and session["url"].startswith("https://checkout.stripe.test/")
        (sent,) = stripe_api.requests
        assert sent["path"] == "/v1/checkout/sessions"
        assert sent["headers"]["authorization"] == f"Bearer {STRIPE_KEY}"
        assert sent["headers"]["idempotency-key"] == f"meterline:{s.project_id}:k1"
        form = sent["form"]
        for prefix in ("metadata", "payment_intent_data[metadata]"):
            assert form[f"{prefix}[meterline_project_id]"] == s.project_id
            assert form[f"{prefix}[meterline_wallet_id]"] == wallet
            assert form[f"{prefix}[meterline_offer]"] == "starter"
        assert form["mode"] == "payment" and form["client_reference_id"] == wallet
        assert form["line_items[0][price_data][unit_amount]"] == "1000"
        assert form["line_items[0][price_data][currency]"] == "usd"
        assert form["line_items[0][price_data][product_data][name]"] == "Starter pack"
        assert form["success_url"] == URLS["success_url"]
        # the same key again: Stripe answers the same session; one stored row
        again = client.post(url, json=body, headers={**member.headers, "Idempotency-Key": "k1"})
        assert again.status_code == 201 and again.json()["id"] == session["id"]
        assert stripe_api.requests[-1]["headers"]["idempotency-key"] == f"meterline:{s.project_id}:k1"
        other = client.post(url, json={**body, "success_url": "https://elsewhere.example.com/"},
                            headers={**member.headers, "Idempotency-Key": "k1"})
        assert other.status_code == 409 and other.json()["code"] == "api.idempotency_conflict"
        assert sql(database_url, "SELECT count(*) FROM checkout_sessions")[0][0] == 1
        # unknown offer / foreign wallet: 404 before anything is sent to Stripe
        sent_before = len(stripe_api.requests)
        assert client.post(url, json={**body, "offer": "nope"},
                           headers={**member.headers, "Idempotency-Key": "k2"}).status_code == 404
        assert client.post(url, json={**body, "wallet_id": "w_nope"},
                           headers={**member.headers, "Idempotency-Key": "k3"}).status_code == 404
        assert len(stripe_api.requests) == sent_before

        # Stripe completes the session: an event naming only the session id credits the stored wallet
        event = json.loads(fixture("stripe/checkout.session.completed.payment.json"))
        event["id"], event["created"] = "evt_meterline_checkout", int(time.time())
        obj = event["data"]["object"]
        obj.update(id=session["id"], amount_total=1000, client_reference_id=None, metadata={})
        r = send(client, s.project_id, "stripe", json.dumps(event).encode())
        assert r.status_code == 200 and r.json()["status"] == "processed", r.text
        assert s.balance(wallet) == 1000
        (tx,) = s.transactions(wallet)
        assert tx["kind"] == "top_up" and tx["source_ref"] == f"stripe:{session['id']}"
        assert sql(database_url, "SELECT completed_at IS NOT NULL FROM checkout_sessions")[0][0] is True

        # archived packs are not sold any more
        client.post(f"{s.base}/credit-packs/starter/archive", headers=s.owner.headers)
        r = client.post(url, json=body, headers={**member.headers, "Idempotency-Key": "k4"})
        assert r.status_code == 409 and r.json()["code"] == "api.offer_conflict"


def test_plan_checkout_sends_a_subscription(database_url: str, engines: Any) -> None:
    with fake_stripe() as stripe_api, api_client(database_url, engines, stripe_secret_key=STRIPE_KEY,
                                                 stripe_api_base=stripe_api.base_url) as client:
        s = shop(client)
        s.offer("plan", slug="pro_monthly", name="Pro", credits_minor=5000, price_minor=2000, currency="usd",
                interval="month", stripe_price_id="price_1PgafmB7WZ01zgkW6dKueIc5")
        s.offer("plan", slug="team_quarterly", name="Team", credits_minor=20000, price_minor=9000, currency="eur",
                interval="month", interval_count=3)
        wallet = client.post(f"{s.base}/wallets", json={"owner_kind": "project"}, headers=s.owner.headers).json()["id"]
        url = f"{s.base}/checkout/sessions"
        r = client.post(url, json={"wallet_id": wallet, "offer": "pro_monthly", **URLS},
                        headers={**s.owner.headers, "Idempotency-Key": "sub-1"})
        assert r.status_code == 201 and r.json()["mode"] == "subscription", r.text
        form = stripe_api.requests[-1]["form"]
        assert form["mode"] == "subscription" and form["line_items[0][price]"] == "price_1PgafmB7WZ01zgkW6dKueIc5"
        assert form["subscription_data[metadata][meterline_wallet_id]"] == wallet
        assert form["subscription_data[metadata][meterline_offer]"] == "pro_monthly"
        r = client.post(url, json={"wallet_id": wallet, "offer": "team_quarterly", **URLS},
                        headers={**s.owner.headers, "Idempotency-Key": "sub-2"})
        assert r.status_code == 201
        form = stripe_api.requests[-1]["form"]
        assert form["line_items[0][price_data][recurring][interval]"] == "month"
        assert form["line_items[0][price_data][recurring][interval_count]"] == "3"
        assert form["line_items[0][price_data][currency]"] == "eur"


def test_checkout_without_a_stripe_key_is_503(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:  # the placeholder key counts as none
        s = shop(client)
        s.offer("pack", slug="starter", name="Starter", credits_minor=1000, price_minor=1000, currency="usd")
        wallet = client.post(f"{s.base}/wallets", json={"owner_kind": "project"}, headers=s.owner.headers).json()["id"]
        r = client.post(f"{s.base}/checkout/sessions", json={"wallet_id": wallet, "offer": "starter", **URLS},
                        headers={**s.owner.headers, "Idempotency-Key": "k"})
        assert r.status_code == 503 and r.json()["code"] == "api.stripe_not_configured"
