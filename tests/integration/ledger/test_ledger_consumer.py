"""The ledger consumer and outbox relay end to end on the real broker and PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, text

from ledger import queries
from ledger.consumer import MigrationsPending, check_startup, run
from ledger.contracts import (
    TOPIC_LEDGER_CHARGES,
    TOPIC_LEDGER_TRANSACTIONS,
    ChargeCheckpoint,
    CounterKey,
    CounterValue,
    PriceModel,
    TransactionPosted,
)
from ledger.db import libpq_url
from ledger.kafka import MissingTopicsError, make_consumer, make_producer
from ledger.settings import LedgerSettings

pytestmark = pytest.mark.integration

SOURCE = "usage.events.v1"
PERIOD = datetime(2026, 11, 1, tzinfo=UTC)
PRICE = PriceModel(model="per_unit", unit_price_minor=Decimal("0.4"))


def _settings(database_url: str, topics) -> LedgerSettings:  # type: ignore[no-untyped-def]
    return LedgerSettings.model_validate({
        "DATABASE_URL": database_url, "KAFKA_BOOTSTRAP_SERVERS": topics.bootstrap,
        "METERLINE_TOPIC_PREFIX": topics.prefix, "consumer_group": f"ledger-{uuid.uuid4().hex[:8]}",
        "outbox_poll_ms": 50, "db_pool_size": 3,
    })


def _checkpoint(partition: int, as_of: int, units: dict[str, int]) -> bytes:
    return ChargeCheckpoint(
        source_topic=SOURCE, partition=partition, as_of_offset=as_of, emitted_at=datetime.now(UTC),
        counters=[CounterValue(key=CounterKey(wallet_id=w, project_id="p1", meter_id="tokens", period_start=PERIOD,
                                              price_version_id="v1"), units=Decimal(u), price=PRICE, events=u)
                  for w, u in units.items()],
    ).model_dump_json().encode()


def _wait(predicate: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_consumer_applies_checkpoints_once_and_relays_transactions(engine: Engine, database_url: str, topics,  # type: ignore[no-untyped-def]
                                                                   invariants: Callable[[], None]) -> None:
    settings = _settings(database_url, topics)
    charges = topics.name(TOPIC_LEDGER_CHARGES)
    producer = make_producer(topics.bootstrap)
    # source partition 0 → charges partition 0, source partition 1 → charges partition 1 (per-partition order)
    sends: list[tuple[int, bytes]] = [
        (0, _checkpoint(0, 10, {"A": 90, "B": 10})),      # A −36, B −4
        (0, _checkpoint(0, 10, {"A": 90, "B": 10})),      # duplicate delivery → stale
        (0, _checkpoint(0, 20, {"A": 93})),                # A −1
        (0, _checkpoint(0, 15, {"A": 500})),               # older than 20 → stale
        (1, _checkpoint(1, 5, {"A": 7, "C": 25})),         # A merged: 100 → 40 total, so −3; C −10
    ]
    for partition, value in sends:
        producer.produce(charges, value=value, partition=partition)
    assert producer.flush(15) == 0

    stop = threading.Event()
    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.update(stats=run(settings, stop)), daemon=True)
    thread.start()
    try:
        with engine.connect() as conn:
            def applied() -> bool:
                conn.rollback()
                return queries.applied_offsets(conn, SOURCE, [0, 1]) == {0: 20, 1: 5}
            _wait(applied, timeout_s=60, what="checkpoints applied")

            def published() -> bool:
                conn.rollback()
                return conn.execute(text("SELECT count(*) FROM outbox WHERE published_at IS NULL")).scalar() == 0
            _wait(published, timeout_s=30, what="outbox published")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    stats = result["stats"]
    assert (stats.applied, stats.stale, stats.undecodable) == (3, 2, 0)  # undecodable: test_ledger_halts.py  # type: ignore[attr-defined]

    with engine.connect() as conn:
        balances = {w: queries.get_balance(conn, w).balance_minor for w in "ABC"}  # type: ignore[union-attr]
        tx_ids = set(conn.execute(text("SELECT id FROM transactions")).scalars())
    assert balances == {"A": -40, "B": -4, "C": -10}  # usage beyond an empty wallet is debt, never dropped

    consumer = make_consumer(topics.bootstrap, f"check-{uuid.uuid4().hex[:8]}")
    consumer.subscribe([topics.name(TOPIC_LEDGER_TRANSACTIONS)])
    events: list[TransactionPosted] = []
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and {e.transaction_id for e in events} != tx_ids:
        for m in consumer.consume(100, 0.5):
            if m.error() is None:
                event = TransactionPosted.model_validate_json(m.value())
                assert m.key() == event.wallet_id.encode()
                events.append(event)
    consumer.close()
    # the consumer fetched partition 0's checkpoints together (merged: one transaction for 10 → 20) or apart
    assert {e.transaction_id for e in events} == tx_ids and len(tx_ids) == stats.transactions in (4, 5)  # type: ignore[attr-defined]
    a_events = sorted(e.amount_minor for e in {e.transaction_id: e for e in events}.values() if e.wallet_id == "A")
    # the two partitions' order is free: 90 → 93 → 100 posts −1, −3; 90 → 97 → 100 posts −2, −2;
    # merged (partition 0 at 93 in one step): 93 → 100 posts −37, −3; 7 → 100 posts −2, −38
    assert a_events in ([-36, -3, -1], [-36, -2, -2], [-37, -3], [-38, -2]) and sum(a_events) == -40
    assert len(a_events) == len(tx_ids) - 2  # B and C once each
    invariants()


def test_start_up_refuses_missing_topics_and_pending_migrations(engines, database_url: str, topics) -> None:  # type: ignore[no-untyped-def]
    settings = _settings(database_url, topics)
    missing = settings.model_copy(update={"topic_prefix": f"absent{uuid.uuid4().hex[:6]}."})
    with pytest.raises(MissingTopicsError):
        check_startup(missing)
    empty = f"empty_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(libpq_url(engines.admin_database_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{empty}"')
    try:
        from sqlalchemy.engine import make_url

        url = make_url(settings.database_url.replace("postgresql://", "postgresql+psycopg://", 1)).set(database=empty)
        unmigrated = settings.model_copy(update={"database_url": url.render_as_string(hide_password=False)})
        with pytest.raises(MigrationsPending, match="meterline migrate"):
            check_startup(unmigrated)
    finally:
        with psycopg.connect(libpq_url(engines.admin_database_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{empty}" WITH (FORCE)')


def test_meterline_run_ledger_applies_and_stops_cleanly_on_sigterm(engine: Engine, stack_env: dict[str, str],  # type: ignore[no-untyped-def]
                                                                   topics) -> None:
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    producer = make_producer(topics.bootstrap)
    producer.produce(topics.name(TOPIC_LEDGER_CHARGES), value=_checkpoint(0, 3, {"Z": 10}), partition=0)
    assert producer.flush(15) == 0
    meterline = Path(sys.executable).parent / "meterline"
    env = {**os.environ, **stack_env, "LEDGER_CONSUMER_GROUP": f"ledger-{uuid.uuid4().hex[:8]}"}
    process = subprocess.Popen([str(meterline), "run", "ledger"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        with engine.connect() as conn:
            def applied() -> bool:
                conn.rollback()
                assert process.poll() is None, process.stdout.read().decode()  # type: ignore[union-attr]
                return queries.applied_offsets(conn, SOURCE, [0]) == {0: 3}
            _wait(applied, timeout_s=60, what="the subprocess to apply the checkpoint")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = process.stdout.read().decode()  # type: ignore[union-attr]
    assert "ledger_consumer_signal" in output and "ledger_consumer_stopping" in output
    with engine.connect() as conn:
        assert queries.get_balance(conn, "Z").balance_minor == -4  # type: ignore[union-attr]


def test_two_consumers_in_one_group_share_and_hand_over_partitions(engine: Engine, database_url: str,  # type: ignore[no-untyped-def]
                                                                   topics, invariants: Callable[..., None]) -> None:
    settings = _settings(database_url, topics)
    charges = topics.name(TOPIC_LEDGER_CHARGES)
    producer = make_producer(topics.bootstrap)
    rounds = 30

    def produce(first: int, last: int) -> None:  # cumulative units grow by 5 per checkpoint per partition
        for as_of in range(first, last + 1):
            for partition in (0, 1):
                producer.produce(charges, partition=partition,
                                 value=_checkpoint(partition, as_of, {f"S{partition}": 5 * as_of, "shared": as_of}))
        assert producer.flush(15) == 0

    stops = [threading.Event(), threading.Event()]
    stats: list[dict[str, object]] = [{}, {}]
    threads = [threading.Thread(target=lambda i=i: stats[i].update(s=run(settings, stops[i])), daemon=True)
               for i in (0, 1)]
    for thread in threads:
        thread.start()
    time.sleep(10)  # both join the group (join ≈ session timeout / 2, then a rebalance for the second)
    try:
        with engine.connect() as conn:
            def applied_through(n: int) -> Callable[[], bool]:
                def check() -> bool:
                    conn.rollback()
                    return queries.applied_offsets(conn, SOURCE, [0, 1]) == {0: n, 1: n}
                return check
            produce(1, rounds // 2)
            _wait(applied_through(rounds // 2), timeout_s=60, what="phase 1 applied by both consumers")
            stops[0].set()  # one consumer leaves; the other must take over its partition
            threads[0].join(timeout=30)
            produce(rounds // 2 + 1, rounds)
            _wait(applied_through(rounds), timeout_s=90, what="the survivor to apply phase 2")
    finally:
        for stop in stops:
            stop.set()
        for thread in threads:
            thread.join(timeout=30)
    first, second = stats[0]["s"], stats[1]["s"]
    assert first.applied > 0 and second.applied > 0, (first, second)  # type: ignore[attr-defined]
    assert first.applied + second.applied == 2 * rounds  # type: ignore[attr-defined]
    expected = {"S0": int(Decimal(5 * rounds) * Decimal("0.4")), "S1": int(Decimal(5 * rounds) * Decimal("0.4")),
                "shared": int(Decimal(2 * rounds) * Decimal("0.4"))}
    with engine.connect() as conn:
        charged = {w: -queries.get_balance(conn, w).balance_minor for w in expected}  # type: ignore[union-attr]
    assert charged == expected
    invariants()


def test_usage_left_unsettled_is_counted_at_once_and_posted_when_the_consumer_settles(  # type: ignore[no-untyped-def]
        engine: Engine, database_url: str, topics, invariants: Callable[[], None]) -> None:
    """LEDGER_USAGE_SETTLE_INTERVAL_S > 0: the consumer prices the checkpoints and counts them against the wallets
    (``unsettled_minor``) without posting; a consumer started with the setting back at 0 posts what was left at
    start, one usage transaction per key, before it applies anything new."""
    charges = topics.name(TOPIC_LEDGER_CHARGES)
    producer = make_producer(topics.bootstrap)
    for partition, value in [(0, _checkpoint(0, 10, {"A": 90, "B": 10})), (0, _checkpoint(0, 20, {"A": 93})),
                             (1, _checkpoint(1, 5, {"A": 7, "C": 25}))]:
        producer.produce(charges, value=value, partition=partition)
    assert producer.flush(15) == 0

    def run_until(settings: LedgerSettings, done: Callable[[Any], bool], what: str) -> None:
        stop = threading.Event()
        thread = threading.Thread(target=run, args=(settings, stop), daemon=True)
        thread.start()
        try:
            with engine.connect() as conn:
                def check() -> bool:
                    conn.rollback()
                    return done(conn)
                _wait(check, timeout_s=60, what=what)
        finally:
            stop.set()
            thread.join(timeout=30)
        assert not thread.is_alive()

    group = f"ledger-{uuid.uuid4().hex[:8]}"
    later = _settings(database_url, topics).model_copy(update={"usage_settle_interval_s": 3600.0,
                                                               "consumer_group": group})
    run_until(later, lambda conn: queries.applied_offsets(conn, SOURCE, [0, 1]) == {0: 20, 1: 5}, "applied")
    with engine.connect() as conn:
        views = {w: queries.get_balance(conn, w) for w in "ABC"}
        usage = conn.execute(text("SELECT count(*) FROM transactions WHERE kind = 'usage'")).scalar()
    assert usage == 0
    assert {w: (v.balance_minor, v.unsettled_minor, v.debt_minor, v.blocked)  # type: ignore[union-attr]
            for w, v in views.items()} == {"A": (0, 40, 40, True), "B": (0, 4, 4, True), "C": (0, 10, 10, True)}
    invariants()

    at_once = _settings(database_url, topics).model_copy(update={"consumer_group": group})
    run_until(at_once, lambda conn: conn.execute(text(
        "SELECT count(*) FROM usage_charges WHERE charged_minor <> posted_minor")).scalar() == 0, "settled at start")
    with engine.connect() as conn:
        balances = {w: (v.balance_minor, v.unsettled_minor)  # type: ignore[union-attr]
                    for w in "ABC" if (v := queries.get_balance(conn, w)) is not None}
        keys = conn.execute(text("SELECT idempotency_key FROM transactions WHERE kind = 'usage'")).scalars().all()
    assert balances == {"A": (-40, 0), "B": (-4, 0), "C": (-10, 0)}  # debt, never dropped, once posted
    assert len(keys) == 3 and all(k.startswith("usage:settle:1:") for k in keys)  # one posting per key
    invariants()
