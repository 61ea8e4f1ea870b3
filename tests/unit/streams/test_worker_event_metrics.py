"""The stream worker's event counters (``meterline_streams_events_total`` / ``…_event_notes_total``) add up what its
aggregators metered, once, and drop what a replaced aggregator counted (its events are read again)."""

from __future__ import annotations

import orjson
from prometheus_client import REGISTRY
from test_metering import ARRIVAL, catalog, event

from streams.contracts import partition_for
from streams.metering import PartitionAggregator
from streams.settings import StreamsSettings
from streams.worker import Runtime

TOPIC = "usage.events.v1"


def _counts() -> dict[str, float]:
    def value(name: str, label: str, key: str) -> float:
        return REGISTRY.get_sample_value(name, {label: key}) or 0.0
    return {**{o: value("meterline_streams_events_total", "outcome", o)
               for o in ("accepted", "duplicate", "rejected", "unmetered")},
            **{n: value("meterline_streams_event_notes_total", "note", n) for n in ("late", "misplaced", "unpriced")}}


def _aggregator(partition: int) -> PartitionAggregator:
    aggregator = PartitionAggregator(source_topic=TOPIC, partition=partition, partitions=4)
    aggregator.seed(applied_through=-1, counters=[], dedupe_keys=[])
    return aggregator


def _subject_of(partition: int) -> str:
    return next(s for s in (f"user-{i}" for i in range(1000)) if partition_for(s, 4) == partition)


def test_counters_add_each_batch_once_and_skip_a_replaced_aggregator() -> None:
    runtime = Runtime(StreamsSettings(), partitions=4)
    runtime.aggregators[0] = first = _aggregator(0)
    cat = catalog()
    home, away = _subject_of(0), _subject_of(1)
    start = _counts()
    for offset, ev in enumerate([event(1, subject=home), event(1, subject=home), event(2, subject=away),
                                 {"id": "x"}, event(3, subject=home, etype="unknown-type")]):
        first.process(offset=offset, value=orjson.dumps(ev), arrival=ARRIVAL, catalog=cat)
    runtime.export_outcomes()
    runtime.export_outcomes()  # nothing new: nothing added
    after = _counts()
    delta = {k: after[k] - start[k] for k in after}
    # 1 and 2 accepted, 1 again a duplicate, {"id": "x"} and the unknown type rejected (dead-lettered)
    assert delta == {"accepted": 2, "duplicate": 1, "rejected": 2, "unmetered": 0, "late": 0, "misplaced": 1,
                     "unpriced": 0}, delta

    first.process(offset=5, value=orjson.dumps(event(4, subject=home)), arrival=ARRIVAL, catalog=cat)
    runtime.aggregators[0] = second = _aggregator(0)  # re-seeded mid-batch: event 4 is read again by `second`
    second.process(offset=5, value=orjson.dumps(event(4, subject=home)), arrival=ARRIVAL, catalog=cat)
    runtime.export_outcomes()
    assert _counts()["accepted"] - after["accepted"] == 1  # event 4 once, not twice


def test_a_meter_without_a_price_is_counted_as_unpriced_and_its_event_as_unmetered() -> None:
    runtime = Runtime(StreamsSettings(), partitions=4)
    runtime.aggregators[2] = aggregator = _aggregator(2)
    start = _counts()
    aggregator.process(offset=0, value=orjson.dumps(event(1, subject=_subject_of(2))), arrival=ARRIVAL,
                       catalog=catalog(prices=[]))
    runtime.export_outcomes()
    delta = {k: v - start[k] for k, v in _counts().items()}
    assert delta["unmetered"] == 1 and delta["unpriced"] == 1 and delta["accepted"] == 0, delta
