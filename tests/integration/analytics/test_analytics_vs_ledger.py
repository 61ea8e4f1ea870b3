"""Analytics figures against the ledger itself: postings made through ledger.service on the test's
PostgreSQL, relayed by the real outbox relay to the real broker (plus a duplicate relay), sunk into
ClickHouse by the sink running INSIDE the api process (the embedded ownership mode), and read back through
the HTTP API with a real login. Expected values are computed from PostgreSQL, not from ClickHouse."""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from analytics_testkit import (
    add_member,
    auth,
    create_project,
    pg_rows,
    relay_then_republish,
    signup,
    usage_event,
    wait_for,
    worker_dead_letters,
)

from analytics.queries import ISSUED_KINDS, SPENT_KINDS
from ledger import service
from ledger.contracts import TOPIC_LEDGER_TRANSACTIONS, TransactionKind
from ledger.db import make_engine
from ledger.expiry import expire_credits
from streams.contracts import TOPIC_USAGE_DLQ, TOPIC_USAGE_EVENTS

pytestmark = pytest.mark.integration




def _post_ledger_scenario(database_url: str, project: str, other_project: str) -> None:
    engine = make_engine(database_url)
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            a = service.ensure_wallet(conn, project_id=project, owner_kind="subject", owner_ref="alice").id
            b = service.ensure_wallet(conn, project_id=project, owner_kind="subject", owner_ref="bob").id
            c = service.ensure_wallet(conn, project_id=other_project, owner_kind="subject", owner_ref="carol").id
        with engine.begin() as conn:
            service.grant_credits(conn, wallet_id=a, amount_minor=1_000, idempotency_key="a-topup",
                                  kind=TransactionKind.TOP_UP, source_ref="pack:starter:cs_1")
            service.grant_credits(conn, wallet_id=a, amount_minor=200, idempotency_key="a-bonus",
                                  kind=TransactionKind.BONUS, expires_at=now + timedelta(hours=1))
            charge = service.debit(conn, wallet_id=a, amount_minor=150, idempotency_key="a-debit-1")
            service.refund(conn, transaction_id=charge.transaction.id, idempotency_key="a-refund",
                           amount_minor=50, reason="generation failed")
            service.debit(conn, wallet_id=a, amount_minor=30, idempotency_key="a-debit-2")
            service.grant_credits(conn, wallet_id=b, amount_minor=500, idempotency_key="b-sub",
                                  kind=TransactionKind.SUBSCRIPTION_GRANT, source_ref="plan:pro:2026-11")
            service.grant_credits(conn, wallet_id=b, amount_minor=40, idempotency_key="b-promo",
                                  kind=TransactionKind.PROMO, expires_at=now + timedelta(hours=1))
            service.debit(conn, wallet_id=b, amount_minor=400, idempotency_key="b-debit")
            service.adjust(conn, wallet_id=b, amount_minor=-20, reason="goodwill reversal", idempotency_key="b-adj")
            service.grant_credits(conn, wallet_id=c, amount_minor=999, idempotency_key="c-topup",
                                  kind=TransactionKind.TOP_UP, source_ref="pack:big:cs_9")
        with engine.begin() as conn:
            assert expire_credits(conn, now=now + timedelta(hours=2)) >= 1
    finally:
        engine.dispose()


def _expected_flows(rows: list[tuple[str, int]]) -> dict[str, int]:
    """The definitions, applied in Python to PostgreSQL's transactions."""
    issued = sum(a for k, a in rows if k in ISSUED_KINDS or (k == "adjustment" and a > 0))
    spent = -sum(a for k, a in rows if k in SPENT_KINDS)
    expired = -sum(a for k, a in rows if k == "expiry")
    adjusted_out = -sum(a for k, a in rows if k == "adjustment" and a < 0)
    return {"issued_minor": issued, "spent_minor": spent, "expired_minor": expired,
            "adjusted_out_minor": adjusted_out, "net_movement_minor": sum(a for _, a in rows),
            "transactions": len(rows), "other_minor": 0}


