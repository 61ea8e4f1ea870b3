"""Hourly per-meter usage rollup: whole hours from ``meter_usage_by_hour``, used only while provably exact.

Why a verified cache and not a projection, a materialized view or sink-written rows: what a meter counts is
decided by its definition in the catalog (PostgreSQL; analytics/meter_units.py), which ClickHouse cannot see at
insert time, so no projection can compute it; the workers' output (ledger checkpoints) carries cumulative
units per wallet and period, not per hour or group-by key; and a sink computing units at insert time would
miss every meter version created after it stored an event that falls in the version's life (event times are
the producer's). So the queries fill an hour from the raw rows the first time they need it, and reuse it
only while the hour's rows are exactly those the fill read:

Invariant. usage_events only grows (the sink appends rows; nothing updates or deletes them). A fill
(1) reads n = the number of rows of (project, event type, hour) from the ``by_hour`` projection, (2) inserts
that hour's aggregates under a fresh ``fill_id`` (its read sees a snapshot S' that holds at least those n
rows), (3) only after (2) returned, records (hour, n, fill_id) in ``meter_usage_fills``. A reader uses a fill
for an hour only when the recorded n equals the hour's count NOW: rows only grow, so the hour's rows now are
those n rows, S' held them, and S' held no more (it is between the two). Hence the fill is exactly the hour.
A fill interrupted before (3) is never read; a late event makes every older fill of its hour unusable (the
next read refills that hour); concurrent fills of one hour are harmless (each hour has its own fill_id and a
reader picks one per hour). A process remembers the fills it has seen (a record never changes), so a read
whose hours are all known asks only for the counts; hence the two tables are append-only too: to reset them,
drop both and restart the api processes.

What is read raw, exactly as before: partial hours at a window's edges and around every meter-version
boundary (and price-version boundary when grouping by price version), hours that ended less than
``settle_s`` ago (still receiving events: filling them would be redone on every read), hours whose fill
failed, and whatever the rollup cannot group by (subject, a subject filter, minute buckets).

``definition`` hashes everything that decides a row's contribution: the version's event type, aggregation,
value property and filters, the meter's aggregation (how its versions' rows combine) and the group-by path.
A version's validity times are not in it: a filled hour lies wholly inside the version's life.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from clickhouse_connect.driver.client import Client

from analytics.hours import HOUR, floor_to, split_hours
from analytics.meter_units import MeterSpec, MeterVersion, group_expression, version_rows_sql

__all__ = ["MeterRollup", "Resolved", "Segment", "merge_expression", "plan", "rollup_group_path",
           "rows_sql"]

log = logging.getLogger("meterline.analytics.meter_rollup")

_TIME = "DateTime64(3, 'UTC')"
_HOUR_OF = "toDateTime(toStartOfHour(time), 'UTC')"

#: per meter aggregation: (column of meter_usage_by_hour, the state over a version's rows ``v``/``u``/``ok``)
_STATS: dict[str, tuple[str | None, str]] = {
    "SUM": ("units", "sumIf(v, ok = 1)"),
    "MAX": ("units", "maxIf(v, ok = 1)"),
    "COUNT": (None, "toUInt8(0)"),  # the units are `events`
    # argMaxIf over a Nullable value skips NULLs; the state does the same explicitly
    "LATEST": ("latest", "argMaxStateIf(assumeNotNull(v), time, ok = 1 AND isNotNull(v))"),
    "UNIQUE_COUNT": ("uniq", "uniqExactStateIf(u, ok = 1)"),
}
_MERGE = {"SUM": "sum(stat)", "MAX": "max(stat)", "COUNT": "sum(ev)", "LATEST": "argMaxMerge(stat)",
          "UNIQUE_COUNT": "uniqExactMerge(stat)"}


def merge_expression(aggregation: str) -> str:
    """The meter's units over rows of ``segment_rows_sql`` (the same figure as ``units_expression`` over raw)."""
    return _MERGE[aggregation.upper()]


