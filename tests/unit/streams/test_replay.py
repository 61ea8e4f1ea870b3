"""Reconciliation by replay (streams/replay.py): the same log metered again equals what the live aggregator
counted; a counter that drifted from the log, a key the log never produced and a key the ledger lacks are
each reported; a log that ends before the ledger's mark is incomplete."""

from __future__ import annotations

from decimal import Decimal

import orjson
from test_metering import ARRIVAL, agg, catalog, event

from ledger.rows import SnapshotCounter
from streams.metering import Limits
from streams.replay import LogMessage, PartitionReplay, compare, replay_messages


def _log() -> list[LogMessage]:
    """Four messages of partition 0: one packed pair, a duplicate resend, a bad one and a plain event."""
    values = [orjson.dumps([event(1, tokens=5), event(2, subject="bob", tokens=7)]),
              orjson.dumps(event(1, tokens=5)),
              b"{not json",
              orjson.dumps(event(3, tokens=11))]
    return [LogMessage(offset, value, ARRIVAL) for offset, value in enumerate(values)]


def _as_ledger(aggregator_counters: dict, partition: int = 0) -> list[SnapshotCounter]:  # type: ignore[type-arg]
    return [SnapshotCounter(k[0], k[1], k[2], k[3], k[4], partition, c.units, c.latest_at, c.events, c.late_events, 0)
            for k, c in aggregator_counters.items()]


def test_a_faithful_ledger_matches_the_replay() -> None:
    live = agg()
    for m in _log():  # what the live worker counted, in two batches (batching must not matter)
        live.process(offset=m.offset, value=m.value, arrival=m.arrival, catalog=catalog())
    replayed = replay_messages(source_id="usage", partition=0, partitions=1, applied_through=3, messages=_log(),
                               catalog=catalog(), limits=Limits())
    report = compare(PartitionReplay(partition=0, applied_through=3), replayed, _as_ledger(live.counters))
    assert report.differences == [] and report.complete
    assert (report.messages, report.accepted, report.duplicates, report.rejected) == (4, 3, 1, 1)
    assert report.keys_ledger == report.keys_replayed == 2


def test_drift_missing_and_extra_keys_are_reported() -> None:
    replayed = replay_messages(source_id="usage", partition=0, partitions=1, applied_through=3, messages=_log(),
                               catalog=catalog(), limits=Limits())
    ledger = _as_ledger(replayed.counters)
    alice = next(c for c in ledger if c.units == Decimal(16))
    drifted = SnapshotCounter(alice.wallet_id, alice.project_id, alice.meter_id, alice.period_start,
                              alice.price_version_id, 0, Decimal(21), alice.latest_at, alice.events + 1, 0, 0)
    stranger = SnapshotCounter("w-ghost", "p1", "tokens", alice.period_start, "pv1", 0, Decimal(3), None, 1, 0, 0)
    other_partition = SnapshotCounter("w-elsewhere", "p1", "tokens", alice.period_start, "pv1", 5, Decimal(9), None,
                                      1, 0, 0)
    bob = [c for c in ledger if c is not alice]
    report = compare(PartitionReplay(partition=0, applied_through=3), replayed, [drifted, stranger, other_partition])
    by_wallet = {d.key[0]: d for d in report.differences}
    assert set(by_wallet) == {alice.wallet_id, "w-ghost", bob[0].wallet_id}  # other partitions are not ours
    assert (by_wallet[alice.wallet_id].ledger_units, by_wallet[alice.wallet_id].replayed_units) == (21, 16)
    assert by_wallet["w-ghost"].replayed_units is None
    assert by_wallet[bob[0].wallet_id].ledger_units is None


def test_a_log_shorter_than_the_mark_is_incomplete_and_offsets_past_it_are_ignored() -> None:
    short = replay_messages(source_id="usage", partition=0, partitions=1, applied_through=9, messages=_log(),
                            catalog=catalog(), limits=Limits())
    assert not compare(PartitionReplay(partition=0, applied_through=9), short, []).complete
    upto_first = replay_messages(source_id="usage", partition=0, partitions=1, applied_through=0, messages=_log(),
                                 catalog=catalog(), limits=Limits())
    assert upto_first.stats.messages == 1 and upto_first.processed_through == 0
