"""Stripe webhooks against the real PostgreSQL ledger: every Stripe fixture sent byte-for-byte, signed with the
fixture secret and a fresh timestamp and verified by the real ``stripe`` library; forged, unsigned, stale and
tampered deliveries refused with nothing changed; duplicates credited once; out-of-order delivery (refund
before purchase, invoice and cancellation before checkout) ending in the in-order state; refunds and
chargebacks clawing credits back (into debt when they were spent)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from payments_testkit import (
    STRIPE_SECRET,
    VECTORS,
    Shop,
    fixture,
    handled,
    ledger_rows,
    send,
    shop,
    stripe_signature,
)
from tenancy_testkit import add_member, api_client, signup, sql

pytestmark = pytest.mark.integration

PAY = "stripe/checkout.session.completed.payment.json"
SUB = "stripe/checkout.session.completed.subscription.json"
INVOICE = "stripe/invoice.paid.json"
UPDATED = "stripe/customer.subscription.updated.json"
DELETED = "stripe/customer.subscription.deleted.json"
REFUNDED = "stripe/charge.refunded.json"
DISPUTE = "stripe/charge.dispute.created.json"
CUSTOMER = "user_42"  # client_reference_id of both checkout fixtures: a subject of the project


def _pack_shop(client: Any) -> Shop:
    s = shop(client)
    # the payment fixture names no offer: the one live pack of its price (2000 usd) is the match
    s.offer("pack", slug="starter", name="Starter", credits_minor=1000, price_minor=2000, currency="usd")
    s.offer("pack", slug="big", name="Big", credits_minor=6000, price_minor=5000, currency="usd")
    return s


def _plan_shop(client: Any) -> Shop:
    s = shop(client)
    s.offer("plan", slug="pro_monthly", name="Pro", credits_minor=5000, price_minor=2000, currency="usd",
            interval="month", stripe_price_id="price_1PgafmB7WZ01zgkW6dKueIc5")
    return s


def _bought_pack(client: Any) -> tuple[Shop, str]:
    """A pack shop whose customer bought the 1000-credit starter pack (the payment fixture); the wallet."""
    s = _pack_shop(client)
    handled(send(client, s.project_id, "stripe", PAY), "processed")
    wallet = s.wallet_of(CUSTOMER)
    assert wallet is not None
    return s, wallet


def _refund(event_id: str, refunded: int) -> bytes:
    """charge.refunded of the pack's charge (2000 paid) as another event, with the cumulative ``refunded``."""
    event = json.loads(fixture(REFUNDED))
    event["id"] = event_id
    event["data"]["object"].update(amount_refunded=refunded, refunded=refunded == 2000)
    return json.dumps(event).encode()


def test_signature_vectors_are_reproduced() -> None:
    """Our Stripe signer is Stripe's scheme: it reproduces every vector for the vector's timestamp."""
    for name, vector in VECTORS["stripe"]["vectors"].items():
        body = fixture(name)
        assert len(body) == vector["body_bytes"]
        assert stripe_signature(body, STRIPE_SECRET, vector["t"]) == vector["Stripe-Signature"], name


