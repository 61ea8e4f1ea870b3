"""streams.backfill, pure: a held event counts in the period it happened in (never the current one, as a late live
event would), identities to skip are skipped and counted, the core's rejections are reported, and the checkpoint is
the one of the session's virtual source (partition 0, offset 0) whatever the number of events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
from test_metering import catalog, event

from streams.backfill import HeldEvent, meter_backfill
from streams.metering import Limits, dedupe_hash

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def held(i: int, at: datetime, tokens: object = 10) -> HeldEvent:
    body = event(i, tokens=tokens, time=at.isoformat())
    return HeldEvent("p1", "test", str(i), at, orjson.dumps(body))


def test_events_count_in_their_original_period_and_closed_periods_are_marked() -> None:
    old, recent = datetime(2026, 9, 20, tzinfo=UTC), NOW - timedelta(hours=1)
    result = meter_backfill([held(1, old), held(2, old + timedelta(days=1), 5), held(3, recent, 7)],
                            source_topic="backfill:bf_1", catalog=catalog(), limits=Limits(), now=NOW)
    assert result.checkpoint.source_topic == "backfill:bf_1"
    assert (result.checkpoint.partition, result.checkpoint.as_of_offset) == (0, 0)
    assert not result.checkpoint.dedupe_keys
    periods = {k[2]: p for k, p in result.keys.items()}
    september, december = periods[datetime(2026, 9, 1, tzinfo=UTC)], periods[datetime(2026, 12, 1, tzinfo=UTC)]
    assert (september.units, september.events, september.closed) == (Decimal(15), 2, True)
    assert (december.units, december.closed) == (Decimal(7), False)
    assert all(c.late_events == 0 for c in result.checkpoint.counters)
    assert result.accepted == 3 and result.events == 3


def test_skipped_identities_and_rejections_are_reported_not_charged() -> None:
    at = datetime(2026, 10, 5, tzinfo=UTC)
    events = [held(1, at), held(2, at, tokens="many"), held(3, at), held(4, NOW + timedelta(days=2))]
    result = meter_backfill(events, source_topic="backfill:bf_2", catalog=catalog(), limits=Limits(), now=NOW,
                            skip={dedupe_hash("p1", "test", "1"): "charged_live"})
    assert result.skipped == {"charged_live": 1}
    assert sorted(r["reason"] for r in result.rejected) == ["bad_value", "time_in_future"]
    (counter,) = result.checkpoint.counters
    assert counter.units == Decimal(10) and counter.events == 1  # event 3 only
