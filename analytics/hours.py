"""Time units and the whole-hour split every hourly rollup read uses (pure; no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = ["HOUR", "STEP", "HourSplit", "ceil_to", "floor_to", "split_hours"]

HOUR = timedelta(hours=1)
STEP = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1),
        "month": timedelta(days=31)}


def floor_to(moment: datetime, unit: str) -> datetime:
    if unit == "minute":
        return moment.replace(second=0, microsecond=0)
    if unit == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    if unit == "day":
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def ceil_to(moment: datetime, unit: str) -> datetime:
    floored = floor_to(moment, unit)
    if floored == moment:
        return moment
    if unit == "month":
        return (floored + timedelta(days=32)).replace(day=1)
    return floored + STEP[unit]


@dataclass(frozen=True)
class HourSplit:
    """[lo, hi) cut into whole hours an hourly rollup answers (``flows_by_hour``, ``meter_usage_by_hour``) and
    partial hours read raw.

    An hour is read from the rollup only when no boundary (lo, hi, or a cut such as a summary's window start)
    falls strictly inside it, so every rollup row lies wholly on one side of every boundary and comparing its
    hour with a boundary classifies it exactly; the raw rows carry their own created_at. lo=None: unbounded."""

    rollup: tuple[tuple[datetime | None, datetime], ...]  # hour-aligned [from, to) ranges (from None: -inf)
    raw: tuple[tuple[datetime, datetime], ...]  # exact [from, to) ranges, each within one hour


def split_hours(lo: datetime | None, hi: datetime, cuts: tuple[datetime, ...] = ()) -> HourSplit:
    points = [p for p in (lo, *cuts, hi) if p is not None]
    partial = sorted({floor_to(p, "hour") for p in points if floor_to(p, "hour") != p})
    raw = tuple((max(h, lo) if lo is not None else h, min(h + HOUR, hi)) for h in partial
                if (lo is None or h + HOUR > lo) and h < hi)
    rollup: list[tuple[datetime | None, datetime]] = []
    cursor: datetime | None = ceil_to(lo, "hour") if lo is not None else None
    whole_end = floor_to(hi, "hour")
    for h in [*partial, whole_end]:
        if h > whole_end or (cursor is not None and h < cursor):
            continue
        if cursor is None or h > cursor:
            rollup.append((cursor, h))
        cursor = h + HOUR
    return HourSplit(tuple(rollup), raw)

