"""End-to-end scenarios with real processes: duplicates across a restart, out-of-order and late events, two
workers with a rebalance mid-run (many wallets, one hot wallet), malformed events to the DLQ, and a catalog
change picked up by a running worker. Expected values are computed here from what was sent."""

from __future__ import annotations

import base64
import random
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
from pipeline_harness import (
    PROJECT,
    EventProducer,
    Pipeline,
    make_event,
    price_floor,
    read_dlq_messages,
    setup_catalog,
    wallet_of,
)

from analytics.rows import Origin, dead_letter_rows
from ledger.db import make_engine
from streams import catalog
from streams.contracts import DeadLetter, partition_for
from streams.metering import period_bounds

pytestmark = pytest.mark.integration
PRICE = Decimal("0.4")


def expected_balances(events: list[dict[str, Any]], *, lateness_s: int = 3600,
                      arrival: datetime | None = None) -> dict[str, int]:
    """Each distinct id once; a key is (wallet, period); late events go to the arrival's period."""
    arrival = arrival or datetime.now(UTC)
    seen: set[str] = set()
    units: dict[tuple[str, datetime], Decimal] = defaultdict(Decimal)
    for ev in events:
        if ev["id"] in seen:
            continue
        seen.add(ev["id"])
        start, end = period_bounds(datetime.fromisoformat(ev["time"]), "month")
        if arrival > end + timedelta(seconds=lateness_s):
            start, _ = period_bounds(arrival, "month")
        units[(wallet_of(ev["subject"]), start)] += Decimal(ev["data"]["tokens"])
    out: dict[str, int] = defaultdict(int)
    for (wallet, _), u in units.items():
        out[wallet] -= price_floor(u, PRICE)
    return dict(out)


def test_duplicates_resent_after_a_worker_restart_are_charged_once(pipeline: Pipeline) -> None:
    setup_catalog(pipeline.database_url)
    worker = pipeline.start("streams")
    ledger = pipeline.start("ledger")
    producer = EventProducer(pipeline.bootstrap, pipeline.usage_topic, pipeline.partitions)
    first = [make_event(i, f"s{i % 11}", i % 9 + 1) for i in range(2_000)]
    producer.send_packed(first + first[:300], pack=50)
    pipeline.wait_applied(producer.flush().last_offset, timeout_s=90, watch=[worker, ledger])
    worker.kill()
    worker = pipeline.start("streams")
    second = [make_event(i, f"s{i % 11}", i % 9 + 1) for i in range(2_000, 3_000)]
    producer.send_packed(first + second, pack=50)  # everything from before again, plus new events
    for ev in first[:100]:  # and single-event messages keyed by subject, as a foreign producer would send
        producer.send_raw(orjson.dumps(ev), partition=partition_for(ev["subject"], pipeline.partitions),
                          key=ev["subject"].encode())
    pipeline.wait_applied(producer.flush().last_offset, timeout_s=90, watch=[worker, ledger])
    assert pipeline.wallet_balances() == expected_balances(first + second)
    pipeline.assert_ledger_consistent()


def test_out_of_order_and_late_events(pipeline: Pipeline) -> None:
    setup_catalog(pipeline.database_url)
    worker = pipeline.start("streams")
    ledger = pipeline.start("ledger")
    now = datetime.now(UTC)
    rng = random.Random(7)
    on_time = [make_event(i, f"s{i % 5}", rng.randint(1, 20), time=now - timedelta(minutes=rng.uniform(0, 50)))
               for i in range(1_000)]
    rng.shuffle(on_time)
    late = [make_event(10_000 + i, f"s{i % 5}", 7, time=now - timedelta(days=70)) for i in range(40)]
    producer = EventProducer(pipeline.bootstrap, pipeline.usage_topic, pipeline.partitions)
    producer.send_packed(on_time[:500] + late + on_time[500:], pack=40)
    pipeline.wait_applied(producer.flush().last_offset, timeout_s=90, watch=[worker, ledger])
    assert pipeline.wallet_balances() == expected_balances(on_time + late)
    # late events are charged (never dropped) in the current period and marked late
    [(late_events, old_periods)] = pipeline.sql(
        "SELECT coalesce(sum(late_events), 0), count(*) FILTER (WHERE period_start < %s) FROM usage_counters",
        period_bounds(now - timedelta(days=35), "month")[0])
    assert (late_events, old_periods) == (40, 0)
    pipeline.assert_ledger_consistent()


