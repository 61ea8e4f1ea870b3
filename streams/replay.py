"""Reconciliation by replay: meter a partition's log again from its first offset and compare the result with
the counters the ledger holds for it. Pure: the caller reads the log and the ledger (``meterline reconcile``).

Why it can be trusted: the live workers and this replay run the same metering core
(``streams.metering.PartitionAggregator``) over the same messages in the same order with the same arrival
times (the Kafka message timestamps), so with the same catalog they must reach the same cumulative counters
as of the ledger's applied offset. A difference means charged usage does not match the log: an event lost or
counted twice, or a counter written out of protocol. Differences a correct pipeline can also produce, and
which the report names: the catalog changed after the events were metered (replay uses today's meters and
prices), or live workers were seeded with a shorter period window than the replay (events older than it were
charged in a later period, marked late).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from ledger.rows import SnapshotCounter
from streams.catalog_model import CatalogSnapshot
from streams.metering import CounterKeyTuple, Limits, PartitionAggregator
from streams.settings import StreamsSettings

__all__ = ["KeyDifference", "LogMessage", "PartitionReplay", "compare", "metering_limits", "replay_messages"]


def metering_limits(settings: StreamsSettings) -> Limits:
    """The metering limits the live workers run with (the replay must meter exactly as they do)."""
    return Limits(event_bytes_max=settings.event_bytes_max, message_events_max=settings.message_events_max,
                  future_skew_s=settings.future_skew_s, dedupe_horizon_s=settings.dedupe_horizon_s,
                  dedupe_memory_max=settings.dedupe_memory_max,
                  dedupe_filter_bytes=settings.dedupe_filter_mb * 1024 * 1024, dedupe_dir=settings.dedupe_dir or None,
                  checkpoint_counters_max=settings.checkpoint_counters_max,
                  checkpoint_dedupe_keys_max=settings.checkpoint_dedupe_keys_max)


@dataclass(frozen=True, slots=True)
class LogMessage:
    offset: int
    value: bytes | None
    arrival: datetime


@dataclass(frozen=True, slots=True)
class KeyDifference:
    key: CounterKeyTuple  # (wallet_id, project_id, meter_id, period_start, price_version_id)
    ledger_units: Decimal | None  # None: the ledger has no counter for the key
    replayed_units: Decimal | None  # None: the replay found no event for the key
    ledger_events: int
    replayed_events: int


@dataclass
class PartitionReplay:
    partition: int
    applied_through: int
    replayed_through: int = -1
    messages: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    keys_ledger: int = 0
    keys_replayed: int = 0
    differences: list[KeyDifference] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """The log held every offset up to the ledger's mark (else the comparison would be unfair)."""
        return self.replayed_through >= self.applied_through


def replay_messages(*, source_id: str, partition: int, partitions: int, applied_through: int,
                    messages: Iterable[LogMessage], catalog: CatalogSnapshot, limits: Limits) -> PartitionAggregator:
    """Meter ``messages`` (in offset order) from an empty state, up to and including ``applied_through``."""
    aggregator = PartitionAggregator(source_topic=source_id, partition=partition, partitions=partitions,
                                     limits=limits)
    aggregator.seed(applied_through=-1, counters=(), dedupe_keys=(), periods_since=None)
    for message in messages:
        if message.offset > applied_through:
            break
        aggregator.process(offset=message.offset, value=message.value, arrival=message.arrival, catalog=catalog)
    return aggregator


def compare(replay: PartitionReplay, aggregator: PartitionAggregator,
            stored: Sequence[SnapshotCounter]) -> PartitionReplay:
    """Fill ``replay`` with the counts and every key whose units or event count differ."""
    replay.replayed_through = aggregator.processed_through
    replay.messages = aggregator.stats.messages
    replay.accepted = aggregator.stats.accepted
    replay.duplicates = aggregator.stats.duplicates
    replay.rejected = aggregator.stats.rejected
    ledger = {(c.wallet_id, c.project_id, c.meter_id, c.period_start, c.price_version_id): c
              for c in stored if c.partition == replay.partition}
    replayed = {key: c for key, c in aggregator.counters.items() if c.events > 0}
    replay.keys_ledger, replay.keys_replayed = len(ledger), len(replayed)
    for key in sorted(set(ledger) | set(replayed), key=lambda k: (k[0], k[2], k[3], k[4])):
        mine, theirs = replayed.get(key), ledger.get(key)
        mine_units = mine.units if mine is not None else None
        theirs_units = Decimal(theirs.units) if theirs is not None else None
        mine_events = mine.events if mine is not None else 0
        theirs_events = theirs.events if theirs is not None else 0
        if mine_units != theirs_units or mine_events != theirs_events:
            replay.differences.append(KeyDifference(key, theirs_units, mine_units, theirs_events, mine_events))
    return replay
