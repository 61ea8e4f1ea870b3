"""`meterline replay` runs in bounded memory over any range (issue 18: a 10M-event replay must not grow with the
number of events). The replay meters each partition with the workers' core (streams/replay_diff.py); what it
keeps per partition is per KEY (counters, keys touched), and per event only the dedupe keys, which the
``DedupeStore`` caps at ``dedupe_memory_max`` in RAM (older keys spill to disk). So replaying 10x the events of
the same keys must not raise the Python heap's peak beyond noise."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import orjson
from test_metering import ARRIVAL, catalog, event

from streams.metering import Limits
from streams.replay import LogMessage
from streams.replay_diff import PartitionRun, Selection, replay_partition

PACK = 100
SUBJECTS = 50


def _log(events: int) -> Iterator[LogMessage]:
    """Generated as read, like the broker reader (``_read_partition``): the log itself is never in RAM."""
    for offset, first in enumerate(range(0, events, PACK)):
        yield LogMessage(offset, orjson.dumps([event(i, subject=f"s{i % SUBJECTS}", tokens=1)
                                               for i in range(first, min(first + PACK, events))]), ARRIVAL)


def _replay_peak(events: int, limits: Limits) -> tuple[int, PartitionRun]:
    """The traced heap's peak above its level at the start of the replay."""
    tracemalloc.start(1)
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        run = replay_partition(source_id="usage", partition=0, partitions=1, applied_through=events // PACK,
                               messages=_log(events), catalog=catalog(), limits=limits,
                               selection=Selection(partitions=(0,)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base, run


def test_replay_memory_does_not_grow_with_the_number_of_events(tmp_path: Path) -> None:
    # a RAM tier far below the events replayed: most dedupe keys are on disk, as in a 10M-event replay
    limits = Limits(dedupe_memory_max=1_000, dedupe_filter_bytes=64 * 1024, dedupe_dir=str(tmp_path))
    small_peak, small = _replay_peak(3_000, limits)
    large_peak, large = _replay_peak(30_000, limits)
    # the replay counted everything (the bound is not bought by dropping events)
    assert sum(c.units for c in large.counters.values()) == Decimal(30_000)
    assert sum(c.units for c in small.counters.values()) == Decimal(3_000)
    assert len(large.counters) == len(small.counters) == SUBJECTS
    # 27,000 more events; ~80 B per dedupe key kept in RAM would be +2 MiB
    assert large_peak - small_peak < 2**19, (small_peak, large_peak)