def test_two_workers_with_a_rebalance_mid_run_many_wallets_and_a_hot_one(pipeline: Pipeline) -> None:
    setup_catalog(pipeline.database_url)
    first = pipeline.start("streams", STREAMS_WORKER_INDEX="0")
    ledger = pipeline.start("ledger")
    rng = random.Random(11)
    events = [make_event(i, "hot" if rng.random() < 0.3 else f"w{rng.randrange(2_000)}", rng.randint(1, 9))
              for i in range(40_000)]
    producer = EventProducer(pipeline.bootstrap, pipeline.usage_topic, pipeline.partitions)

    def produce() -> None:
        for start in range(0, len(events), 2_000):
            producer.send_packed(events[start:start + 2_000], pack=100)
            time.sleep(1.0)

    thread = threading.Thread(target=produce)
    thread.start()
    time.sleep(4)
    second = pipeline.start("streams", STREAMS_WORKER_INDEX="1")  # joins: partitions move to it
    time.sleep(8)
    first.stop()  # graceful leave mid-run: its partitions move back to the second worker
    thread.join(timeout=120)
    pipeline.wait_applied(producer.flush().last_offset, timeout_s=120, watch=[second, ledger])
    expected = expected_balances(events)
    assert len(expected) > 1_500
    assert pipeline.wallet_balances() == expected
    pipeline.assert_ledger_consistent()


def test_malformed_events_go_to_the_dlq_with_a_reason_and_the_rest_is_charged(pipeline: Pipeline) -> None:
    setup_catalog(pipeline.database_url)
    worker = pipeline.start("streams")
    ledger = pipeline.start("ledger")
    producer = EventProducer(pipeline.bootstrap, pipeline.usage_topic, pipeline.partitions)
    good = [make_event(i, "alice", 10) for i in range(20)]
    p = partition_for("alice", pipeline.partitions)
    bad_single = {
        "bad_json": b'{"id": "x", "source": ',
        "missing_field": orjson.dumps({k: v for k, v in make_event(900, "alice", 1).items() if k != "id"}),
        "unknown_meter": orjson.dumps(make_event(901, "alice", 1, etype="no.such.meter")),
        "wrong_type": orjson.dumps({**make_event(902, "alice", 1), "subject": 42}),
        "bad_value": orjson.dumps(make_event(903, "alice", "lots")),
        "oversized": orjson.dumps({**make_event(904, "alice", 1), "pad": "x" * 70_000}),
    }
    producer.send_packed(good[:10], pack=10)
    for raw in bad_single.values():
        producer.send_raw(raw, partition=p)
    # a packed message with bad elements among good ones
    producer.send_raw(orjson.dumps([good[10], {"id": "no-project"}, *good[11:15],
                                    make_event(905, "alice", -5), *good[15:]]), partition=p)
    sent = producer.flush()
    pipeline.wait_applied(sent.last_offset, timeout_s=60, watch=[worker, ledger])
    assert pipeline.wallet_balances() == {wallet_of("alice"): -price_floor(Decimal(200), PRICE)}
    messages = read_dlq_messages(pipeline.bootstrap, f"{pipeline.prefix}usage.events.dlq.v1", expected=8)
    letters = [DeadLetter.model_validate_json(value) for value, _ in messages]
    reasons = sorted((d.reason, -1 if d.index is None else d.index) for d in letters)
    assert reasons == sorted([(r, -1) for r in bad_single] + [("missing_field", 1), ("bad_value", 6)])
    by_reason = {d.reason: d for d in letters if d.index is None}
    assert base64.b64decode(by_reason["bad_json"].original_b64) == bad_single["bad_json"]
    assert all(d.source_partition == p and d.source_offset >= 0 for d in letters)
    # every letter whose event names a project carries it (header and body), and analytics files it under
    # that project: the contract the dead-letter API and dashboard page read
    named = [(d, dict(headers)) for d, (_, headers) in zip(letters, messages, strict=True)
             if (d.reason, d.index) not in {("bad_json", None), ("missing_field", 1)}]
    assert len(named) == 6
    assert all(d.project == PROJECT and headers["project"] == PROJECT.encode() for d, headers in named)
    assert by_reason["unknown_meter"].event["type"] == "no.such.meter"  # the event decoded, not a string
    origin = Origin("dlq", 0, 0, datetime.now(UTC))
    projects = sorted(dead_letter_rows(value, headers, origin).rows[0][0] for value, headers in messages)
    assert projects == sorted([""] * 2 + [PROJECT] * 6)


