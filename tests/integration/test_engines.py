"""The suite's engines are real: a broker that stores and returns messages, a PostgreSQL, a ClickHouse."""

from __future__ import annotations

import psycopg
import pytest

from ledger.db import libpq_url
from ledger.kafka import make_consumer, make_producer

pytestmark = pytest.mark.integration


def test_each_test_gets_its_own_migrated_database(database_url: str) -> None:
    with psycopg.connect(libpq_url(database_url)) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        versions = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name LIKE 'alembic_version_%'"
        ).fetchone()
    assert name is not None and name[0].startswith("t_")
    assert versions is not None and versions[0] >= 1


def test_broker_round_trips_messages_on_the_test_topics(topics) -> None:  # type: ignore[no-untyped-def]
    topic = topics.name("usage.events.v1")
    producer = make_producer(topics.bootstrap)
    for i in range(20):
        producer.produce(topic, key=f"s{i % 3}", value=f"m{i}".encode())
    assert producer.flush(15) == 0
    consumer = make_consumer(topics.bootstrap, f"g-{topics.prefix}")
    consumer.subscribe([topic])
    seen: list[bytes] = []
    for _ in range(60):
        seen += [m.value() for m in consumer.consume(100, 0.5) if m.error() is None]
        if len(seen) >= 20:
            break
    consumer.close()
    assert sorted(seen) == sorted(f"m{i}".encode() for i in range(20))


def test_clickhouse_engine_answers(engines) -> None:  # type: ignore[no-untyped-def]
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=engines.clickhouse_url)
    assert client.query("SELECT 40 + 2").result_rows == [(42,)]
