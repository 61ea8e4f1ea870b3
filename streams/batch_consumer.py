"""The streams worker's consumer of ``usage.events.v1``: a confluent-kafka consumer taken in batches of thousands
(``consume(num_messages=…)``, C all the way to a list of messages), handed to the faust agent as ONE channel item
per batch, committed only after the batch returned.

Why (tracker issue 17): real producers send one event per message. Through faust's aiokafka consumer every
message paid faust's per-message path (Message, tracking, channel queue, Event, ``take_events``) — the workers
sat between batches 62–83% of the time and the pipeline did ~8.4k events/s at one event per message. Here a
message costs one small ``Record``; faust still runs the app (agent, timers, lifecycle) and gets one item per
batch. Measured: streams/README.md "Consumer" and docs/benchmarks.md.

The replacement of faust's commit/ack/rebalance semantics, and why it keeps the worker's protocol
(streams/worker.py's module doc):

- serial: ``consume`` → the agent meters the batch and waits for its checkpoints' acknowledgement
  (``Runtime.handle_batch``) → commit → ``consume`` again. librdkafka keeps fetching in its own threads
  meanwhile, so nothing is lost by not overlapping.
- commit: after the batch returned, the offset after each partition's last message, asynchronously (a commit
  that is lost or refused only makes the next owner read more; a later one supersedes it). A committed offset
  is therefore never ahead of an acknowledged checkpoint — faust's guarantee, kept. A partition with a message
  the runtime skipped (``Record.acked`` set by ``worker._never_ack``: no longer ours) is not committed at all.
- rebalance: librdkafka runs the rebalance callbacks only inside ``consume``, i.e. between batches, never while
  one is metered. ``on_assign`` runs ``Runtime.on_assigned`` on the event loop and WAITS for it before
  ``consume`` returns a message of the new assignment, so every assigned partition is gated for re-seeding
  before any of its messages is metered (step 6). A partition revoked and assigned again starts from the
  group's committed offset; librdkafka drops messages fetched under an earlier assignment.
- a batch may still hold messages fetched before a rebalance that ran inside the same ``consume`` call: the runtime
  meters a message of a partition being re-seeded only after its seed (skipping offsets the ledger applied), and
  skips — and never commits — one of a partition no longer ours.
- a member that lost its session (process stalled past ``session.timeout``) commits with a stale generation
  and is refused; its checkpoints are fenced by the owner epoch either way (step 7b).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from ledger.kafka import consumer_config

__all__ = ["BatchConsumer", "Record", "commit_offsets"]

log = structlog.get_logger("streams.batch_consumer")

#: messages per ``consume`` call within one batch (each call is one C call; the batch bounds are checked between)
CHUNK_MESSAGES = 2_000


class Record:
    """One Kafka message as the runtime reads it (``ev.message.partition`` …, like a faust Event's message).
    ``acked`` True means the runtime skipped it (``worker._never_ack``): it must not be committed."""

    __slots__ = ("acked", "key", "offset", "partition", "timestamp", "value")

    def __init__(self, partition: int, offset: int, timestamp: float | None, key: bytes | None,
                 value: bytes | None) -> None:
        self.partition = partition
        self.offset = offset
        self.timestamp = timestamp
        self.key = key
        self.value = value
        self.acked = False

    @property
    def message(self) -> Record:  # the runtime reads ``ev.message``: a record is its own message
        return self


def commit_offsets(records: list[Record]) -> dict[int, int]:
    """Per partition, the offset to commit after a batch: the one after its last message; nothing for a partition
    with a skipped message (the whole partition is no longer ours: whoever owns it reads from the committed
    offset)."""
    offsets: dict[int, int] = {}
    skipped: set[int] = set()
    for record in records:
        if record.acked:
            skipped.add(record.partition)
        elif record.offset + 1 > offsets.get(record.partition, -1):
            offsets[record.partition] = record.offset + 1
    for p in skipped:
        offsets.pop(p, None)
    return offsets


class BatchConsumer:
    """The group member of one streams worker. All Kafka calls run on one dedicated thread (``consume``
    blocks), never on the event loop; ``on_assigned`` is called on the event loop."""

    def __init__(self, *, bootstrap: str, group_id: str, topic: str, session_timeout_s: float,
                 max_fetch_bytes: int, on_assigned: Callable[[set[Any]], None]) -> None:
        self.topic = topic
        self._on_assigned = on_assigned
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streams-consumer")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        #: partition -> high watermark, as of the latest ``consume`` (written on the consumer's thread only)
        self._highs: dict[int, int] = {}
        self._consumer = Consumer(consumer_config(
            bootstrap, group_id, session_timeout_ms=int(session_timeout_s * 1000),
            **{"max.partition.fetch.bytes": max_fetch_bytes, "fetch.max.bytes": max(max_fetch_bytes, 52_428_800),
               # the queue librdkafka prefetches into while a batch is metered (per partition)
               "queued.max.messages.kbytes": 65_536,
               # a batch may wait for a partition's seeding (the ledger): faust's default 1,000 s, not 300 s
               "max.poll.interval.ms": 1_000_000,
               # eager (librdkafka's default): on_assign gets the WHOLE assignment, which Runtime.on_assigned
               # re-seeds; a cooperative assignor would hand over increments it would mistake for the whole
               "partition.assignment.strategy": "range,roundrobin"}))

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._run(lambda: self._consumer.subscribe(
            [self.topic], on_assign=self._assign, on_revoke=self._revoke, on_lost=self._revoke))

    async def _run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    # -- rebalance callbacks (consumer thread, inside consume) --------------------------------------------

    def _assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assert self._loop is not None

        async def hook() -> None:
            self._on_assigned(set(partitions))

        # wait: no message of the new assignment may be metered before its partitions are gated for seeding
        asyncio.run_coroutine_threadsafe(hook(), self._loop).result(timeout=60)
        log.info("consumer_assigned", partitions=sorted(tp.partition for tp in partitions))

    def _revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # nothing to flush: batches are committed as they end, and none is in flight during consume
        log.info("consumer_revoked", partitions=sorted(tp.partition for tp in partitions))

    # -- batches ------------------------------------------------------------------------------------------

    async def take(self, messages_max: int, within_s: float, *, bytes_max: int) -> list[Record]:
        """The next batch: up to ``messages_max`` messages or ``bytes_max`` bytes of values (whichever comes first;
        packed messages make a batch of 20,000 messages millions of events), waiting at most ``within_s``."""
        return await self._run(lambda: self._take_sync(messages_max, within_s, bytes_max))  # type: ignore[no-any-return]

    def _take_sync(self, messages_max: int, within_s: float, bytes_max: int) -> list[Record]:
        records: list[Record] = []
        append = records.append
        size = 0
        deadline = time.monotonic() + within_s
        while True:  # in chunks, so that the byte bound can close the batch between two of them
            chunk = min(CHUNK_MESSAGES, messages_max - len(records))
            for m in self._consumer.consume(num_messages=chunk, timeout=max(0.0, deadline - time.monotonic())):
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    if err.fatal():
                        raise KafkaException(err)
                    log.warning("consumer_error", error=str(err))  # transient: librdkafka retries by itself
                    continue
                ts_type, ts_ms = m.timestamp()
                value = m.value()
                size += len(value) if value else 0
                append(Record(m.partition(), m.offset(),  # type: ignore[arg-type]  # set on every fetched message
                              ts_ms / 1000 if ts_type and ts_ms > 0 else None, m.key(), value))
            if len(records) >= messages_max or size >= bytes_max or time.monotonic() >= deadline:
                self._note_high_watermarks()
                return records

    def _note_high_watermarks(self) -> None:
        """librdkafka's cached high watermarks of the assignment (no broker request), for ``high_watermark``."""
        highs: dict[int, int] = {}
        for tp in self._consumer.assignment():
            _low, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                highs[tp.partition] = high
        self._highs = highs  # replaced whole: a reader sees one consume's view

    async def commit(self, records: list[Record]) -> None:
        offsets = commit_offsets(records)
        if not offsets:
            return
        tps = [TopicPartition(self.topic, p, o) for p, o in sorted(offsets.items())]

        def commit() -> None:
            try:
                self._consumer.commit(offsets=tps, asynchronous=True)
            except KafkaException as exc:  # not committed: the next owner reads more, skips what was applied
                log.warning("commit_failed", error=str(exc))

        await self._run(commit)

    def high_watermark(self, p: int) -> int | None:
        """The partition's high watermark as of the latest batch (None: not known yet). Called on the event loop, so it
        never calls librdkafka: ``get_watermark_offsets`` blocks while the consumer's thread is inside a rebalance
        callback, and ``_assign`` waits there for this very loop — a deadlock until its 60 s timeout, which ended the
        worker (seen in the kill -9 suite, 2026-12-07)."""
        return self._highs.get(p)

    def close_sync(self, timeout_s: float = 10.0) -> None:
        """Leave the group (the others take the partitions at once instead of after the session timeout). On the
        consumer's thread, after a ``consume`` that may still run there."""
        if self._closed:
            return
        self._closed = True
        try:
            self._thread.submit(self._consumer.close).result(timeout=timeout_s)
        except Exception as exc:  # the group forgets this member after the session timeout anyway
            log.warning("consumer_close_failed", error=repr(exc))
        self._thread.shutdown(wait=False)
