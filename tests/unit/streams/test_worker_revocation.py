"""A revoked owner never emits after the handover and never acks what it skipped (issue 13 item 8).

Unit level: the worker's ``Runtime`` with faust's real ``Message`` objects and no engines (nothing connects:
the revoked partitions never reach the producer or the database). On cbf7ba4 a skipped event was left for faust
to ack: assigned back to the same worker before the batch returned, its offset was committed although it was
never charged, and the seeding wait (applied ≥ committed − 1) then waited forever."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from faust.types import TP, Message

from streams.metering import PartitionAggregator
from streams.settings import StreamsSettings
from streams.worker import Runtime

TOPIC = "usage.events.v1"


def _event(partition: int, offset: int) -> Any:
    message = Message(TOPIC, partition, offset, timestamp=1.0, timestamp_type=0, headers=None, key=None,
                      value=b"{}", checksum=None, tp=TP(TOPIC, partition))
    return SimpleNamespace(message=message)


def _runtime() -> Runtime:
    runtime = Runtime(StreamsSettings(), partitions=4)
    runtime.catalog = object()  # type: ignore[assignment]  # gates are open only once a catalog is loaded
    return runtime


def test_events_of_a_revoked_partition_are_skipped_and_never_acked() -> None:
    async def scenario() -> None:
        runtime = _runtime()
        runtime.gates[1] = asyncio.Event()
        runtime.gates[1].set()  # partition 1 was revoked: its gate is open, its aggregator gone
        ev = _event(1, 41)
        runtime._meter(ev, {}, [])
        assert runtime.counts["unowned"] == 1
        # faust's final ack after the batch is now a no-op: the offset can never be committed by this worker
        assert ev.message.acked is True
        consumer = SimpleNamespace(ack=lambda message: (_ for _ in ()).throw(AssertionError("acked")))
        assert ev.message.ack(consumer) is False
    asyncio.run(scenario())


def test_a_partition_revoked_mid_batch_emits_nothing_and_acks_nothing() -> None:
    async def scenario() -> None:
        runtime = _runtime()
        sent: list[Any] = []
        runtime._send_checkpoint = sent.append  # type: ignore[method-assign]
        runtime._producer = SimpleNamespace(flush=lambda _timeout: 0)  # type: ignore[assignment]
        stale = PartitionAggregator(source_topic=TOPIC, partition=2, partitions=4)
        stale.seed(applied_through=9, counters=[], dedupe_keys=[])
        stale.processed_through = 12  # it metered offsets 10..12 in this batch before the revocation
        current = PartitionAggregator(source_topic=TOPIC, partition=3, partitions=4)
        current.seed(applied_through=0, counters=[], dedupe_keys=[])
        current.processed_through = 5
        runtime.aggregators = {3: current}  # 2 was revoked (or re-seeded) while the batch ran
        revoked = await runtime._emit({id(stale): stale, id(current): current})
        assert revoked == {2}
        assert [c.partition for c in sent] == [3]  # the revoked owner emitted nothing for 2
        events = [_event(2, 10), _event(2, 12), _event(3, 5)]
        runtime._skip_revoked(events, revoked)
        assert [ev.message.acked for ev in events] == [True, True, False]
    asyncio.run(scenario())
