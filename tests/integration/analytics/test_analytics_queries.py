"""Analytics figures on hand-built scenarios with fixed times: every expected number below is worked out by
hand (wallet flows) or computed in Python from the events sent (usage), never read back from ClickHouse."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from analytics_testkit import usage_event

from analytics.client import ClientPool
from analytics.errors import BadQuery
from analytics.meter_units import MeterSpec, MeterVersion
from analytics.queries import Analytics, Window
from ledger.contracts import TOPIC_LEDGER_TRANSACTIONS
from meterline.topics import TopicSpec, ensure_topics
from streams.contracts import TOPIC_USAGE_EVENTS

pytestmark = pytest.mark.integration

NOV = Window(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))


def d(day: int, hour: int = 12, month: int = 11) -> str:
    return datetime(2026, month, day, hour, tzinfo=UTC).isoformat()


# (id, wallet, kind, amount, before, after, created_at, bucket_source, source_ref)
LEDGER = [
    (1, "wA", "top_up", 1000, 0, 1000, d(10, month=10), "top_up", "pack:big:cs_0"),  # hoarded before November
    (2, "wA", "bonus", 100, 1000, 1100, d(2), "bonus", ""),
    (3, "wA", "usage", -600, 1100, 500, d(5), "", ""),
    (4, "wA", "refund", 50, 500, 550, d(10), "refund", "refund:3"),
    (5, "wA", "expiry", -200, 550, 350, d(20), "", ""),
    (6, "wA", "usage", -300, 350, 50, d(25), "", ""),
    (7, "wB", "subscription_grant", 500, 0, 500, d(3), "subscription", "plan:pro:2026-11"),
    (8, "wB", "top_up", 250, 500, 750, d(4), "top_up", "pack:starter:cs_1"),
    (9, "wB", "debit", -100, 750, 650, d(6), "", ""),
    (10, "wB", "adjustment", -10, 650, 640, d(7), "", ""),
    (11, "wB", "usage", 5, 640, 645, d(8), "", ""),  # a volume-price credit-back
    (12, "wB", "usage", -40, 645, 605, d(2, month=12), "", ""),  # after the window
]


def _posted(row: tuple[Any, ...], project: str = "prj_q") -> dict[str, Any]:
    tx_id, wallet, kind, amount, before, after, created, source, ref = row
    return {"transaction_id": tx_id, "project_id": project, "wallet_id": wallet, "kind": kind,
            "amount_minor": amount, "balance_before_minor": before, "balance_after_minor": after,
            "idempotency_key": f"k{tx_id}", "created_at": created, "bucket_source": source or None,
            "source_ref": ref or None}


DECISIONS = [
    {"decision_id": "d1", "project_id": "prj_q", "subject": "s1", "wallet_id": "wA", "allowed": False,
     "reason": "upgrade_required", "policy_id": "paywall_conversion", "time": d(1)},
    {"decision_id": "d2", "project_id": "prj_q", "subject": "s2", "wallet_id": "wB", "allowed": False,
     "reason": "insufficient_balance", "policy_id": "token_consumption", "time": d(2)},
    {"decision_id": "d3", "project_id": "prj_q", "subject": "s2", "wallet_id": "wB", "allowed": True,
     "reason": "", "policy_id": "token_consumption", "cost_minor": 5, "time": d(4, 18)},
    {"decision_id": "d4", "project_id": "prj_q", "subject": "s3", "wallet_id": "", "allowed": True,
     "reason": "", "policy_id": "enterprise_unlimited", "time": d(5)},
    {"decision_id": "d5", "project_id": "prj_q", "subject": "s4", "wallet_id": "", "allowed": False,
     "reason": "rate_limited", "policy_id": "throttle", "time": d(6)},
    {"decision_id": "d9", "project_id": "prj_other", "subject": "s1", "wallet_id": "wA", "allowed": False,
     "reason": "upgrade_required", "policy_id": "paywall_conversion", "time": d(1)},
]


@pytest.fixture
def service(analytics_settings):
    pool = ClientPool(analytics_settings.clickhouse_url, size=2)
    yield Analytics(analytics_settings, pool)
    pool.close()


def test_wallet_figures_on_a_hand_built_month(topics, producer, ch, analytics_settings, run_sink, service):
    decisions_topic = topics.name(analytics_settings.access_decisions_topic)
    ensure_topics(topics.bootstrap, [TopicSpec(decisions_topic, 1, {})])
    tx_topic = topics.name(TOPIC_LEDGER_TRANSACTIONS)
    for row in LEDGER:
        producer.send(tx_topic, _posted(row), key=row[1])
    producer.send(tx_topic, _posted(LEDGER[2]), key="wA")  # the outbox relay delivered t3 twice
    producer.send(tx_topic, _posted((99, "wZ", "top_up", 7777, 0, 7777, d(3), "top_up", "pack:x"), "prj_other"),
                  key="wZ")
    producer.send(decisions_topic, DECISIONS[:3])  # a packed message
    for decision in DECISIONS[3:]:
        producer.send(decisions_topic, decision)
    producer.flush()
    sink = run_sink()
    sink.wait_messages({tx_topic: len(LEDGER) + 2, decisions_topic: 4})
    sink.stop()

    summary = service.wallet_summary(project_id="prj_q", win=NOV)
    assert {k: summary[k] for k in ("issued_minor", "spent_minor", "expired_minor", "adjusted_out_minor",
                                    "net_movement_minor", "other_minor", "transactions")} == {
        "issued_minor": 900, "spent_minor": 995, "expired_minor": 200, "adjusted_out_minor": 10,
        "net_movement_minor": -305, "other_minor": 0, "transactions": 10}
    # More was spent than issued in November: October's hoarded top-up was burned.
    assert summary["utilization_rate"] == "1.1056"
    assert summary["expiration_rate"] == "0.2222"
    assert (summary["outstanding_start_minor"], summary["outstanding_end_minor"]) == (1000, 695)
    assert summary["sources"] == [
        {"source": "subscription", "issued_minor": 500, "grants": 1, "share": "0.5556"},
        {"source": "top_up", "issued_minor": 250, "grants": 1, "share": "0.2778"},
        {"source": "bonus", "issued_minor": 100, "grants": 1, "share": "0.1111"},
        {"source": "refund", "issued_minor": 50, "grants": 1, "share": "0.0556"}]

    alice = service.wallet_summary(project_id="prj_q", win=NOV, wallet_id="wA")
    assert (alice["issued_minor"], alice["spent_minor"], alice["expired_minor"]) == (150, 900, 200)
    assert (alice["utilization_rate"], alice["expiration_rate"]) == ("6.0000", "1.3333")
    october = service.wallet_summary(project_id="prj_q", win=Window(datetime(2026, 10, 1, tzinfo=UTC),
                                                                    datetime(2026, 11, 1, tzinfo=UTC)))
    assert (october["issued_minor"], october["spent_minor"], october["utilization_rate"]) == (1000, 0, "0.0000")

    flow = service.credit_flow(project_id="prj_q", win=NOV, granularity="day")
    by_day = {b["bucket"][:10]: (b["issued_minor"], b["spent_minor"], b["expired_minor"]) for b in flow["series"]}
    assert by_day == {"2026-11-02": (100, 0, 0), "2026-11-03": (500, 0, 0), "2026-11-04": (250, 0, 0),
                      "2026-11-05": (0, 600, 0), "2026-11-06": (0, 100, 0), "2026-11-07": (0, 0, 0),
                      "2026-11-08": (0, -5, 0), "2026-11-10": (50, 0, 0), "2026-11-20": (0, 0, 200),
                      "2026-11-25": (0, 300, 0)}
    monthly = service.credit_flow(project_id="prj_q", win=Window(datetime(2026, 10, 1, tzinfo=UTC),
                                                                 datetime(2027, 1, 1, tzinfo=UTC)), granularity="month")
    assert [(b["bucket"][:7], b["net_movement_minor"]) for b in monthly["series"]] == [
        ("2026-10", 1000), ("2026-11", -305), ("2026-12", -40)]

    top = service.top_wallets(project_id="prj_q", win=NOV)["wallets"]
    assert [(w["wallet_id"], w["spent_minor"]) for w in top] == [("wA", 900), ("wB", 95)]
    assert {(o["offer"], o["credits_minor"]) for o in service.revenue(project_id="prj_q", win=NOV)["offers"]} == {
        ("plan:pro", 500), ("pack:starter", 250)}
    txs = service.wallet_transactions(project_id="prj_q", wallet_id="wA", limit=4)
    assert [t["transaction_id"] for t in txs["transactions"]] == [6, 5, 4, 3] and txs["next_before_id"] == 3
    rest = service.wallet_transactions(project_id="prj_q", wallet_id="wA", limit=4, before_id=3)
    assert [t["transaction_id"] for t in rest["transactions"]] == [2, 1]

    funnel = service.paywall_funnel(project_id="prj_q", win=NOV)
    assert [(s["stage"], s["subjects"]) for s in funnel["stages"]] == [
        ("requested", 4), ("paywalled", 2), ("purchased", 1), ("returned", 1)]
    assert funnel["conversion_rate"] == "0.5000"
    assert sum(r["decisions"] for r in funnel["reasons"]) == 5

    # scoping: another project's rows never show up, and a wallet id of another project yields nothing
    other = service.wallet_summary(project_id="prj_other", win=NOV)
    assert (other["issued_minor"], other["transactions"]) == (7777, 1)
    assert service.wallet_summary(project_id="prj_other", win=NOV, wallet_id="wA")["transactions"] == 0
    assert [s["subjects"] for s in service.paywall_funnel(project_id="prj_other", win=NOV)["stages"]] == [1, 1, 0, 0]


def _floor(moment: datetime, granularity: str) -> datetime:
    if granularity == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    if granularity == "day":
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _meter(slug: str, event_type: str, aggregation: str = "SUM", value_property: str | None = "$.units",
           filters: tuple[dict[str, Any], ...] = (), group_by: tuple[str, ...] = (),
           since: datetime = datetime(2020, 1, 1, tzinfo=UTC)) -> MeterSpec:
    return MeterSpec(id=f"mtr_{slug}", slug=slug, group_by=group_by, event_type=event_type, versions=(
        MeterVersion(event_type, aggregation, value_property, filters, since, None),))


def test_usage_series_at_every_granularity_match_the_events_sent(topics, producer, ch, run_sink, service):
    rng = random.Random(5)
    start = datetime(2026, 10, 30, 22, tzinfo=UTC)
    events = []
    for _ in range(400):
        moment = start + timedelta(minutes=rng.randint(0, 60 * 24 * 4), seconds=rng.randint(0, 59))
        event = usage_event(project="prj_u", subject=f"user{rng.randint(1, 6)}", type_=rng.choice(["tokens", "images"]),
                            units=str(Decimal(rng.randint(1, 4000)) / 8), time_=moment,
                            model=rng.choice(["small", "large"]), cost_hint=rng.randint(1, 9))
        events.append(event)
    # values a meter refuses (streams dead-letters them as bad_value): never units, reported as rejected
    bad = [usage_event(project="prj_u", subject="user1", type_="tokens", units=value, model="large",
                       time_=start + timedelta(hours=3)) for value in ("lots", None, -3, True)]
    usage_topic = topics.name(TOPIC_USAGE_EVENTS)
    for chunk in range(0, len(events), 7):  # packed messages of up to 7 events
        producer.send(usage_topic, events[chunk:chunk + 7], key=str(chunk))
    producer.send(usage_topic, bad, key="bad")
    producer.send(usage_topic, usage_event(project="prj_elsewhere", subject="user1", units=10**6, time_=start),
                  key="x")
    producer.flush()
    sink = run_sink()
    sink.wait_messages({usage_topic: (len(events) + 6) // 7 + 2})
    sink.stop()

    win = Window(start - timedelta(hours=2), start + timedelta(days=5))
    tokens, images = _meter("tokens", "tokens", group_by=("$.model",)), _meter("images", "images")
    meters = [images, tokens]

    def expected(granularity: str, key: Any, value: Any = lambda e: Decimal(e["data"]["units"]),
                 only: Any = lambda e: True) -> dict[tuple[str, str], Decimal]:
        out: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        for e in events:
            if only(e):
                moment = datetime.fromisoformat(e["time"])
                out[(_floor(moment, granularity).isoformat(), key(e))] += value(e)
        return dict(out)

    def got(result: dict[str, Any]) -> dict[tuple[str, str], Decimal]:
        return {(p["bucket"], p["group"]): Decimal(p["units"]) for p in result["series"] if p["events"]}

    for granularity in ("hour", "day", "month"):
        result = service.usage(project_id="prj_u", win=win, granularity=granularity, meters=meters)
        assert got(result) == expected(granularity, lambda e: e["type"]), granularity
        assert sum(p["rejected_events"] for p in result["series"]) == 4
    by_model = service.usage(project_id="prj_u", win=win, granularity="day", meters=[tokens], group_by="$.model")
    assert got(by_model) == expected("day", lambda e: e["data"]["model"], only=lambda e: e["type"] == "tokens")
    for granularity in ("hour", "day"):
        one = service.usage(project_id="prj_u", win=win, granularity=granularity, subject="user3", meters=[images])
        assert got(one) == expected(granularity, lambda e: e["type"],
                                    only=lambda e: e["subject"] == "user3" and e["type"] == "images")
    per_subject = service.usage(project_id="prj_u", win=win, granularity="day", meters=[tokens], group_by="subject")
    assert got(per_subject) == expected("day", lambda e: e["subject"], only=lambda e: e["type"] == "tokens")

    # a meter's definition decides the units: its filters, its value property, its aggregation
    large = _meter("large", "tokens", filters=({"property": "$.model", "equals": "large"},))
    hints = _meter("hints", "tokens", value_property="$.cost_hint")
    count = _meter("calls", "tokens", aggregation="COUNT", value_property=None)
    peak = _meter("peak", "tokens", aggregation="MAX")
    totals = service.usage_totals(project_id="prj_u", win=win, meters=[large, hints, count, peak])
    by_slug = {m["meter"]: m for m in totals["meters"]}
    token_events = [e for e in events if e["type"] == "tokens"]
    large_units = sum(Decimal(e["data"]["units"]) for e in token_events if e["data"]["model"] == "large")
    assert (Decimal(by_slug["large"]["units"]), by_slug["large"]["rejected_events"]) == (large_units, 4)
    assert Decimal(by_slug["hints"]["units"]) == sum(Decimal(e["data"]["cost_hint"]) for e in token_events)
    assert by_slug["hints"]["rejected_events"] == 4  # the bad events have no cost_hint
    assert (by_slug["calls"]["units"], by_slug["calls"]["rejected_events"]) == (str(len(token_events) + 4), 0)
    assert Decimal(by_slug["peak"]["units"]) == max(Decimal(e["data"]["units"]) for e in token_events)
    # a meter version starting later counts only what came after it
    later = start + timedelta(days=2)
    versioned = MeterSpec(id="mtr_v", slug="v", group_by=(), event_type="tokens", versions=(
        MeterVersion("images", "SUM", "$.units", (), datetime(2020, 1, 1, tzinfo=UTC), later),
        MeterVersion("tokens", "SUM", "$.units", (), later, None)))
    v_units = service.usage_totals(project_id="prj_u", win=win, meters=[versioned])["meters"][0]["units"]
    assert Decimal(v_units) == sum(Decimal(e["data"]["units"]) for e in events
                                   if (e["type"] == "images") == (datetime.fromisoformat(e["time"]) < later))

    # units by the price version that prices each event (by event time; before the first version: the first)
    priced = MeterSpec(id="mtr_p", slug="p", group_by=(), event_type="tokens", versions=tokens.versions,
                       price_versions=(("pv_1", start + timedelta(days=1)), ("pv_2", later)))
    by_version = service.usage(project_id="prj_u", win=win, granularity="month", meters=[priced],
                               group_by="price_version")
    per_version: dict[str, Decimal] = defaultdict(Decimal)
    for e in token_events:
        per_version["pv_1" if datetime.fromisoformat(e["time"]) < later else "pv_2"] += Decimal(e["data"]["units"])
    got_versions: dict[str, Decimal] = defaultdict(Decimal)
    for point in by_version["series"]:
        got_versions[point["group"]] += Decimal(point["units"])
    assert dict(got_versions) == dict(per_version)

    day_one = Window(start, start + timedelta(days=1))
    minutes = service.usage(project_id="prj_u", win=day_one, granularity="minute", meters=[tokens])
    in_day = [e for e in events if e["type"] == "tokens" and start <= datetime.fromisoformat(e["time"]) < day_one.end]
    by_minute: dict[str, Decimal] = defaultdict(Decimal)
    for e in in_day:
        by_minute[datetime.fromisoformat(e["time"]).replace(second=0).isoformat()] += Decimal(e["data"]["units"])
    assert {p["bucket"]: Decimal(p["units"]) for p in minutes["series"] if p["events"]} == dict(by_minute)

    top = service.top_consumers(project_id="prj_u", win=win, meter=images, limit=3)["consumers"]
    per_subject_units: dict[str, Decimal] = defaultdict(Decimal)
    for e in events:
        if e["type"] == "images":
            per_subject_units[e["subject"]] += Decimal(e["data"]["units"])
    assert [(c["subject"], Decimal(c["units"])) for c in top] == sorted(
        per_subject_units.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    counts: dict[str, int] = defaultdict(int)
    for e in [*events, *bad]:
        counts[e["subject"]] += 1
    everything = service.top_consumers(project_id="prj_u", win=win, limit=10)["consumers"]
    assert {c["subject"]: c["events"] for c in everything} == dict(counts)
    elsewhere = service.usage_totals(project_id="prj_elsewhere", win=win, meters=[tokens])["meters"][0]
    assert elsewhere["units"] == "1000000"

    with pytest.raises(BadQuery):
        service.usage(project_id="prj_u", win=Window(datetime(2020, 1, 1, tzinfo=UTC), start),
                      granularity="minute", meters=meters)
    with pytest.raises(BadQuery):
        service.usage(project_id="prj_u", win=win, granularity="day", meters=[tokens],
                      group_by="data.x'); DROP TABLE t; --")
