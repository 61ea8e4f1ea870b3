"""Kafka client settings every component uses, in one place (DESIGN §5: this broker's measured quirks).

- Consumers: manual commits only, ``fetch.queue.backoff.ms`` lowered from librdkafka's 1 s (which left
  ~0.8 s idle gaps here), ``fetch.wait.max.ms`` lowered from 500 ms (a message produced into an idle
  partition waited ~115 ms median for the fetch to return), short session timeouts so group joins take
  seconds.
- Producers: idempotent, ``acks=all``: a send is done only when the broker has it.
- ``require_topics`` makes a missing topic a loud start-up error instead of a silent stall.
"""

from __future__ import annotations

import os
import time
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient


class MissingTopicsError(RuntimeError):
    code = "kafka.missing_topics"

    def __init__(self, missing: list[str], bootstrap: str) -> None:
        self.missing = missing
        super().__init__(
            f"topics {', '.join(sorted(missing))} do not exist on {bootstrap}. "
            "Run `meterline topics create` (or `meterline up`, which creates them) before starting this process."
        )


def message_position(message: Message) -> tuple[str, int, int]:
    """(topic, partition, offset) of a consumed message without an error: librdkafka's accessors are typed
    optional because an error event has none of them; a delivered message always has all three."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None, "an error event has no position"
    return topic, partition, offset


def topic_name(base: str, prefix: str = "") -> str:
    """Topic names may carry a deployment prefix (tests use one per run so they never share topics)."""
    return f"{prefix}{base}"


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """``KAFKA_PRODUCER_IDEMPOTENCE=false`` (set by `meterline up` for the embedded broker, read per call) turns
    idempotence off: Tansu 0.6 advances a producer's sequence before it writes the batch, so a broker killed in
    between answers the retry DuplicateSequenceNumber, which librdkafka takes for success — an acknowledged
    message that was never stored. Without idempotence a retry after a crash is written again instead; every
    consumer tolerates that (usage events are deduped by id, checkpoints are cumulative, outbox rows at least
    once)."""
    idempotent = os.environ.get("KAFKA_PRODUCER_IDEMPOTENCE", "true").strip().lower() not in ("false", "0", "no")
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": idempotent,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        "message.timeout.ms": 30_000,
        # at most 5 requests in flight per connection, as idempotence implies (Java's default too). Without
        # idempotence librdkafka allows 1,000,000: it then sends every linger window's few messages as a request
        # of their own, and the embedded broker, which writes each partition's batch as objects in turn, falls
        # behind on the request count, not the bytes — measured at 2,000 one-event messages/s: p50 1,827 ms
        # send→ack with the default, 12 ms with 5 (`python -m bench.broker_produce --client meterline`). With a
        # bound, batches grow while requests wait, which is what keeps a slow broker at low latency.
        "max.in.flight.requests.per.connection": 5,
    }
    config.update(overrides)
    return config


def consumer_config(bootstrap: str, group_id: str, *, session_timeout_ms: int = 6_000, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": session_timeout_ms,
        "heartbeat.interval.ms": max(500, session_timeout_ms // 3),
        "fetch.queue.backoff.ms": 10,
        # the broker answers a fetch only late in its max wait when it had nothing at first (measured on
        # Tansu, one message produced at a random time: 500 ms default -> 115 ms median, up to 458 ms, to
        # receive it; 50 ms -> 0.7 ms): at most one cheap empty fetch per 50 ms while idle
        "fetch.wait.max.ms": 50,
        "isolation.level": "read_uncommitted",  # no transactions anywhere (DESIGN §2.1)
    }
    config.update(overrides)
    return config


def make_producer(bootstrap: str, **overrides: Any) -> Producer:
    return Producer(producer_config(bootstrap, **overrides))


def make_consumer(bootstrap: str, group_id: str, **overrides: Any) -> Consumer:
    return Consumer(consumer_config(bootstrap, group_id, **overrides))


def existing_topics(bootstrap: str, *, timeout_s: float = 10.0) -> dict[str, int]:
    """Topic name -> partition count."""
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=timeout_s)
    return {name: len(t.partitions) for name, t in metadata.topics.items() if not t.error}


def require_topics(bootstrap: str, names: list[str], *, timeout_s: float = 10.0) -> dict[str, int]:
    present = existing_topics(bootstrap, timeout_s=timeout_s)
    missing = [n for n in names if n not in present]
    if missing:
        raise MissingTopicsError(missing, bootstrap)
    return {n: present[n] for n in names}


class LagRecorder:
    """``meterline_consumer_lag_messages`` for a confluent consumer's assigned partitions (ledger/metrics.py says
    what it means). The next offset is the consumer's position (the offset after the last message handed to the
    process); before the process has taken any message of a partition it is the group's committed offset, read
    once per assignment. The high watermark is librdkafka's cached value from the latest fetch response: no
    request to the broker, whose ListOffsets answer is wrong here (DESIGN §5)."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.assigned: set[tuple[str, int]] = set()
        self._committed: dict[tuple[str, int], int] = {}
        self._committed_retry_at = 0.0

    def assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.assigned.add((tp.topic, tp.partition))
            self._committed.pop((tp.topic, tp.partition), None)

    def revoke(self, partitions: list[TopicPartition]) -> None:
        from ledger.metrics import forget_lag

        for tp in partitions:
            self.assigned.discard((tp.topic, tp.partition))
            self._committed.pop((tp.topic, tp.partition), None)
            forget_lag(self.group, tp.topic, tp.partition)

    def record(self, consumer: Consumer) -> None:
        from ledger.metrics import record_lag

        if not self.assigned:
            return
        try:
            positions = consumer.position([TopicPartition(t, p) for t, p in sorted(self.assigned)])
        except KafkaException:
            return
        unknown = [tp for tp in positions if tp.offset < 0 and (tp.topic, tp.partition) not in self._committed]
        if unknown and time.monotonic() >= self._committed_retry_at:
            # a blocking request to the group coordinator, so at most once per assignment (and after a failure
            # not again for 30 s): the consume loop that calls this must not stall on it
            try:
                for tp in consumer.committed(unknown, timeout=1):
                    self._committed[(tp.topic, tp.partition)] = max(tp.offset, 0)
            except KafkaException:
                self._committed_retry_at = time.monotonic() + 30.0
        for tp in positions:
            next_offset = tp.offset if tp.offset >= 0 else self._committed.get((tp.topic, tp.partition), -1)
            _low, high = consumer.get_watermark_offsets(tp, cached=True)
            record_lag(self.group, tp.topic, tp.partition, next_offset=next_offset, high_watermark=high)
