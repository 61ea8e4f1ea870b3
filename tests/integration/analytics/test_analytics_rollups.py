"""The rollups stay exact under redelivery. Transactions (projection ``flows_by_hour``, schema 0007): the outbox
relay publishing transactions twice, a full replay by a fresh consumer group, windows whose edges cut hours (raw
rows there, rollup rows elsewhere). Usage per subject (by_subject_day, by_subject_meter_day): top consumers and a
subject's series before and after a replay. Expected values are computed in Python from what was sent."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from analytics_testkit import usage_event

from analytics.client import ClientPool
from analytics.meter_units import MeterSpec, MeterVersion
from analytics.queries import ISSUED_KINDS, SPENT_KINDS, Analytics, Window, split_hours
from ledger.contracts import TOPIC_LEDGER_TRANSACTIONS
from streams.contracts import TOPIC_USAGE_EVENTS

pytestmark = pytest.mark.integration

T0 = datetime(2026, 10, 31, 20, 0, tzinfo=UTC)  # the rows straddle a month partition boundary
KINDS = [("top_up", 1), ("subscription_grant", 1), ("bonus", 1), ("promo", 1), ("refund", 1), ("usage", -1),
         ("usage", 1), ("debit", -1), ("reservation_commit", -1), ("expiry", -1), ("adjustment", 1),
         ("adjustment", -1)]
SOURCE = {"top_up": "top_up", "subscription_grant": "subscription", "bonus": "bonus", "promo": "promo",
          "refund": "refund"}


def _transactions(project: str, count: int) -> list[dict[str, Any]]:
    rng = random.Random(3)
    out = []
    for n in range(1, count + 1):
        kind, sign = rng.choice(KINDS)
        wallet = f"w{rng.randint(1, 7)}"
        out.append({"transaction_id": n, "project_id": project, "wallet_id": wallet, "kind": kind,
                    "amount_minor": sign * rng.randint(1, 5_000), "balance_before_minor": 0,
                    "balance_after_minor": 0, "idempotency_key": f"k{n}",
                    "bucket_source": SOURCE.get(kind),
                    "created_at": (T0 + timedelta(seconds=rng.randint(0, 9 * 3600))).isoformat()})
    return out


def _expected(rows: list[dict[str, Any]], win: Window) -> dict[str, Any]:
    def at(r: dict[str, Any]) -> datetime:
        return datetime.fromisoformat(r["created_at"])

    inside = [r for r in rows if win.start <= at(r) < win.end]
    issued = [r for r in inside if r["kind"] in ISSUED_KINDS or (r["kind"] == "adjustment" and r["amount_minor"] > 0)]
    sources: dict[str, int] = {}
    for r in issued:
        source = r["bucket_source"] or "adjustment"
        sources[source] = sources.get(source, 0) + r["amount_minor"]
    return {
        "issued_minor": sum(r["amount_minor"] for r in issued),
        "spent_minor": -sum(r["amount_minor"] for r in inside if r["kind"] in SPENT_KINDS),
        "expired_minor": -sum(r["amount_minor"] for r in inside if r["kind"] == "expiry"),
        "adjusted_out_minor": -sum(r["amount_minor"] for r in inside
                                   if r["kind"] == "adjustment" and r["amount_minor"] < 0),
        "net_movement_minor": sum(r["amount_minor"] for r in inside), "transactions": len(inside),
        "outstanding_start_minor": sum(r["amount_minor"] for r in rows if at(r) < win.start),
        "sources": sources}


def _check(service: Analytics, project: str, rows: list[dict[str, Any]]) -> None:
    windows = [Window(T0, T0 + timedelta(hours=9)),  # whole hours: rollup only
               Window(T0 + timedelta(minutes=17), T0 + timedelta(hours=6, minutes=41)),  # both edges cut hours
               Window(T0 + timedelta(hours=3, minutes=5), T0 + timedelta(hours=3, minutes=50)),  # inside one hour
               Window(T0 + timedelta(hours=3, minutes=59, seconds=59), T0 + timedelta(hours=8))]
    for win in windows:
        want = _expected(rows, win)
        got = service.wallet_summary(project_id=project, win=win)
        assert {k: got[k] for k in want if k != "sources"} == {k: v for k, v in want.items() if k != "sources"}, win
        assert {s["source"]: s["issued_minor"] for s in got["sources"]} == want["sources"], win
        assert got["outstanding_end_minor"] == want["outstanding_start_minor"] + want["net_movement_minor"]
        breakdown = service.source_breakdown(project_id=project, win=win)
        assert {s["source"]: s["issued_minor"] for s in breakdown["sources"]} == want["sources"], win
        for granularity in ("minute", "hour", "day"):
            flow = service.credit_flow(project_id=project, win=win, granularity=granularity)["series"]
            assert sum(b["net_movement_minor"] for b in flow) == want["net_movement_minor"], (win, granularity)
            assert sum(b["issued_minor"] for b in flow) == want["issued_minor"], (win, granularity)
            assert sum(b["transactions"] for b in flow) == want["transactions"], (win, granularity)
        top = service.top_wallets(project_id=project, win=win, limit=100)["wallets"]
        assert sum(w["spent_minor"] for w in top) == want["spent_minor"]
        wallet = rows[0]["wallet_id"]
        mine = [r for r in rows if r["wallet_id"] == wallet]
        one = service.wallet_summary(project_id=project, win=win, wallet_id=wallet)
        assert (one["net_movement_minor"], one["outstanding_start_minor"]) == (
            _expected(mine, win)["net_movement_minor"], _expected(mine, win)["outstanding_start_minor"])


def _rollup_totals(ch: Any, db: str, project: str) -> tuple[int, int]:
    """Read the projection itself (the query fails if ClickHouse would not use it)."""
    total, count = ch.query(
        f"SELECT sum(amount), sum(n) FROM (SELECT toStartOfHour(created_at) AS h, kind, bucket_source, "
        f"amount_minor > 0 AS pos, sum(amount_minor) AS amount, count() AS n FROM `{db}`.ledger_transactions "
        "WHERE project_id = {p:String} GROUP BY h, kind, bucket_source, pos)", parameters={"p": project},
        settings={"force_optimize_projection_name": "flows_by_hour"}).result_rows[0]
    return int(total), int(count)


def test_transaction_rollup_counts_each_transaction_once_under_redelivery(topics, producer, ch, analytics_settings,
                                                                          run_sink):
    project = "prj_r"
    rows = _transactions(project, 400)
    tx_topic = topics.name(TOPIC_LEDGER_TRANSACTIONS)
    for row in rows:  # the relay ...
        producer.send(tx_topic, row, key=row["wallet_id"])
    for row in rows[::2]:  # ... and a relay that crashed before marking half of them published: copies later
        producer.send(tx_topic, row, key=row["wallet_id"])
    for i in range(0, 60, 6):  # a packed message repeating transactions already sent
        producer.send(tx_topic, rows[i:i + 6], key=rows[i]["wallet_id"])
    producer.flush()
    messages = len(rows) + len(rows[::2]) + 10
    first = run_sink()
    first.wait_messages({tx_topic: messages})
    first.stop()
    db = analytics_settings.database
    want = (sum(r["amount_minor"] for r in rows), len(rows))
    assert ch.query(f"SELECT count() FROM `{db}`.ledger_transactions").result_rows[0][0] == len(rows)
    assert _rollup_totals(ch, db, project) == want
    assert first.sink.stats.transactions_already_stored == len(rows[::2]) + 60

    pool = ClientPool(analytics_settings.clickhouse_url, size=1)
    try:
        service = Analytics(analytics_settings, pool)
        _check(service, project, rows)

        # A fresh consumer group re-reads everything (an insert whose offsets were never committed, at scale).
        replay = run_sink(group_id=f"replay-{uuid.uuid4().hex[:6]}")
        replay.wait_messages({tx_topic: messages})
        replay.stop()
        assert replay.sink.stats.inserted_rows == {}
        assert ch.query(f"SELECT count() FROM `{db}`.ledger_transactions").result_rows[0][0] == len(rows)
        assert _rollup_totals(ch, db, project) == want
        _check(service, project, rows)

        # Merges (which rebuild the rollup from the merged rows) change nothing either.
        ch.command(f"OPTIMIZE TABLE `{db}`.ledger_transactions FINAL")
        assert _rollup_totals(ch, db, project) == want
        _check(service, project, rows)
    finally:
        pool.close()


def test_split_hours_covers_a_range_exactly_once_and_keeps_rollup_hours_whole():
    rng = random.Random(9)
    base = datetime(2026, 11, 1, tzinfo=UTC)
    for _ in range(500):
        points = sorted(base + timedelta(minutes=rng.choice([rng.randint(0, 600), 60 * rng.randint(0, 10)]))
                        for _ in range(3))
        lo, cut, hi = points
        if lo == hi:
            continue
        unbounded = rng.random() < 0.3
        split = split_hours(None if unbounded else lo, hi, (cut,))
        for a, b in split.rollup:
            assert (a is None or a.minute == 0) and b.minute == 0
            if cut.minute:  # a cut inside an hour: that hour is raw, never in a rollup range
                assert not ((a is None or a < cut) and cut < b), "a rollup range must not split an hour"
        for a, b in split.raw:
            assert a < b <= a.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        moment = (base - timedelta(hours=3)) if unbounded else lo
        while moment < hi:
            covered = sum((a is None or a <= moment) and moment < b for a, b in split.rollup)
            covered += sum(a <= moment < b for a, b in split.raw)
            assert covered == 1, (lo, cut, hi, moment, split)
            moment += timedelta(minutes=1)


def test_per_subject_rollups_match_the_events_under_replay(topics, producer, ch, analytics_settings, run_sink):
    """Top consumers and one subject's daily series (per-subject projections) give the totals of the events
    sent, also after a full replay by a fresh consumer group."""
    rng = random.Random(21)
    start = datetime(2026, 10, 20, tzinfo=UTC)
    events = [usage_event(project="prj_m", subject=f"s{rng.randint(1, 12)}", type_=rng.choice(["tokens", "images"]),
                          units=str(Decimal(rng.randint(1, 999)) / 4),
                          time_=start + timedelta(minutes=rng.randint(0, 46 * 24 * 60)))
              for _ in range(600)]
    usage_topic = topics.name(TOPIC_USAGE_EVENTS)
    for i in range(0, len(events), 5):
        producer.send(usage_topic, events[i:i + 5], key=str(i))
    producer.flush()
    messages = {usage_topic: len(events) // 5}
    sink = run_sink()
    sink.wait_messages(messages)
    sink.stop()

    def day(m: int, d: int) -> datetime:
        return datetime(2026, m, d, tzinfo=UTC)

    windows = [Window(day(11, 1), day(12, 1)), Window(day(10, 22), day(12, 4)), Window(day(11, 10), day(11, 20))]

    meters = [MeterSpec(id=f"mtr_{t}", slug=t, group_by=(), event_type=t, versions=(
        MeterVersion(t, "SUM", "$.units", (), datetime(2020, 1, 1, tzinfo=UTC), None),)) for t in ("images", "tokens")]

    def check(service: Analytics) -> None:
        for win in windows:
            inside = [e for e in events if win.start <= datetime.fromisoformat(e["time"]) < win.end]
            counts: dict[str, int] = {}
            units: dict[str, Decimal] = {}
            for e in inside:
                counts[e["subject"]] = counts.get(e["subject"], 0) + 1
                if e["type"] == "images":
                    units[e["subject"]] = units.get(e["subject"], Decimal(0)) + Decimal(e["data"]["units"])
            everyone = service.top_consumers(project_id="prj_m", win=win, limit=100)["consumers"]
            assert {c["subject"]: c["events"] for c in everyone} == counts, win
            images = service.top_consumers(project_id="prj_m", win=win, meter=meters[0], limit=5)["consumers"]
            assert [(c["subject"], Decimal(c["units"])) for c in images] == sorted(
                units.items(), key=lambda kv: (-kv[1], kv[0]))[:5], win
            series = service.usage(project_id="prj_m", win=win, granularity="day", subject="s3",
                                   meters=meters)["series"]
            per_day: dict[tuple[str, str], Decimal] = {}
            for e in inside:
                if e["subject"] == "s3":
                    bucket = datetime.fromisoformat(e["time"]).replace(hour=0, minute=0, second=0).isoformat()
                    per_day[(bucket, e["type"])] = per_day.get((bucket, e["type"]), Decimal(0)) + Decimal(
                        e["data"]["units"])
            assert {(p["bucket"], p["group"]): Decimal(p["units"]) for p in series if p["events"]} == per_day, win

    pool = ClientPool(analytics_settings.clickhouse_url, size=1)
    try:
        check(Analytics(analytics_settings, pool))
        replay = run_sink(group_id=f"replay-{uuid.uuid4().hex[:6]}")
        replay.wait_messages(messages)
        replay.stop()
        assert replay.sink.stats.inserted_rows == {}
        check(Analytics(analytics_settings, pool))
    finally:
        pool.close()