def test_every_stripe_fixture_is_accepted_byte_for_byte(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = _pack_shop(client)
        s.offer("plan", slug="pro_monthly", name="Pro", credits_minor=5000, price_minor=2000, currency="usd",
                interval="month", stripe_price_id="price_1PgafmB7WZ01zgkW6dKueIc5")
        expected = {PAY: "processed", SUB: "processed", INVOICE: "processed", UPDATED: "processed",
                    DELETED: "processed", REFUNDED: "processed", DISPUTE: "processed"}
        for name, status in expected.items():
            handled(send(client, s.project_id, "stripe", name), status)
        wallet = s.wallet_of(CUSTOMER)
        # pack 1000 + plan period 5000, then the pack's charge refunded AND disputed: its 1000 clawed back once
        assert s.balance(wallet) == 5000
        kinds = [(t["kind"], t["amount_minor"]) for t in s.transactions(wallet)]
        assert kinds == [("top_up", 1000), ("subscription_grant", 5000), ("adjustment", -1000)]
        (ent,) = s.entitlements(wallet)
        assert ent["status"] == "ended" and ent["plan"] == "pro_monthly" and not ent["will_renew"]
        assert ent["external_subscription_id"] == "sub_1Pgc6rB7WZ01zgkWNy0Cn5nw"
        assert ent["current_period_end"].startswith("2026-08-25")


def test_pack_purchase_duplicate_and_refund(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = _pack_shop(client)
        first = handled(send(client, s.project_id, "stripe", PAY), "processed")
        wallet = s.wallet_of(CUSTOMER)
        assert s.balance(wallet) == 1000
        (tx,) = s.transactions(wallet)
        assert tx["kind"] == "top_up"
        assert tx["source_ref"] == "stripe:cs_test_a1YS1URlnyQCN5fUUduORoQ7Pw41PJqDWkIVQCpJPqkfIhd6tVY8XB1OLY"
        assert first["transaction_ids"] == [tx["id"]]
        # redelivered (Stripe re-signs each attempt): 200, nothing changes
        for _ in range(3):
            handled(send(client, s.project_id, "stripe", PAY), "duplicate")
        assert s.balance(wallet) == 1000 and len(s.transactions(wallet)) == 1
        payments = client.get(f"{s.base}/payments", headers=s.owner.headers).json()
        assert [(p["offer"], p["amount_minor"], p["credits_minor"], p["status"]) for p in payments] == [
            ("starter", 2000, 1000, "paid")]
        # full refund: the credits go back
        handled(send(client, s.project_id, "stripe", REFUNDED), "processed")
        handled(send(client, s.project_id, "stripe", REFUNDED), "duplicate")
        assert s.balance(wallet) == 0
        assert [(t["kind"], t["amount_minor"]) for t in s.transactions(wallet)] == [("top_up", 1000),
                                                                                   ("adjustment", -1000)]
        payment = client.get(f"{s.base}/payments", headers=s.owner.headers).json()[0]
        assert payment["status"] == "refunded" and payment["clawed_back_minor"] == 1000
        statuses = [e["status"] for e in s.events()]
        assert statuses.count("duplicate") == 4 and statuses.count("processed") == 2


def test_partial_refunds_in_any_order_claw_back_proportionally(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s, wallet = _bought_pack(client)
        # cumulative amounts arrive out of order: 1500 (75%) then the older 500 (25%), then redelivery
        handled(send(client, s.project_id, "stripe", _refund("evt_refund_2", 1500)), "processed")
        assert s.balance(wallet) == 250
        handled(send(client, s.project_id, "stripe", _refund("evt_refund_1", 500)), "processed")
        assert s.balance(wallet) == 250
        handled(send(client, s.project_id, "stripe", _refund("evt_refund_2", 1500)), "duplicate")
        handled(send(client, s.project_id, "stripe", _refund("evt_refund_3", 2000)), "processed")
        assert s.balance(wallet) == 0


def test_dispute_after_spending_creates_debt(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s, wallet = _bought_pack(client)
        s.debit(wallet, 700)
        handled(send(client, s.project_id, "stripe", DISPUTE), "processed")
        r = client.get(f"{s.base}/wallets/{wallet}", headers=s.owner.headers).json()
        assert r["balance"]["balance_minor"] == -700 and r["balance"]["debt_minor"] == 700 and r["balance"]["blocked"]
        payment = client.get(f"{s.base}/payments", headers=s.owner.headers).json()[0]
        assert payment["status"] == "disputed" and payment["disputed_minor"] == 2000
        # a won dispute gives the credits back (settling the debt first)
        won = json.loads(fixture(DISPUTE))
        won["id"], won["type"] = "evt_dispute_won", "charge.dispute.closed"
        won["data"]["object"]["status"] = "won"
        handled(send(client, s.project_id, "stripe", json.dumps(won).encode()), "processed")
        assert s.balance(wallet) == 300


def _promo_expiring_soon(s: Shop, wallet: str, amount: int = 200) -> None:
    """A promo bucket that burns before the top-up in burn order (lower priority, expires in 3 days)."""
    s.grant(wallet, amount, kind="promo", expires_at=(datetime.now(UTC) + timedelta(days=3)).isoformat())


def test_a_refund_claws_back_the_top_ups_own_bucket_not_an_earlier_expiring_promo(database_url: str,
                                                                                 engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s, wallet = _bought_pack(client)
        _promo_expiring_soon(s, wallet)
        assert s.buckets(wallet) == {"promo": 200, "top_up": 1000}
        handled(send(client, s.project_id, "stripe", REFUNDED), "processed")
        assert s.last_allocations(wallet) == {"top_up": -1000}
        assert s.buckets(wallet) == {"promo": 200, "top_up": 0} and s.balance(wallet) == 200
        # redelivered, and the dispute of the same charge on top: nothing more is taken
        handled(send(client, s.project_id, "stripe", REFUNDED), "duplicate")
        handled(send(client, s.project_id, "stripe", DISPUTE), "processed")
        assert s.buckets(wallet) == {"promo": 200, "top_up": 0} and len(s.transactions(wallet)) == 3


def test_partial_refunds_take_their_share_from_the_top_ups_bucket(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s, wallet = _bought_pack(client)
        _promo_expiring_soon(s, wallet)
        handled(send(client, s.project_id, "stripe", _refund("evt_refund_1", 500)), "processed")  # 25%: 250
        assert s.last_allocations(wallet) == {"top_up": -250}
        handled(send(client, s.project_id, "stripe", _refund("evt_refund_2", 1500)), "processed")  # 75%: 500 more
        assert s.last_allocations(wallet) == {"top_up": -500}
        handled(send(client, s.project_id, "stripe", _refund("evt_refund_2", 1500)), "duplicate")
        assert s.buckets(wallet) == {"promo": 200, "top_up": 250} and s.balance(wallet) == 450
        handled(send(client, s.project_id, "stripe", _refund("evt_refund_3", 2000)), "processed")
        assert s.buckets(wallet) == {"promo": 200, "top_up": 0} and s.balance(wallet) == 200
        clawbacks = [t["amount_minor"] for t in s.transactions(wallet) if t["kind"] == "adjustment"]
        assert clawbacks == [-250, -500, -250]


def test_refunds_after_spending_take_the_rest_of_the_bucket_then_burn_order_then_debt(database_url: str,
                                                                                     engines: Any) -> None:
    """1000 bought, 700 spent, then a bonus (300) and a soon-expiring promo (200): a 75 % refund claws back 750 —
    the top-up's 300, the promo, 250 of the bonus —, the full refund the last 250: the bonus's 50, then debt."""
    with api_client(database_url, engines) as client:
        s, wallet = _bought_pack(client)
        s.debit(wallet, 700)
        s.grant(wallet, 300, kind="bonus")
        _promo_expiring_soon(s, wallet)
        handled(send(client, s.project_id, "stripe", _refund("evt_refund_75", 1500)), "processed")
        assert s.last_allocations(wallet) == {"top_up": -300, "promo": -200, "bonus": -250}
        assert s.buckets(wallet) == {"promo": 0, "bonus": 50, "top_up": 0}
        handled(send(client, s.project_id, "stripe", REFUNDED), "processed")
        handled(send(client, s.project_id, "stripe", REFUNDED), "duplicate")
        assert s.last_allocations(wallet) == {"bonus": -50, None: -200}
        r = client.get(f"{s.base}/wallets/{wallet}", headers=s.owner.headers).json()["balance"]
        assert (r["balance_minor"], r["debt_minor"], r["blocked"]) == (-200, 200, True)
        assert [t["amount_minor"] for t in s.transactions(wallet) if t["kind"] == "adjustment"] == [-750, -250]


def test_refund_before_purchase_is_deferred_then_applied(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        in_order = _pack_shop(client)
        for name in (PAY, REFUNDED):
            handled(send(client, in_order.project_id, "stripe", name), "processed")
        reordered = _pack_shop(client)
        deferred = handled(send(client, reordered.project_id, "stripe", REFUNDED), "deferred")
        assert "pi_1PgafyB7WZ01zgkWSjxsAJo3" in deferred["detail"]
        assert reordered.wallet_of(CUSTOMER) is None
        handled(send(client, reordered.project_id, "stripe", REFUNDED), "duplicate")  # a retry of a deferred event
        handled(send(client, reordered.project_id, "stripe", PAY), "processed")
        wallet = reordered.wallet_of(CUSTOMER)
        assert reordered.balance(wallet) == 0
        assert [(t["kind"], t["amount_minor"]) for t in reordered.transactions(wallet)] == [
            ("top_up", 1000), ("adjustment", -1000)]
        assert [e["status"] for e in reordered.events(status="deferred")] == []
        strip = [(k, a, r) for _, k, a, r in ledger_rows(database_url, in_order.project_id)]
        assert strip == [(k, a, r) for _, k, a, r in ledger_rows(database_url, reordered.project_id)]


def _subscription_state(s: Shop) -> tuple[int, list[tuple[str, int]], dict[str, Any]]:
    wallet = s.wallet_of(CUSTOMER)
    (ent,) = s.entitlements(wallet)
    keep = ("status", "will_renew", "plan", "current_period_start", "current_period_end", "ended_at",
            "external_customer_id")
    return (s.balance(wallet), [(t["kind"], t["amount_minor"]) for t in s.transactions(wallet)],
            {k: ent[k] for k in keep})


def test_subscription_lifecycle_in_order(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = _plan_shop(client)
        handled(send(client, s.project_id, "stripe", SUB), "processed")
        wallet = s.wallet_of(CUSTOMER)
        (ent,) = s.entitlements(wallet)
        assert ent["status"] == "active" and s.balance(wallet) == 0  # credits come with the paid invoice
        handled(send(client, s.project_id, "stripe", INVOICE), "processed")
        handled(send(client, s.project_id, "stripe", INVOICE), "duplicate")
        assert s.balance(wallet) == 5000
        (tx,) = s.transactions(wallet)
        assert tx["kind"] == "subscription_grant" and tx["source_ref"] == "stripe:in_1Pgc6tB7WZ01zgkWu9fdqL6I"
        handled(send(client, s.project_id, "stripe", UPDATED), "processed")
        (ent,) = s.entitlements(wallet)
        assert ent["status"] == "cancelled" and ent["will_renew"] is False
        handled(send(client, s.project_id, "stripe", DELETED), "processed")
        (ent,) = s.entitlements(wallet)
        assert ent["status"] == "ended" and ent["active"] is False and ent["ended_at"].startswith("2026-08-25")
        r = client.get(f"{s.base}/wallets/{wallet}/entitlements", params={"active": True}, headers=s.owner.headers)
        assert r.status_code == 200 and r.json() == []
        # a later paid invoice for a period after the end grants nothing
        late = json.loads(fixture(INVOICE))
        late["id"] = "evt_late_invoice"
        late["data"]["object"]["id"] = "in_after_end"
        for line in late["data"]["object"]["lines"]["data"]:
            line["period"] = {"start": 1787678400, "end": 1790000000}
        handled(send(client, s.project_id, "stripe", json.dumps(late).encode()), "ignored")
        assert s.balance(wallet) == 5000


def test_subscription_events_out_of_order_end_in_the_same_state(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        in_order = _plan_shop(client)
        for name in (SUB, INVOICE, UPDATED, DELETED):
            handled(send(client, in_order.project_id, "stripe", name), "processed")
        reordered = _plan_shop(client)
        for name in (DELETED, INVOICE, UPDATED):
            handled(send(client, reordered.project_id, "stripe", name), "deferred")
        handled(send(client, reordered.project_id, "stripe", SUB), "processed")
        assert _subscription_state(reordered) == _subscription_state(in_order)
        assert _subscription_state(reordered)[0] == 5000
        assert {e["status"] for e in reordered.events()} == {"processed"}
        # and the stale "cancel at period end" arriving after the deletion changes nothing
        third = _plan_shop(client)
        for name in (SUB, DELETED, INVOICE, UPDATED):
            handled(send(client, third.project_id, "stripe", name), "processed")
        assert _subscription_state(third) == _subscription_state(in_order)


def _problem(r: Any) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    return body


def test_forged_unsigned_stale_and_tampered_deliveries_change_nothing(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = _pack_shop(client)
        body = fixture(PAY)
        post = f"/api/v1/webhooks/stripe/{s.project_id}"
        forged = client.post(post, content=body, headers={"Stripe-Signature": stripe_signature(body, "whsec_wrong")})
        assert _problem(forged)["code"] == "api.webhook_signature_invalid"
        assert _problem(client.post(post, content=body))["code"] == "api.webhook_signature_invalid"
        stale = VECTORS["stripe"]["vectors"][PAY]["Stripe-Signature"]  # right secret, t beyond the tolerance
        assert "timestamp" in _problem(client.post(post, content=body, headers={"Stripe-Signature": stale}))[
            "detail"].lower()
        tampered = body.replace(b'"amount_total": 2000', b'"amount_total": 5000')
        assert tampered != body
        _problem(client.post(post, content=tampered, headers={"Stripe-Signature": stripe_signature(body)}))
        garbage = b"not json"
        assert _problem(client.post(post, content=garbage, headers={"Stripe-Signature": stripe_signature(garbage)}))[
            "code"] == "api.webhook_malformed"
        # another project's secret does not open this project
        other = shop(client, secrets={"stripe": "whsec_other_project_secret"})
        _problem(send(client, other.project_id, "stripe", PAY))
        # a project without a secret refuses everything; an unknown project too
        bare = shop(client, secrets={})
        _problem(send(client, bare.project_id, "stripe", PAY))
        _problem(send(client, "prj_does_not_exist", "stripe", PAY))
        assert sql(database_url, "SELECT count(*) FROM transactions")[0][0] == 0
        assert sql(database_url, "SELECT count(*) FROM payments")[0][0] == 0
        assert s.wallet_of(CUSTOMER) is None
        rejected = s.events(status="rejected")
        assert len(rejected) == 5 and all(e["error"] for e in rejected)
        # the genuine delivery still works afterwards
        handled(send(client, s.project_id, "stripe", PAY), "processed")
        assert s.balance(s.wallet_of(CUSTOMER)) == 1000


def test_concurrent_redeliveries_over_real_http_credit_once(database_url: str, engines: Any) -> None:
    """Ten simultaneous deliveries of a purchase and its refund (uvicorn, threads): one grant, one clawback."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from tenancy_testkit import live_server

    with api_client(database_url, engines) as client:
        s = _pack_shop(client)
    with live_server(database_url, engines) as base:
        bodies = [fixture(PAY)] * 5 + [fixture(REFUNDED)] * 5
        random.Random(7).shuffle(bodies)

        def deliver(body: bytes) -> str:
            with httpx.Client(base_url=base, timeout=30) as http:
                r = http.post(f"/api/v1/webhooks/stripe/{s.project_id}", content=body,
                              headers={"Stripe-Signature": stripe_signature(body)})
                assert r.status_code == 200, r.text
                return str(r.json()["status"])

        with ThreadPoolExecutor(10) as pool:
            statuses = list(pool.map(deliver, bodies))
    assert statuses.count("duplicate") == 8 and statuses.count("deferred") + statuses.count("processed") == 2
    rows = sql(database_url, "SELECT kind, amount_minor FROM transactions WHERE project_id = %s ORDER BY id",
               s.project_id)
    assert sorted(rows) == [("adjustment", -1000), ("top_up", 1000)]
    assert sql(database_url, "SELECT balance_minor FROM wallets WHERE project_id = %s", s.project_id) == [(0,)]


def test_unmatched_purchase_is_replayed_after_the_pack_exists(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = shop(client)
        unmatched = handled(send(client, s.project_id, "stripe", PAY), "unmatched")
        assert "no pack" in unmatched["detail"]
        handled(send(client, s.project_id, "stripe", PAY), "duplicate")
        s.offer("pack", slug="starter", name="Starter", credits_minor=1000, price_minor=2000, currency="usd")
        replay = f"{s.base}/webhook-events/{unmatched['webhook_event_id']}/replay"
        member = signup(client, "member")
        add_member(client, s.project_id, s.owner, member, "member")
        assert client.post(replay, headers=member.headers).status_code == 403
        r = client.post(replay, headers=s.owner.headers)
        assert r.status_code == 200 and r.json()["status"] == "processed", r.text
        assert s.balance(s.wallet_of(CUSTOMER)) == 1000
        assert client.post(replay, headers=s.owner.headers).status_code == 404  # settled: nothing to replay
        raw = client.get(f"{s.base}/webhook-events/{unmatched['webhook_event_id']}/body", headers=s.owner.headers)
        assert raw.content == fixture(PAY)
        assert sql(database_url, "SELECT count(*) FROM audit_log WHERE action = 'webhook_event.replay'")[0][0] == 1
