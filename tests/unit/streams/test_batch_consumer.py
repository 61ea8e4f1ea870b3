"""The confluent batching consumer's commit rule (streams/batch_consumer.py): after a batch returned, each partition
is committed to the offset after its last message — except a partition with a message the runtime skipped (no longer
ours), which is not committed at all, so whoever owns it reads those messages again.

Unit level: the worker's ``Runtime`` with ``Record``s and no engines, as tests/unit/streams/test_worker_revocation.py
does with faust's messages."""

from __future__ import annotations

import asyncio

from streams.batch_consumer import Record, commit_offsets
from streams.metering import PartitionAggregator
from streams.settings import StreamsSettings
from streams.worker import Runtime

TOPIC = "usage.events.v1"


def _records(*positions: tuple[int, int]) -> list[Record]:
    return [Record(p, o, 1.0, b"k", b"{}") for p, o in positions]


def test_each_partition_commits_the_offset_after_its_last_message() -> None:
    records = _records((0, 5), (1, 9), (0, 6), (0, 7), (1, 10))
    assert commit_offsets(records) == {0: 8, 1: 11}
    assert commit_offsets([]) == {}


def test_a_partition_with_a_skipped_message_is_not_committed() -> None:
    records = _records((0, 5), (1, 9), (0, 6), (1, 10))
    records[2].acked = True  # the runtime skipped 0@6 (worker._never_ack): partition 0 is no longer ours
    assert commit_offsets(records) == {1: 11}


def test_a_record_of_a_revoked_partition_is_skipped_by_the_runtime_and_never_committed() -> None:
    async def scenario() -> None:
        runtime = Runtime(StreamsSettings(), partitions=4)
        runtime.catalog = object()  # type: ignore[assignment]  # gates are open only once a catalog is loaded
        runtime.gates[1] = asyncio.Event()
        runtime.gates[1].set()  # partition 1 was revoked: its gate is open, its aggregator gone
        runtime.gates[2] = asyncio.Event()
        runtime.gates[2].set()
        runtime.aggregators[2] = PartitionAggregator(source_topic=TOPIC, partition=2, partitions=4)
        runtime.aggregators[2].seed(applied_through=10, counters=[], dedupe_keys=[])
        records = _records((1, 41), (2, 7))  # 2@7 is at or below the seeded mark: metered as already applied
        for record in records:
            runtime._meter(record, {}, [])
        assert runtime.counts["unowned"] == 1
        assert [r.acked for r in records] == [True, False]
        assert commit_offsets(records) == {2: 8}
    asyncio.run(scenario())
