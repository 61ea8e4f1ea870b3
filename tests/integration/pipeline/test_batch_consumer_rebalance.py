"""The streams worker's batching consumer (streams/batch_consumer.py) on the real broker, during a rebalance.

``on_assign`` runs the runtime's hook on the event loop and waits for it inside librdkafka's callback; meanwhile
librdkafka blocks some calls on the same handle (``get_watermark_offsets`` waited out a 5 s callback, measured). The
event loop reads lag through ``high_watermark`` once a second, so that read must never reach librdkafka: it did, the
two waited for each other until the callback's 60 s timeout, and the worker exited (the kill -9 suite, 2026-12-07)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from streams.batch_consumer import BatchConsumer, Record

pytestmark = pytest.mark.integration


def test_the_event_loop_reads_high_watermarks_while_a_rebalance_callback_waits_for_it(engines: Any) -> None:
    bootstrap = engines.kafka_bootstrap_servers
    topic = f"rebalance-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(timeout=30)
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(10):
        producer.produce(topic, b"event", partition=i % 2)
    assert producer.flush(30) == 0

    async def scenario() -> tuple[dict[str, Any], list[Record], list[int | None]]:
        seen: dict[str, Any] = {}

        def on_assigned(assigned: set[Any]) -> None:  # on the loop, while the consumer's thread waits in on_assign
            started = time.monotonic()
            seen["highs"] = sorted((tp.partition, consumer.high_watermark(tp.partition)) for tp in assigned)
            seen["took_s"] = time.monotonic() - started

        consumer = BatchConsumer(bootstrap=bootstrap, group_id=f"g-{topic}", topic=topic, session_timeout_s=6.0,
                                 max_fetch_bytes=1 << 20, on_assigned=on_assigned)
        await consumer.start()
        records: list[Record] = []
        deadline = time.monotonic() + 40
        try:
            while len(records) < 10 and time.monotonic() < deadline:
                records += await consumer.take(100, 0.5, bytes_max=1 << 20)
            return seen, records, [consumer.high_watermark(p) for p in (0, 1)]
        finally:
            consumer.close_sync()

    seen, records, highs = asyncio.run(scenario())
    assert seen["took_s"] < 1.0, seen  # answered from the last batch's view, not by librdkafka
    assert seen["highs"] == [(0, None), (1, None)]  # nothing consumed yet when the first assignment lands
    assert sorted((r.partition, r.offset) for r in records) == sorted((p, o) for p in (0, 1) for o in range(5))
    assert highs == [5, 5]  # and known after the batches