def rollup_group_path(meter: MeterSpec, group_by: str) -> str | None:
    """What the rollup stores as the group for ``group_by``: '' (meter, price_version: labelled at read time
    from the hour), a JSON path ($.model), or None when the rollup cannot answer it (subject)."""
    if group_by in ("meter", "price_version"):
        return ""
    if group_by in meter.group_by or group_by.startswith(("$.", "data.")):
        return "$." + group_by[5:] if group_by.startswith("data.") else group_by
    return None


def definition_key(version: MeterVersion, aggregation: str, group_path: str) -> str:
    doc = {"event_type": version.event_type, "aggregation": version.aggregation.upper(),
           "value_property": version.value_property, "filters": list(version.filters),
           "meter_aggregation": aggregation.upper(), "group_path": group_path}
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


@dataclass(frozen=True)
class Segment:
    """One meter version's part of a window: whole hours the rollup may answer and exact raw ranges."""

    meter: MeterSpec
    version: MeterVersion
    group_by: str
    group_path: str
    definition: str
    hours: tuple[int, ...]  # whole hours, as epoch seconds (a read checks thousands of them)
    raw: tuple[tuple[datetime, datetime], ...]


def plan(meter: MeterSpec, start: datetime, end: datetime, group_by: str, *, settled_before: datetime,
         hours_max: int) -> list[Segment]:
    """The segments covering [start, end) for ``meter``, each version within its life [valid_from, valid_to).
    Hours ending after ``settled_before`` and hours cut by a boundary are raw; beyond ``hours_max`` whole hours
    in one segment, everything is raw (the fill ids a read binds grow with the hours)."""
    path = rollup_group_path(meter, group_by)
    assert path is not None, group_by
    settled = floor_to(settled_before, "hour")
    segments = []
    for version in meter.versions:
        lo = max(start, version.valid_from)
        hi = min(end, version.valid_to) if version.valid_to is not None else end
        if lo >= hi:
            continue
        raw: list[tuple[datetime, datetime]] = []
        hours: list[int] = []
        rollup_hi = min(hi, settled)
        if lo < rollup_hi:
            cuts = tuple(at for _, at in meter.price_versions[1:] if lo < at < rollup_hi) \
                if group_by == "price_version" else ()
            split = split_hours(lo, rollup_hi, cuts)
            raw.extend(split.raw)
            for a, b in split.rollup:
                assert a is not None
                hours.extend(range(int(a.timestamp()), int(b.timestamp()), 3_600))
        if max(lo, rollup_hi) < hi:
            raw.append((max(lo, rollup_hi), hi))
        if len(hours) > hours_max:
            hours, raw = [], [(lo, hi)]
        segments.append(Segment(meter, version, group_by, path, definition_key(version, meter.aggregation, path),
                                tuple(hours), _merged(raw)))
    return segments