def test_wallet_analytics_match_the_ledger_and_stay_in_their_project(api, database_url, topics, producer,
                                                                    analytics_settings):
    owner, outsider, viewer = signup(api, "owner"), signup(api, "outsider"), signup(api, "viewer")
    project = create_project(api, owner, "Acme")
    other = create_project(api, outsider, "Other")
    add_member(api, project, owner, viewer, "viewer")
    for name, headers_ in ((project, auth(owner)), (other, auth(outsider))):  # units as the meter defines them
        r = api.post(f"/api/v1/projects/{name}/meters", headers=headers_, json={
            "slug": "tokens", "event_type": "tokens", "aggregation": "SUM", "value_property": "$.units"})
        assert r.status_code == 201, r.text
    start = datetime.now(UTC) - timedelta(minutes=1)
    _post_ledger_scenario(database_url, project, other)
    published = relay_then_republish(database_url, topics)
    total = pg_rows(database_url, "SELECT count(*) FROM transactions")[0][0]
    assert published == total

    # usage events for both projects and a dead letter
    usage_topic = topics.name(TOPIC_USAGE_EVENTS)
    sent_units: dict[str, Decimal] = defaultdict(Decimal)
    for i in range(60):
        subject = ("alice", "bob", "dave")[i % 3]
        event = usage_event(project=project, subject=subject, type_="tokens", units=i + 1)
        producer.send(usage_topic, event, key=subject)
        sent_units[subject] += i + 1
    # a value the meter refuses: streams dead-letters it (bad_value); analytics must not count it as 1 unit
    producer.send(usage_topic, usage_event(project=project, subject="alice", type_="tokens", units="lots"),
                  key="alice")
    producer.send(usage_topic, usage_event(project=other, subject="carol", units=10_000), key="carol")
    for value, letter_headers in worker_dead_letters(project, source_topic=usage_topic):
        producer.send(topics.name(TOPIC_USAGE_DLQ), value, headers=letter_headers)
    producer.flush()

    window = {"from": start.isoformat(), "to": (datetime.now(UTC) + timedelta(minutes=5)).isoformat()}
    headers = auth(owner)
    base = f"/api/v1/projects/{project}/analytics"
    mine = pg_rows(database_url, "SELECT count(*) FROM transactions WHERE project_id = %s", project)[0][0]

    def arrived() -> bool:
        summary = api.get(f"{base}/wallets/summary", params=window, headers=headers).json()
        totals = api.get(f"{base}/usage/totals", params=window, headers=headers).json()
        dead = api.get(f"{base}/dead-letters", headers=headers).json()
        return (summary.get("transactions") == mine and sum(m["events"] for m in totals.get("meters", [])) == 60
                and len(dead.get("dead_letters", [])) == 2)

    wait_for(arrived, timeout_s=90, what="transactions, usage and dead letters to reach ClickHouse")
    if analytics_settings.embedded:  # the sink thread in the api: wait until it read the duplicate relay too
        sink_thread = api.app.state.analytics_sink
        tx_topic = topics.name(TOPIC_LEDGER_TRANSACTIONS)
        wait_for(lambda: sink_thread.sink.stats.messages.get(tx_topic, 0) >= 2 * total
                 and not sink_thread.sink._pending, timeout_s=60, what="the duplicate relay to be consumed")
    else:
        time.sleep(2)
    summary = api.get(f"{base}/wallets/summary", params=window, headers=headers).json()

    rows = pg_rows(database_url, "SELECT kind, amount_minor FROM transactions WHERE project_id = %s", project)
    expected = _expected_flows([(k, int(a)) for k, a in rows])
    assert {k: summary[k] for k in expected} == expected
    assert expected["expired_minor"] > 0 and expected["spent_minor"] > 0  # the scenario exercises each flow
    outstanding = pg_rows(database_url, "SELECT sum(balance_minor) FROM wallets WHERE project_id = %s", project)[0][0]
    assert summary["outstanding_end_minor"] == int(outstanding)
    assert summary["outstanding_start_minor"] == 0
    assert summary["net_movement_minor"] == summary["outstanding_end_minor"] - summary["outstanding_start_minor"]
    assert summary["utilization_rate"] == str(
        (Decimal(expected["spent_minor"]) / Decimal(expected["issued_minor"])).quantize(Decimal("0.0001")))
    assert summary["expiration_rate"] == str(
        (Decimal(expected["expired_minor"]) / Decimal(expected["issued_minor"])).quantize(Decimal("0.0001")))

    # source breakdown == the buckets the ledger created
    buckets = dict(pg_rows(database_url, "SELECT source, sum(granted_minor)::bigint FROM credit_buckets "
                                     "WHERE project_id = %s GROUP BY source", project))
    assert {s["source"]: s["issued_minor"] for s in summary["sources"]} == {k: int(v) for k, v in buckets.items()}

    revenue = api.get(f"{base}/revenue", params=window, headers=headers).json()
    assert {(o["offer"], o["credits_minor"], o["purchases"]) for o in revenue["offers"]} == {
        ("pack:starter", 1_000, 1), ("plan:pro", 500, 1)}

    # wallet drill-down == the wallet's ledger rows, newest first
    alice = pg_rows(database_url, "SELECT id FROM wallets WHERE owner_ref = 'alice'")[0][0]
    detail = api.get(f"{base}/wallets/{alice}", params=window, headers=headers).json()
    ledger_rows = pg_rows(database_url, "SELECT id, kind, amount_minor, balance_after_minor FROM transactions "
                                    "WHERE wallet_id = %s ORDER BY id DESC", alice)
    assert [(t["transaction_id"], t["kind"], t["amount_minor"], t["balance_after_minor"])
            for t in detail["transactions"]] == [(i, k, int(a), int(b)) for i, k, a, b in ledger_rows]
    assert detail["outstanding_end_minor"] == pg_rows(database_url, "SELECT balance_minor FROM wallets WHERE id = %s",
                                                  alice)[0][0]

    flow = api.get(f"{base}/credit-flow", params={**window, "granularity": "hour"}, headers=headers).json()
    assert sum(b["issued_minor"] for b in flow["series"]) == expected["issued_minor"]
    assert sum(b["spent_minor"] for b in flow["series"]) == expected["spent_minor"]

    # usage: per subject and over time, exactly what was sent for THIS project
    top = api.get(f"{base}/usage/top-consumers", params={**window, "meter": "tokens"}, headers=headers).json()
    assert {c["subject"]: Decimal(c["units"]) for c in top["consumers"]} == dict(sent_units)
    series = api.get(f"{base}/usage", params={**window, "granularity": "minute"}, headers=headers).json()
    assert sum(Decimal(p["units"]) for p in series["series"]) == sum(sent_units.values())
    dead = api.get(f"{base}/dead-letters", headers=headers).json()["dead_letters"]
    assert [d["reason"] for d in dead] == ["missing_field", "missing_field"]  # the worker's letter, and an older one
    totals = api.get(f"{base}/usage/totals", params=window, headers=headers).json()
    assert [(m["meter"], m["events"], Decimal(m["units"]), m["rejected_events"]) for m in totals["meters"]] == [
        ("tokens", 60, sum(sent_units.values()), 1)]
    assert totals["dead_letters"] == [{"reason": "missing_field", "messages": 2}]
    picker = api.get(f"{base}/meters", headers=headers).json()["meters"]
    assert [(m["meter"], m["event_type"]) for m in picker] == [("tokens", "tokens")]
    unknown = api.get(f"{base}/usage", params={**window, "meter": "tokens-typo"}, headers=headers)
    assert unknown.status_code == 404 and unknown.json()["code"] == "catalog.meter_not_found"

    # scoping: the other project's figures hold only its own wallet; outsiders and anonymous callers see nothing
    theirs = api.get(f"/api/v1/projects/{other}/analytics/wallets/summary", params=window,
                     headers=auth(outsider)).json()
    assert (theirs["issued_minor"], theirs["transactions"]) == (999, 1)
    assert api.get(f"{base}/wallets/summary", params=window, headers=auth(outsider)).status_code == 404
    assert api.get(f"{base}/wallets/summary", params=window).status_code == 401
    assert api.get(f"{base}/wallets/summary", params=window, headers=auth(viewer)).status_code == 200
    bad = api.get(f"{base}/usage", params={**window, "from": "2026-01-01T00:00:00"}, headers=headers)
    assert bad.status_code in (400, 422) and bad.json()["code"] in ("analytics.bad_query", "api.validation_failed")
    too_many = api.get(f"{base}/usage", params={"from": "2020-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z",
                                               "granularity": "minute"}, headers=headers)
    assert too_many.status_code == 400 and too_many.json()["code"] == "analytics.bad_query"
