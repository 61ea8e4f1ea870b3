"""Refunds and disputes of Stripe *subscription* invoices. Since API version 2025-03-31.basil the invoice has no
``charge`` / ``payment_intent`` and the charge no ``invoice``: the link is the InvoicePayment (``invoice.payments``
when a delivery includes it, and the ``invoice_payment.paid`` event). The invoice's payment record carries the
payment intent, so ``charge.refunded`` / ``charge.dispute.*`` naming it claw back that period's credits — once,
in any arrival order (a refund before its invoice is deferred and woken)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from payments_testkit import Shop, fixture, handled, ledger_rows, send, shop, stripe_invoice
from tenancy_testkit import api_client

pytestmark = pytest.mark.integration

SUB = "stripe/checkout.session.completed.subscription.json"
PRICE = "price_1PgafmB7WZ01zgkW6dKueIc5"
CUSTOMER = "user_42"
PI = "pi_3SubInvoice0001"
CHARGE = "ch_3SubInvoice0001"
DAY = 86400
NOW = int(datetime.now(UTC).timestamp())
START, END = NOW - DAY, NOW + 29 * DAY


def _shop(client: Any) -> Shop:
    s = shop(client)
    s.offer("plan", slug="pro_monthly", name="Pro", credits_minor=5000, price_minor=2000, currency="usd",
            interval="month", stripe_price_id=PRICE)
    return s


def refund(event_id: str, refunded: int, *, payment_intent: str = PI, charge: str = CHARGE) -> bytes:
    event = json.loads(fixture("stripe/charge.refunded.json"))
    event["id"] = event_id
    obj = event["data"]["object"]
    obj.update(id=charge, payment_intent=payment_intent, amount_refunded=refunded, refunded=refunded == 2000)
    for r in obj["refunds"]["data"]:
        r.update(charge=charge, payment_intent=payment_intent, amount=refunded)
    return json.dumps(event, indent=2).encode()


def dispute(event_id: str, *, event_type: str = "charge.dispute.created", status: str | None = None) -> bytes:
    event = json.loads(fixture("stripe/charge.dispute.created.json"))
    event["id"], event["type"] = event_id, event_type
    event["data"]["object"].update(charge=CHARGE, payment_intent=PI)
    if status:
        event["data"]["object"]["status"] = status
    return json.dumps(event, indent=2).encode()


def invoice_payment(event_id: str, invoice_id: str = "in_sub1", payment_intent: str = PI) -> bytes:
    """``invoice_payment.paid``: an InvoicePayment object (Stripe API 2025-03-31.basil and later)."""
    event = json.loads(fixture("stripe/invoice.paid.json"))
    event["id"], event["type"] = event_id, "invoice_payment.paid"
    event["data"] = {"object": {"id": f"inpay_{event_id}", "object": "invoice_payment", "amount_paid": 2000,
                                "amount_requested": 2000, "created": START, "currency": "usd",
                                "invoice": invoice_id, "is_default": True, "livemode": False,
                                "payment": {"type": "payment_intent", "payment_intent": payment_intent},
                                "status": "paid", "status_transitions": {"canceled_at": None, "paid_at": START}}}
    return json.dumps(event, indent=2).encode()


def _kinds(s: Shop) -> list[tuple[str, int]]:
    return [(t["kind"], t["amount_minor"]) for t in s.transactions(s.wallet_of(CUSTOMER))]


def test_refund_of_an_invoice_with_payments_claws_back_that_period(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = _shop(client)
        handled(send(client, s.project_id, "stripe", SUB), "processed")
        handled(send(client, s.project_id, "stripe", stripe_invoice("evt_inv1", "in_sub1", START, END,
                                                                  payment_intent=PI)), "processed")
        payment = client.get(f"{s.base}/payments", headers=s.owner.headers).json()[0]
        assert (payment["external_id"], payment["payment_ref"]) == ("in_sub1", PI)
        # a partial refund (500 of 2000) claws back ceil(5000 × 1/4); the full refund the rest; replays nothing
        handled(send(client, s.project_id, "stripe", refund("evt_ref1", 500)), "processed")
        assert s.balance(s.wallet_of(CUSTOMER)) == 3750
        handled(send(client, s.project_id, "stripe", refund("evt_ref1", 500)), "duplicate")
        handled(send(client, s.project_id, "stripe", refund("evt_ref2", 2000)), "processed")
        handled(send(client, s.project_id, "stripe", refund("evt_ref2", 2000)), "duplicate")
        assert _kinds(s) == [("subscription_grant", 5000), ("adjustment", -1250), ("adjustment", -3750)]
        assert s.balance(s.wallet_of(CUSTOMER)) == 0
        payment = client.get(f"{s.base}/payments", headers=s.owner.headers).json()[0]
        assert payment["status"] == "refunded" and payment["clawed_back_minor"] == 5000
        # a refund of some other payment intent is not this period's
        handled(send(client, s.project_id, "stripe", refund("evt_other", 2000, payment_intent="pi_other",
                                                        charge="ch_other")), "deferred")
        assert s.balance(s.wallet_of(CUSTOMER)) == 0


def test_invoice_payment_event_links_the_payment_intent(database_url: str, engines: Any) -> None:
    """The usual delivery: invoice.paid WITHOUT payments; invoice_payment.paid names the payment intent."""
    with api_client(database_url, engines) as client:
        s = _shop(client)
        handled(send(client, s.project_id, "stripe", SUB), "processed")
        handled(send(client, s.project_id, "stripe", stripe_invoice("evt_inv1", "in_sub1", START, END)), "processed")
        assert client.get(f"{s.base}/payments", headers=s.owner.headers).json()[0]["payment_ref"] is None
        # the dispute arrives before the link: it waits for the payment intent
        deferred = handled(send(client, s.project_id, "stripe", dispute("evt_dp1")), "deferred")
        assert PI in deferred["detail"]
        assert s.balance(s.wallet_of(CUSTOMER)) == 5000
        linked = handled(send(client, s.project_id, "stripe", invoice_payment("evt_ip1")), "processed")
        assert "linked" in linked["detail"]
        # the link woke the dispute: the whole period clawed back, once
        assert _kinds(s) == [("subscription_grant", 5000), ("adjustment", -5000)]
        assert [e["status"] for e in s.events(status="deferred")] == []
        handled(send(client, s.project_id, "stripe", invoice_payment("evt_ip1")), "duplicate")
        handled(send(client, s.project_id, "stripe", invoice_payment("evt_ip1_again")), "ignored")
        # a won dispute gives them back
        handled(send(client, s.project_id, "stripe", dispute("evt_dp_won", event_type="charge.dispute.closed",
                                                         status="won")), "processed")
        assert s.balance(s.wallet_of(CUSTOMER)) == 5000


ORDERS = {
    "in order, payments on the invoice": ["sub", "inv_with_payments", "refund"],
    "in order, invoice_payment event": ["sub", "inv", "invoice_payment", "refund"],
    "refund first, payments on the invoice": ["refund", "sub", "inv_with_payments"],
    "refund first, then invoice, then link": ["refund", "inv", "sub", "invoice_payment"],
    "link and refund before everything": ["invoice_payment", "refund", "inv", "sub"],
    "refund between invoice and link": ["sub", "inv", "refund", "invoice_payment"],
}


def test_any_arrival_order_ends_in_the_same_ledger(database_url: str, engines: Any) -> None:
    bodies = {"sub": SUB, "inv": stripe_invoice("evt_inv1", "in_sub1", START, END),
              "inv_with_payments": stripe_invoice("evt_inv1", "in_sub1", START, END, payment_intent=PI),
              "invoice_payment": invoice_payment("evt_ip1"), "refund": refund("evt_ref1", 1000)}
    states = {}
    with api_client(database_url, engines) as client:
        for name, order in ORDERS.items():
            s = _shop(client)
            for step in order:
                r = send(client, s.project_id, "stripe", bodies[step])
                assert r.status_code == 200 and r.json()["status"] in ("processed", "deferred"), (name, step, r.text)
            for step in order:  # every redelivery afterwards changes nothing
                handled(send(client, s.project_id, "stripe", bodies[step]), "duplicate")
            assert [e["status"] for e in s.events(status="deferred")] == [], name
            assert _kinds(s) == [("subscription_grant", 5000), ("adjustment", -2500)], name
            states[name] = [(k, a, r) for _, k, a, r in ledger_rows(database_url, s.project_id)]
    assert len({json.dumps(v) for v in states.values()}) == 1, states


def test_refund_after_the_period_expired_does_not_claw_back_the_expired_credits(database_url: str,
                                                                                engines: Any) -> None:
    """Period credits 5000, 1200 used, the full refund arriving before or after the period's 3800 expired: the
    same end (the 1200 used become debt), never 3800 lost twice."""
    from datetime import timedelta

    from ledger import service
    from ledger.db import make_engine

    engine = make_engine(database_url, pool_size=2)
    ends = {}
    try:
        with api_client(database_url, engines) as client:
            for refund_first in (True, False):
                s = _shop(client)
                handled(send(client, s.project_id, "stripe", SUB), "processed")
                handled(send(client, s.project_id, "stripe", stripe_invoice("evt_inv1", "in_sub1", START, END,
                                                                          payment_intent=PI)), "processed")
                wallet = s.wallet_of(CUSTOMER)
                assert wallet is not None
                s.debit(wallet, 1200)
                if refund_first:
                    handled(send(client, s.project_id, "stripe", refund("evt_ref", 2000)), "processed")
                with engine.begin() as conn:
                    service.expire_credits(conn, now=datetime.fromtimestamp(END, UTC) + timedelta(seconds=1))
                if not refund_first:
                    handled(send(client, s.project_id, "stripe", refund("evt_ref", 2000)), "processed")
                r = client.get(f"{s.base}/wallets/{wallet}", headers=s.owner.headers).json()["balance"]
                payment = client.get(f"{s.base}/payments", headers=s.owner.headers).json()[0]
                ends[refund_first] = (r["balance_minor"], r["debt_minor"], payment["status"])
                # a later dispute of the same money claws back nothing more
                handled(send(client, s.project_id, "stripe", dispute("evt_dp")), "processed")
                assert client.get(f"{s.base}/wallets/{wallet}", headers=s.owner.headers).json()[
                    "balance"]["balance_minor"] == -1200
    finally:
        engine.dispose()
    assert ends[True] == ends[False] == (-1200, 1200, "refunded")
