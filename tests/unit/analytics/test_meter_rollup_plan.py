"""Which hours the per-meter rollup may answer (analytics/meter_rollup.py ``plan``): pure, no engine."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from analytics.meter_rollup import plan
from analytics.meter_units import MeterSpec, MeterVersion

H = timedelta(hours=1)
T0 = datetime(2026, 10, 1, tzinfo=UTC)
CHANGE = T0 + 5 * H + timedelta(minutes=20)  # mid-hour
FAR = T0 + timedelta(days=400)


def _meter(**extra: object) -> MeterSpec:
    return MeterSpec(id="m", slug="m", group_by=("$.model",), event_type="e", versions=(
        MeterVersion("e", "SUM", "$.units", (), T0 - timedelta(days=1), CHANGE),
        MeterVersion("e", "SUM", "$.tokens", (), CHANGE, None)), **extra)  # type: ignore[arg-type]


def _hours(segment: object) -> list[datetime]:
    return [datetime.fromtimestamp(h, UTC) for h in segment.hours]  # type: ignore[attr-defined]


def test_whole_hours_inside_each_version_partial_hours_raw() -> None:
    start, end = T0 + timedelta(minutes=10), T0 + 9 * H + timedelta(seconds=1)
    v1, v2 = plan(_meter(), start, end, "meter", settled_before=FAR, hours_max=1000)
    assert _hours(v1) == [T0 + i * H for i in range(1, 5)]  # 01:00..04:00; 00:00 and 05:00 are cut
    assert v1.raw == ((start, T0 + H), (T0 + 5 * H, CHANGE))
    assert _hours(v2) == [T0 + i * H for i in range(6, 9)]
    assert v2.raw == ((CHANGE, T0 + 6 * H), (T0 + 9 * H, end))
    assert v1.definition != v2.definition  # a new value property is a new definition


def test_unsettled_hours_price_cuts_and_the_cap_are_raw() -> None:
    start, end = T0 + 6 * H, T0 + 12 * H
    priced = _meter(price_versions=(("p1", T0), ("p2", T0 + 8 * H + timedelta(minutes=1))))
    [v2] = plan(priced, start, end, "price_version", settled_before=T0 + 11 * H + timedelta(minutes=30),
                hours_max=1000)
    assert _hours(v2) == [T0 + 6 * H, T0 + 7 * H, T0 + 9 * H, T0 + 10 * H]  # 08:00 holds the price change
    assert v2.raw == ((T0 + 8 * H, T0 + 9 * H), (T0 + 11 * H, end))  # 11:00 has not settled
    [grouped] = plan(priced, start, end, "meter", settled_before=FAR, hours_max=1000)
    assert len(grouped.hours) == 6  # the price change matters only when grouping by price version
    [capped] = plan(priced, start, end, "meter", settled_before=FAR, hours_max=5)
    assert capped.hours == () and capped.raw == ((start, end),)