def test_a_catalog_change_is_picked_up_by_a_running_worker(pipeline: Pipeline) -> None:
    ids = setup_catalog(pipeline.database_url)
    worker = pipeline.start("streams")
    ledger = pipeline.start("ledger")
    producer = EventProducer(pipeline.bootstrap, pipeline.usage_topic, pipeline.partitions)
    before = [make_event(i, "bob", 10) for i in range(10)]
    producer.send_packed(before)
    pipeline.wait_applied(producer.flush().last_offset, timeout_s=60, watch=[worker, ledger])
    engine = make_engine(pipeline.database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            price = catalog.add_price_version(conn, project_id=PROJECT, price_id=ids["price_id"],
                                              model={"model": "per_unit", "unit_price_minor": "3"})
            # a new subject key, too: its events go to the named wallet
            catalog.set_subject_key(conn, project_id=PROJECT, subject="carol", wallet_id="wallet-carol")
    finally:
        engine.dispose()
    v2 = price.versions[-1]
    changed_at = time.monotonic()
    # probe until the worker meters with the new version (the catalog refresh period is 500 ms here)
    probe = 0
    while True:
        time.sleep(0.25)
        probe += 1
        producer.send_packed([make_event(5_000 + probe, "probe", 1,
                                         time=max(datetime.now(UTC), v2.effective_from + timedelta(milliseconds=1)))])
        pipeline.wait_applied(producer.flush().last_offset, timeout_s=30, watch=[worker, ledger])
        if pipeline.sql("SELECT 1 FROM usage_charges WHERE price_version_id = %s", v2.id):
            break
        assert time.monotonic() - changed_at < 10, "the running worker did not pick up the new price version"
    after = [make_event(100 + i, "bob", 10, time=datetime.now(UTC)) for i in range(10)]
    after += [make_event(200 + i, "carol", 10, time=datetime.now(UTC)) for i in range(3)]
    producer.send_packed(after)
    pipeline.wait_applied(producer.flush().last_offset, timeout_s=60, watch=[worker, ledger])
    balances = pipeline.wallet_balances()
    assert balances[wallet_of("bob")] == -(price_floor(Decimal(100), PRICE) + 100 * 3)
    assert balances["wallet-carol"] == -90
    rows = pipeline.sql("SELECT DISTINCT price_version_id FROM transactions WHERE wallet_id = %s",
                        "wallet-carol")
    assert rows == [(v2.id,)]
    pipeline.assert_ledger_consistent()


def test_a_value_beyond_the_ledgers_bounds_is_dead_lettered_and_the_partition_keeps_charging(
        pipeline: Pipeline) -> None:
    """Issue 13 item 2: ``"tokens": 10^30`` written out in full was accepted, metered, and the ledger died on
    every restart (``Integer exceeds 64-bit range``) — that partition was never charged again."""
    setup_catalog(pipeline.database_url)
    worker = pipeline.start("streams")
    ledger = pipeline.start("ledger")
    producer = EventProducer(pipeline.bootstrap, pipeline.usage_topic, pipeline.partitions)
    p = partition_for("alice", pipeline.partitions)
    hostile_single = orjson.dumps(make_event(900, "alice", 1)).replace(b'"tokens":1', b'"tokens":1' + b"0" * 30)
    assert b"1000000000000000000000000000000" in hostile_single
    producer.send_packed([make_event(i, "alice", 10) for i in range(10)], pack=5)
    producer.send_raw(hostile_single, partition=p)
    # inside a packed message, between good events: 2^63 (bigint overflow) and 1e300
    producer.send_raw(orjson.dumps([make_event(10, "alice", 10), make_event(901, "alice", 2**63),
                                    make_event(11, "alice", 10)]).replace(b"9223372036854775808", b"1e300"),
                      partition=p)
    producer.send_raw(orjson.dumps([make_event(902, "alice", 2**63), make_event(12, "alice", 10)]), partition=p)
    producer.send_packed([make_event(13 + i, "alice", 10) for i in range(7)] +
                         [make_event(100 + i, "bob", 5) for i in range(4)])
    sent = producer.flush()
    pipeline.wait_applied(sent.last_offset, timeout_s=60, watch=[worker, ledger])
    assert pipeline.wallet_balances() == {wallet_of("alice"): -price_floor(Decimal(200), PRICE),
                                          wallet_of("bob"): -price_floor(Decimal(20), PRICE)}
    letters = [DeadLetter.model_validate_json(value) for value, _ in read_dlq_messages(
        pipeline.bootstrap, f"{pipeline.prefix}usage.events.dlq.v1", expected=3)]
    assert sorted((d.reason, -1 if d.index is None else d.index) for d in letters) == [
        ("value_out_of_range", -1), ("value_out_of_range", 0), ("value_out_of_range", 1)]
    assert all(d.source_partition == p for d in letters)
    assert worker.alive() and ledger.alive()
    pipeline.assert_ledger_consistent()


def test_a_worker_a_day_behind_still_catches_a_retry_also_after_a_restart(pipeline: Pipeline) -> None:
    """Issue 13 item 5: the dedupe horizon was measured against the wall clock, so a worker running 24 h behind
    (outage, slow ledger, replay — Kafka CreateTime is producer-set) forgot each key at the next checkpoint and
    charged a retry twice. Now it is measured in stream time, in memory and when a new owner seeds."""
    setup_catalog(pipeline.database_url)
    worker = pipeline.start("streams")
    ledger = pipeline.start("ledger")
    producer = EventProducer(pipeline.bootstrap, pipeline.usage_topic, pipeline.partitions)
    p = partition_for("alice", pipeline.partitions)
    behind = datetime.now(UTC) - timedelta(hours=25)
    # inside the current month, so the events are on time for their period (not "late")
    behind = max(behind, period_bounds(datetime.now(UTC), "month")[0] + timedelta(minutes=1))

    def send(event_ids: list[int], at: datetime) -> None:
        events = [make_event(i, "alice", 10, time=at) for i in event_ids]
        producer.send_raw(orjson.dumps(events), partition=p, timestamp_ms=int(at.timestamp() * 1000))
        pipeline.wait_applied(producer.flush().last_offset, timeout_s=60, watch=[worker, ledger])

    send([1, 2], behind)
    send([3], behind + timedelta(minutes=1))  # another checkpoint: the wall clock would forget 1 and 2 here
    send([1], behind + timedelta(minutes=2))  # the producer's retry, minutes later in stream time
    assert pipeline.wallet_balances() == {wallet_of("alice"): -price_floor(Decimal(30), PRICE)}
    worker.stop()
    worker = pipeline.start("streams")  # the next owner seeds the keys and measures their horizon the same way
    send([2, 4], behind + timedelta(minutes=3))
    assert pipeline.wallet_balances() == {wallet_of("alice"): -price_floor(Decimal(40), PRICE)}
    pipeline.assert_ledger_consistent()
