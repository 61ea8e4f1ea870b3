"""Payment lifecycle across providers: a full refund or a dispute ends the entitlement the payment paid for
(Stripe, Lemon Squeezy — as RevenueCat's refund already did), every payment of a multi-payment Stripe invoice is
linked so a refund of a later payment is matched, a $0 invoice's payment resolves as "nothing to claw back"
instead of waiting forever, and a purchase for a wallet closed by an account erasure request is HELD (visible,
replayable after the erasure is cancelled, or dismissed)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from payments_testkit import Shop, fixture, handled, send, shop, stripe_invoice
from tenancy_testkit import api_client

pytestmark = pytest.mark.integration

SUB = "stripe/checkout.session.completed.subscription.json"
PAY = "stripe/checkout.session.completed.payment.json"
PRICE = "price_1PgafmB7WZ01zgkW6dKueIc5"
CUSTOMER = "user_42"
DAY = 86400
NOW = int(datetime.now(UTC).timestamp())
START, END = NOW - DAY, NOW + 29 * DAY
LS_CUSTOMER = "25"


def _stripe_plan(client: Any) -> Shop:
    s = shop(client)
    s.offer("plan", slug="pro_monthly", name="Pro", credits_minor=5000, price_minor=2000, currency="usd",
            interval="month", stripe_price_id=PRICE)
    return s


def _refund(event_id: str, refunded: int, payment_intent: str, charge: str) -> bytes:
    event = json.loads(fixture("stripe/charge.refunded.json"))
    event["id"] = event_id
    event["data"]["object"].update(id=charge, payment_intent=payment_intent, amount_refunded=refunded)
    return json.dumps(event).encode()


def _dispute(event_id: str, payment_intent: str, charge: str, amount: int = 2000) -> bytes:
    event = json.loads(fixture("stripe/charge.dispute.created.json"))
    event["id"] = event_id
    event["data"]["object"].update(charge=charge, payment_intent=payment_intent, amount=amount)
    return json.dumps(event).encode()


def _invoice_payment(event_id: str, invoice_id: str, payment_intent: str, amount: int) -> bytes:
    event = json.loads(fixture("stripe/invoice.paid.json"))
    event["id"], event["type"] = event_id, "invoice_payment.paid"
    event["data"] = {"object": {"id": f"inpay_{event_id}", "object": "invoice_payment", "amount_paid": amount,
                                "amount_requested": amount, "created": START, "currency": "usd",
                                "invoice": invoice_id, "is_default": False, "livemode": False,
                                "payment": {"type": "payment_intent", "payment_intent": payment_intent},
                                "status": "paid", "status_transitions": {"canceled_at": None, "paid_at": START}}}
    return json.dumps(event).encode()


def _subscribed(client: Any, *, payment_intent: str = "pi_life_1") -> tuple[Shop, str]:
    s = _stripe_plan(client)
    handled(send(client, s.project_id, "stripe", SUB), "processed")
    handled(send(client, s.project_id, "stripe", stripe_invoice("evt_inv1", "in_life1", START, END,
                                                              payment_intent=payment_intent)), "processed")
    wallet = s.wallet_of(CUSTOMER)
    assert wallet is not None and s.balance(wallet) == 5000
    (ent,) = s.entitlements(wallet)
    assert ent["active"] is True
    return s, wallet


# ------------------------------------------------------------------------- 1. refunds end access everywhere


def test_a_full_stripe_refund_ends_the_entitlement_a_partial_one_does_not(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s, wallet = _subscribed(client)
        handled(send(client, s.project_id, "stripe", _refund("evt_r1", 500, "pi_life_1", "ch_life_1")), "processed")
        (ent,) = s.entitlements(wallet)
        assert (ent["status"], ent["active"]) == ("active", True)  # a partial refund: the plan stays
        handled(send(client, s.project_id, "stripe", _refund("evt_r2", 2000, "pi_life_1", "ch_life_1")), "processed")
        (ent,) = s.entitlements(wallet)
        assert (ent["status"], ent["active"], ent["will_renew"]) == ("ended", False, False)
        assert s.balance(wallet) == 0


def test_a_stripe_dispute_ends_the_entitlement(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s, wallet = _subscribed(client)
        body = handled(send(client, s.project_id, "stripe", _dispute("evt_d1", "pi_life_1", "ch_life_1")),
                       "processed")
        assert "access ended" in body["detail"]
        (ent,) = s.entitlements(wallet)
        assert (ent["status"], ent["active"]) == ("ended", False)


def test_a_lemonsqueezy_subscription_refund_ends_the_entitlement(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = shop(client)
        s.offer("plan", slug="citrus", name="Citrus", credits_minor=3000, price_minor=999, currency="usd",
                lemonsqueezy_variant_id="1")
        handled(send(client, s.project_id, "lemonsqueezy", "lemonsqueezy/subscription_created.json"), "processed")
        handled(send(client, s.project_id, "lemonsqueezy", "lemonsqueezy/subscription_payment_success.json"),
                "processed")
        wallet = s.wallet_of(LS_CUSTOMER)
        assert s.balance(wallet) == 3000
        refund = json.loads(fixture("lemonsqueezy/subscription_payment_success.json"))
        refund["meta"]["event_name"] = "subscription_payment_refunded"
        refund["data"]["attributes"].update(refunded=True, refunded_amount=999,
                                            updated_at="2026-08-26T10:00:00.000000Z")
        handled(send(client, s.project_id, "lemonsqueezy", json.dumps(refund).encode()), "processed")
        assert s.balance(wallet) == 0
        (ent,) = s.entitlements(wallet)
        assert (ent["status"], ent["active"]) == ("ended", False)


# ---------------------------------------------------------------------- 2. multi-payment Stripe invoices


def test_every_payment_of_a_multi_payment_invoice_is_linked(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = _stripe_plan(client)
        handled(send(client, s.project_id, "stripe", SUB), "processed")
        invoice = json.loads(stripe_invoice("evt_inv1", "in_multi", START, END, payment_intent="pi_a"))
        first = invoice["data"]["object"]["payments"]["data"][0]
        first["amount_paid"] = 1200
        second = {**first, "id": "inpay_b", "amount_paid": 800, "is_default": False,
                  "payment": {"type": "payment_intent", "payment_intent": "pi_b"}}
        invoice["data"]["object"]["payments"]["data"].append(second)
        handled(send(client, s.project_id, "stripe", json.dumps(invoice).encode()), "processed")
        wallet = s.wallet_of(CUSTOMER)
        # a refund of the SECOND payment (800 of 2000) claws back its share: ceil(5000 × 800 / 2000)
        handled(send(client, s.project_id, "stripe", _refund("evt_rb", 800, "pi_b", "ch_b")), "processed")
        assert s.balance(wallet) == 3000
        # the first payment's refund is cumulative for ITS charge: the two add up to the whole invoice
        handled(send(client, s.project_id, "stripe", _refund("evt_ra", 1200, "pi_a", "ch_a")), "processed")
        assert s.balance(wallet) == 0
        payment = client.get(f"{s.base}/payments", headers=s.owner.headers).json()[0]
        assert (payment["refunded_minor"], payment["status"]) == (2000, "refunded")


def test_a_later_invoice_payment_event_links_a_second_payment(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = _stripe_plan(client)
        handled(send(client, s.project_id, "stripe", SUB), "processed")
        # the refund of the second payment arrives first: deferred until that payment is linked
        handled(send(client, s.project_id, "stripe", _refund("evt_rb", 800, "pi_b", "ch_b")), "deferred")
        handled(send(client, s.project_id, "stripe", stripe_invoice("evt_inv1", "in_multi", START, END)),
                "processed")
        handled(send(client, s.project_id, "stripe", _invoice_payment("evt_ipa", "in_multi", "pi_a", 1200)),
                "processed")
        handled(send(client, s.project_id, "stripe", _invoice_payment("evt_ipb", "in_multi", "pi_b", 800)),
                "processed")
        wallet = s.wallet_of(CUSTOMER)
        assert s.balance(wallet) == 3000
        assert [e["status"] for e in s.events()].count("deferred") == 0


# ---------------------------------------------------------------------------------- 3. a $0 invoice


def test_a_zero_invoice_resolves_links_and_refunds_as_nothing_to_claw_back(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = _stripe_plan(client)
        handled(send(client, s.project_id, "stripe", SUB), "processed")
        zero = json.loads(stripe_invoice("evt_inv0", "in_zero", START, END))
        zero["data"]["object"].update(amount_paid=0, amount_due=0, total=0, subtotal=0)
        # the invoice payment and a refund naming it arrive BEFORE the $0 invoice
        handled(send(client, s.project_id, "stripe", _invoice_payment("evt_ip0", "in_zero", "pi_zero", 0)),
                "deferred")
        handled(send(client, s.project_id, "stripe", _refund("evt_r0", 0, "pi_zero", "ch_zero")), "deferred")
        handled(send(client, s.project_id, "stripe", json.dumps(zero).encode()), "processed")
        assert [e["status"] for e in s.events()].count("deferred") == 0
        wallet = s.wallet_of(CUSTOMER)
        assert s.balance(wallet) == 0 and s.transactions(wallet) == []
        payment = client.get(f"{s.base}/payments", headers=s.owner.headers).json()[0]
        assert (payment["external_id"], payment["amount_minor"], payment["credits_minor"]) == ("in_zero", 0, 0)
        (ent,) = s.entitlements(wallet)
        assert ent["active"] is True  # nothing was paid back: the trial goes on


# --------------------------------------------------------------------- 4. a purchase for a closed wallet


def _session(session_id: str) -> bytes:
    event = json.loads(fixture(PAY))
    event["id"] = f"evt_{session_id}"
    event["data"]["object"].update(id=session_id, payment_intent=f"pi_{session_id}")
    return json.dumps(event).encode()


def test_a_purchase_for_a_closed_wallet_is_held_then_replayed_or_dismissed(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = shop(client)
        s.offer("pack", slug="starter", name="Starter", credits_minor=1000, price_minor=2000, currency="usd")
        handled(send(client, s.project_id, "stripe", _session("cs_one")), "processed")
        wallet = s.wallet_of(CUSTOMER)
        r = client.post(f"{s.base}/wallets/{wallet}/erasure", json={"reason": "deleted"}, headers=s.owner.headers)
        assert r.status_code == 202, r.text
        held = handled(send(client, s.project_id, "stripe", _session("cs_two")), "held")
        assert "erasure" in held["detail"] and f"webhook-events/{held['webhook_event_id']}/replay" in held["detail"]
        handled(send(client, s.project_id, "stripe", _session("cs_two")), "duplicate")  # no retry loop
        assert s.balance(wallet) == 1000
        assert [e["id"] for e in s.events(status="held")] == [held["webhook_event_id"]]
        # the erasure is cancelled: the admin replays the held purchase, credited once
        assert client.post(f"{s.base}/wallets/{wallet}/erasure/cancel", headers=s.owner.headers).status_code == 200
        replayed = client.post(f"{s.base}/webhook-events/{held['webhook_event_id']}/replay", headers=s.owner.headers)
        assert replayed.status_code == 200 and replayed.json()["status"] == "processed", replayed.text
        assert s.balance(wallet) == 2000
        # closed again: a held purchase refunded in the provider's dashboard is dismissed, never applied
        assert client.post(f"{s.base}/wallets/{wallet}/erasure", json={}, headers=s.owner.headers).status_code == 202
        held = handled(send(client, s.project_id, "stripe", _session("cs_three")), "held")
        row = held["webhook_event_id"]
        dismissed = client.post(f"{s.base}/webhook-events/{row}/dismiss", json={"reason": "refunded in Stripe"},
                                headers=s.owner.headers)
        assert dismissed.status_code == 200 and dismissed.json()["status"] == "dismissed", dismissed.text
        assert client.post(f"{s.base}/webhook-events/{row}/replay", headers=s.owner.headers).status_code == 404
        assert client.post(f"{s.base}/webhook-events/{row}/dismiss", json={"reason": "again"},
                           headers=s.owner.headers).status_code == 404
        handled(send(client, s.project_id, "stripe", _session("cs_three")), "duplicate")


# ---------------------------------------------------------------------------------- 5. allocation order


def test_transactions_list_allocations_in_the_order_they_were_burned(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s, wallet = _subscribed(client)  # a 5000 subscription bucket expiring with the period (END)
        # a promo created LATER (higher bucket id) that expires sooner: burned first
        soon = datetime.fromtimestamp(NOW + 3 * DAY, UTC).isoformat()
        s.grant(wallet, 300, kind="promo", expires_at=soon)
        s.debit(wallet, 500)
        *_, debit = s.transactions(wallet)
        buckets = [(a["bucket_source"], a["amount_minor"]) for a in debit["allocations"]]
        assert buckets == [("promo", -300), ("subscription", -200)], debit["allocations"]
        assert debit["allocations"][0]["bucket_id"] > debit["allocations"][1]["bucket_id"]