def _merged(ranges: list[tuple[datetime, datetime]]) -> tuple[tuple[datetime, datetime], ...]:
    out: list[tuple[datetime, datetime]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return tuple(out)


@dataclass(frozen=True)
class Resolved:
    """A segment as a read answers it: the fills it reads (one per non-empty hour) and its raw ranges."""

    segment: Segment
    fill_ids: tuple[int, ...]
    raw: tuple[tuple[datetime, datetime], ...]

    @property
    def hour_range(self) -> tuple[datetime, datetime] | None:
        hours = self.segment.hours
        return (_from_epoch(hours[0]), _from_epoch(hours[-1]) + HOUR) if hours and self.fill_ids else None


@dataclass
class ResolveStats:
    hours_from_rollup: int = 0
    hours_filled: int = 0
    hours_empty: int = 0
    fill_failures: int = 0


class MeterRollup:
    """Finds, per whole hour, a usable fill (or fills the hour) — see the module's invariant."""

    #: recorded fills this process knows, (project, definition, hour, n) -> fill id: a record never changes, so
    #: a known one needs no lookup (only the counts do, every read); cleared when it grows past this
    KNOWN_MAX = 200_000

    def __init__(self, db: str) -> None:
        self.db = db
        self._known: dict[tuple[str, str, int, int], int] = {}
        self._lock = threading.Lock()

    def resolve(self, client: Client, project_id: str, segments: list[Segment],
                settings: dict[str, Any]) -> tuple[list[Resolved], ResolveStats]:
        stats = ResolveStats()
        all_hours = [h for s in segments for h in s.hours]
        if not all_hours:
            return [Resolved(s, (), s.raw) for s in segments], stats
        lo, hi = _from_epoch(min(all_hours)), _from_epoch(max(all_hours)) + HOUR
        counts = self._counts(client, project_id, segments, lo, hi, settings)
        chosen: dict[tuple[str, int], int] = {}
        unknown: list[tuple[Segment, int, int]] = []
        known = self._known  # dict reads are atomic; a concurrent clear() only costs a lookup
        for s in segments:
            for h in s.hours:
                n = counts.get((s.version.event_type, h), 0)
                if n == 0:
                    stats.hours_empty += 1
                elif (fill := known.get((project_id, s.definition, h, n))) is not None:
                    chosen[(s.definition, h)] = fill
                else:
                    unknown.append((s, h, n))
        missing: dict[str, dict[int, int]] = defaultdict(dict)
        first_of: dict[str, Segment] = {}
        if unknown:
            fills = self._fills(client, project_id, segments, lo, hi, settings)
            self._remember(project_id, fills)
            for s, h, n in unknown:
                fill = fills.get((s.definition, h, n))
                if fill is not None:
                    chosen[(s.definition, h)] = fill
                else:
                    first_of.setdefault(s.definition, s)
                    missing[s.definition][h] = n
        stats.hours_from_rollup = len(chosen)
        for definition, hours in missing.items():
            try:
                chosen.update(self._fill(client, project_id, first_of[definition], hours, settings))
                stats.hours_filled += len(hours)
            except Exception as exc:  # the hours are read raw instead: slower, never wrong
                stats.fill_failures += 1
                log.warning("meter_rollup_fill_failed definition=%s hours=%d error=%r", definition, len(hours), exc)
        resolved = []
        for s in segments:
            ids, raw = [], list(s.raw)
            for h in s.hours:
                fill = chosen.get((s.definition, h))
                if fill is not None:
                    ids.append(fill)
                elif counts.get((s.version.event_type, h), 0):
                    raw.append((_from_epoch(h), _from_epoch(h) + HOUR))
            resolved.append(Resolved(s, tuple(ids), _merged(raw)))
        return resolved, stats

    def _remember(self, project_id: str, fills: dict[tuple[str, int, int], int]) -> None:
        with self._lock:
            if len(self._known) + len(fills) > self.KNOWN_MAX:
                self._known.clear()
            for (d, h, n), f in fills.items():
                self._known.setdefault((project_id, d, h, n), f)

    # hours travel as epoch seconds: converting thousands of DateTime values to Python datetimes cost more
    # than the queries themselves
    def _counts(self, client: Client, project_id: str, segments: list[Segment], lo: datetime, hi: datetime,
                settings: dict[str, Any]) -> dict[tuple[str, int], int]:
        """Step (1) for every hour: rows per event type and hour (filters on toStartOfHour(time), so the by_hour
        projection answers)."""
        result = client.query(
            f"SELECT toString(event_type) AS key, toUnixTimestamp(toStartOfHour(time)) AS h, count() AS n "
            f"FROM `{self.db}`.usage_events WHERE project_id = {{project:String}} "
            "AND event_type IN {types:Array(String)} AND toStartOfHour(time) >= {lo:DateTime('UTC')} "
            "AND toStartOfHour(time) < {hi:DateTime('UTC')} GROUP BY key, h",
            parameters={"project": project_id, "types": sorted({s.version.event_type for s in segments}),
                        "lo": lo, "hi": hi}, settings=settings)
        return {(key, int(h)): int(n) for key, h, n in result.result_rows}

    def _fills(self, client: Client, project_id: str, segments: list[Segment], lo: datetime, hi: datetime,
               settings: dict[str, Any]) -> dict[tuple[str, int, int], int]:
        result = client.query(
            "SELECT definition, toUnixTimestamp(hour) AS h, src_events, min(fill_id) "
            f"FROM `{self.db}`.meter_usage_fills WHERE project_id = {{project:String}} "
            "AND definition IN {defs:Array(String)} AND hour >= {lo:DateTime('UTC')} AND hour < {hi:DateTime('UTC')} "
            "GROUP BY definition, h, src_events",
            parameters={"project": project_id, "defs": sorted({s.definition for s in segments}), "lo": lo, "hi": hi},
            settings=settings)
        return {(d, int(h), int(n)): int(f) for d, h, n, f in result.result_rows}

    def _fill(self, client: Client, project_id: str, segment: Segment, counts: dict[int, int],
              settings: dict[str, Any]) -> dict[tuple[str, int], int]:
        """Steps (2) and (3) of the invariant for the hours of ``counts`` (epoch hour -> n read in step 1)."""
        epochs = sorted(counts)
        ordered = [_from_epoch(h) for h in epochs]
        base = secrets.randbits(62)  # hour i (1-based) gets fill_id base + i: unique per hour and fill
        params: dict[str, Any] = {"project": project_id, "f_def": segment.definition, "f_base": base,
                                  "f_hours": ordered, "f_lo": ordered[0], "f_hi": ordered[-1] + HOUR}
        grp = _stored_group(segment, params)
        rows = version_rows_sql(self.db, segment.version, params, prefix="fv_", columns=f"time, {grp} AS grp",
                                extra_where=[f"time >= {{f_lo:{_TIME}}}", f"time < {{f_hi:{_TIME}}}",
                                             f"{_HOUR_OF} IN {{f_hours:Array(DateTime('UTC'))}}"])
        column, stat = _STATS[segment.meter.aggregation]
        client.command(
            f"INSERT INTO `{self.db}`.meter_usage_by_hour (project_id, definition, hour, fill_id, grp, events, "
            f"rejected{', ' + column if column else ''}) SELECT {{project:String}}, {{f_def:String}}, {_HOUR_OF} AS hour, "
            "{f_base:UInt64} + indexOf({f_hours:Array(DateTime('UTC'))}, hour), grp, countIf(ok = 1), "
            f"countIf(ok = 0){', ' + stat if column else ''} FROM ({rows}) GROUP BY hour, grp",
            parameters=params, settings=settings)
        client.insert(f"`{self.db}`.meter_usage_fills",
                      [(project_id, segment.definition, _from_epoch(h), counts[h], base + i)
                       for i, h in enumerate(epochs, 1)],
                      column_names=["project_id", "definition", "hour", "src_events", "fill_id"])
        self._remember(project_id, {(segment.definition, h, counts[h]): base + i for i, h in enumerate(epochs, 1)})
        return {(segment.definition, h): base + i for i, h in enumerate(epochs, 1)}


def _from_epoch(seconds: int) -> datetime:
    return datetime.fromtimestamp(int(seconds), UTC)


def _stored_group(segment: Segment, params: dict[str, Any]) -> str:
    if not segment.group_path:
        return "''"
    return group_expression(segment.meter, segment.group_path, params, prefix="fg_")


def rows_sql(db: str, resolved: list[Resolved], params: dict[str, Any], *, prefix: str) -> str:
    """Rows (hour, grp, ev = events, rj = rejected, stat) covering the segments exactly — segments of meters
    with ONE aggregation kind: their filled hours from the rollup (one read of the table for all of them, as
    long as no definition repeats), the rest from raw rows, both reduced by the same state expressions;
    ``merge_expression`` combines them. ``grp``: the meter's slug, its price version, or the stored
    group-by value."""
    kinds = {r.segment.meter.aggregation for r in resolved}
    assert len(kinds) <= 1, kinds
    parts = []
    batches: list[list[Resolved]] = []
    for r in resolved:
        if r.hour_range is None:
            continue
        batch = next((b for b in batches if all(x.segment.definition != r.segment.definition for x in b)), None)
        if batch is None:
            batches.append([r])
        else:
            batch.append(r)
    for n, batch in enumerate(batches):
        parts.append(_cached_sql(db, batch, params, prefix=f"{prefix}b{n}_"))
    for k, r in enumerate(resolved):
        if r.raw:
            parts.append(_raw_sql(db, r, params, prefix=f"{prefix}r{k}_"))
    return " UNION ALL ".join(parts)


def _cached_sql(db: str, batch: list[Resolved], params: dict[str, Any], *, prefix: str) -> str:
    column, _ = _STATS[batch[0].segment.meter.aggregation]
    conditions, arms, groups = [], [], []
    for k, r in enumerate(batch):
        p = f"{prefix}{k}_"
        assert r.hour_range is not None
        params[f"{p}def"] = r.segment.definition
        params[f"{p}lo"], params[f"{p}hi"] = r.hour_range
        # fill ids as runs of consecutive ids (one fill numbers its hours base+1, base+2, ...): usually one
        # run per fill instead of one bound id per hour; a run holds only ids that were chosen
        runs = []
        for i, (a, b) in enumerate(_runs(r.fill_ids)):
            params[f"{p}f{i}a"], params[f"{p}f{i}b"] = a, b
            runs.append(f"fill_id BETWEEN {{{p}f{i}a:UInt64}} AND {{{p}f{i}b:UInt64}}")
        conditions.append(f"(definition = {{{p}def:String}} AND hour >= {{{p}lo:DateTime('UTC')}} "
                          f"AND hour < {{{p}hi:DateTime('UTC')}} AND ({' OR '.join(runs)}))")
        groups.append(_read_group(r.segment, params, prefix=f"{p}g", stored="stored"))
        arms.append(f"definition = {{{p}def:String}}, {groups[-1]}")
    grp = groups[0] if len(groups) == 1 else f"multiIf({', '.join(arms)}, '')"
    return (f"SELECT hour, {grp} AS grp, events AS ev, rejected AS rj, {column or 'toUInt8(0)'} AS stat FROM ("
            f"SELECT hour, toDateTime64(hour, 3, 'UTC') AS time, definition, grp AS stored, events, rejected, units, "
            f"latest, uniq FROM `{db}`.meter_usage_by_hour WHERE project_id = {{project:String}} "
            f"AND ({' OR '.join(conditions)}))")


def _raw_sql(db: str, r: Resolved, params: dict[str, Any], *, prefix: str) -> str:
    _, stat = _STATS[r.segment.meter.aggregation]
    ranges = []
    for i, (a, b) in enumerate(r.raw):
        params[f"{prefix}{i}a"], params[f"{prefix}{i}b"] = a, b
        ranges.append(f"(time >= {{{prefix}{i}a:{_TIME}}} AND time < {{{prefix}{i}b:{_TIME}}})")
    grp = _read_group(r.segment, params, prefix=f"{prefix}g", stored=None)
    rows = version_rows_sql(db, r.segment.version, params, prefix=f"{prefix}v", columns=f"time, {grp} AS grp",
                            extra_where=[f"({' OR '.join(ranges)})"])
    return (f"SELECT {_HOUR_OF} AS hour, grp, countIf(ok = 1) AS ev, countIf(ok = 0) AS rj, {stat} AS stat "
            f"FROM ({rows}) GROUP BY hour, grp")


def _runs(ids: tuple[int, ...]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in sorted(ids):
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def _read_group(segment: Segment, params: dict[str, Any], *, prefix: str, stored: str | None) -> str:
    """The group a read reports: over stored rollup rows (``stored`` = the stored group column, ``time`` = the
    hour) or over raw rows (``stored`` None: computed from ``data`` / ``time``)."""
    if segment.group_path and stored is not None:
        return stored
    return group_expression(segment.meter, segment.group_by, params, prefix=prefix)
