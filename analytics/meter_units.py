"""Units as a METER defines them, computed in ClickHouse from the stored events — pure SQL building, no I/O.

The usage tables store every accepted CloudEvent with its raw ``data``. What a meter counts is decided by its
definition, version by version (streams/metering.py is the reference; this mirrors it in SQL):

- events of the version's ``event_type`` whose time falls in the version's life [created_at, superseded_at);
- that match every filter (the value at the filter's path is one of its values; compared as JSON text, so
  ``1`` and ``1.0`` differ where Python would call them equal);
- whose value is valid for the aggregation: a number or a numeric string for SUM (not negative), MAX and
  LATEST; any scalar for UNIQUE_COUNT; anything for COUNT. An event failing this is what streams
  dead-letters as ``bad_value`` — it is reported as ``rejected_events``, never as units (``"tokens": "lots"``
  counts 0 units, not 1);
- aggregated as the meter says: SUM, COUNT, MAX, LATEST (the value of the latest event time), UNIQUE_COUNT.

Known differences from billing, stated: billing charges from the time the worker loaded a version (here: the
event time against the version's created_at); an event refused by ANOTHER meter of its type is refused for all
in streams but counted here by the meters it is valid for; units carry 9 decimals (the table's scale).
Billed credits come from the ledger's usage transactions (``billed_minor``), which is what was charged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from analytics.errors import BadQuery
from streams.catalog_model import parse_path

__all__ = ["MeterSpec", "MeterVersion", "group_expression", "meter_rows_sql", "units_expression", "version_rows_sql"]


@dataclass(frozen=True)
class MeterVersion:
    event_type: str
    aggregation: str  # SUM / COUNT / MAX / UNIQUE_COUNT / LATEST
    value_property: str | None
    filters: tuple[dict[str, Any], ...]
    valid_from: datetime
    valid_to: datetime | None


@dataclass(frozen=True)
class MeterSpec:
    id: str
    slug: str
    group_by: tuple[str, ...]
    versions: tuple[MeterVersion, ...]  # oldest first
    priced: bool = True
    event_type: str = field(default="")
    #: (price version id, effective_from), ascending: the version in effect at an event's time prices it, and
    #: events before the first version use the first (streams' CatalogSnapshot.price_at)
    price_versions: tuple[tuple[str, datetime], ...] = ()

    @property
    def aggregation(self) -> str:
        return self.versions[-1].aggregation.upper()


class _Params:
    """Bound parameters with unique names (values never enter the SQL text)."""

    def __init__(self, params: dict[str, Any], prefix: str) -> None:
        self.params = params
        self.prefix = prefix
        self.n = 0

    def bind(self, value: Any, type_: str) -> str:
        name = f"{self.prefix}{self.n}"
        self.n += 1
        self.params[name] = value
        return f"{{{name}:{type_}}}"


def _path_args(path: str, p: _Params) -> str:
    try:
        steps = parse_path(path)
    except ValueError as exc:
        raise BadQuery(str(exc)) from None
    # JSON indices are 1-based in ClickHouse's JSONExtract*; keys are bound strings
    return ", ".join(str(s + 1) if isinstance(s, int) else p.bind(s, "String") for s in steps)


_NUMERIC = "('Int64', 'UInt64', 'Double')"
_TIME = "DateTime64(6, 'UTC')"
_GROUP_PATH = re.compile(r"^(\$|data)(\.[A-Za-z0-9_\-]{1,64}(\[\d{1,4}\])?){1,5}$")


def _number(raw: str) -> str:
    """The value as Decimal(38, 9), or NULL when it is not a number / numeric string — from the RAW JSON text
    of the value (one JSON parse per row: extraction dominates these queries' CPU). A JSON string is decoded
    only on its own (rare) branch: multiIf evaluates lazily. ``true``, ``null``, objects, a missing path: NULL."""
    return (f"multiIf(startsWith({raw}, '\"'), "
            f"toDecimal128OrNull(trimBoth(JSONExtractString(concat('[', {raw}, ']'), 1)), 9), "
            f"toDecimal128OrNull({raw}, 9))")


def _version_select(db: str, version: MeterVersion, p: _Params, *, extra_where: list[str], columns: str) -> str:
    aggregation = version.aggregation.upper()
    where = ["project_id = {project:String}", f"event_type = {p.bind(version.event_type, 'String')}",
             f"time >= {p.bind(version.valid_from, _TIME)}", *extra_where]
    if version.valid_to is not None:
        where.append(f"time < {p.bind(version.valid_to, _TIME)}")
    for spec in version.filters:
        values = [spec["equals"]] if "equals" in spec else list(spec.get("in") or [])
        raw_values = [orjson.dumps(v).decode() for v in values]
        where.append(f"JSONExtractRaw(data, {_path_args(str(spec['property']), p)}) IN "
                     f"{p.bind(raw_values, 'Array(String)')}")
    if aggregation == "COUNT" or not version.value_property:
        value, unique, ok = "toDecimal128(1, 9)", "''", "1"
        # the same columns as every other version's part of the UNION ALL
        columns = f"{columns}, '' AS _raw, CAST(NULL AS Nullable(Decimal(38, 9))) AS _n"
    else:
        raw = f"JSONExtractRaw(data, {_path_args(version.value_property, p)})"
        value, unique = "_n", "_raw"
        if aggregation == "UNIQUE_COUNT":  # any scalar: not missing, null, an object or an array
            ok = "_raw != '' AND _raw != 'null' AND substring(_raw, 1, 1) NOT IN (char(123), char(91))"  # { [
        elif aggregation == "SUM":
            ok = "ifNull(_n >= 0, 0)"
        else:
            ok = "isNotNull(_n)"
        columns = f"{columns}, {raw} AS _raw, {_number('_raw')} AS _n"
    return (f"SELECT {columns}, {value} AS v, {unique} AS u, toUInt8({ok}) AS ok "
            f"FROM `{db}`.usage_events WHERE {' AND '.join(where)}")


def meter_rows_sql(db: str, meter: MeterSpec, params: dict[str, Any], *, prefix: str, extra_where: list[str],
                   columns: str) -> str:
    """A subquery over the meter's events (every version, each with its own definition): ``columns`` plus
    ``v`` (the value as Decimal, NULL when invalid), ``u`` (the raw value, for UNIQUE_COUNT) and ``ok``."""
    p = _Params(params, prefix)
    return " UNION ALL ".join(_version_select(db, v, p, extra_where=extra_where, columns=columns)
                              for v in meter.versions)


def version_rows_sql(db: str, version: MeterVersion, params: dict[str, Any], *, prefix: str,
                     extra_where: list[str], columns: str) -> str:
    """``meter_rows_sql`` for ONE version (the hourly rollup fills and reads each version on its own)."""
    return _version_select(db, version, _Params(params, prefix), extra_where=extra_where, columns=columns)


def units_expression(aggregation: str) -> str:
    """The meter's units over rows of ``meter_rows_sql`` (a number; wrap in toString for exact text)."""
    return {"SUM": "sumIf(v, ok = 1)", "COUNT": "countIf(ok = 1)", "MAX": "maxIf(v, ok = 1)",
            "LATEST": "argMaxIf(v, time, ok = 1)", "UNIQUE_COUNT": "uniqExactIf(u, ok = 1)"}[aggregation.upper()]


def group_expression(meter: MeterSpec, group_by: str, params: dict[str, Any], *, prefix: str) -> str:
    """``meter`` (one series), ``subject``, ``price_version`` (the version that prices each event, by event
    time), one of the meter's group-by paths (``$.model``), or ``data.<key>``."""
    p = _Params(params, prefix)
    if group_by == "meter":
        return p.bind(meter.slug, "String")
    if group_by == "subject":
        return "subject"
    if group_by == "price_version":
        if not meter.price_versions:
            return "'unpriced'"
        (first, _), rest = meter.price_versions[0], meter.price_versions[1:]
        if not rest:
            return p.bind(first, "String")
        # multiIf(time < start of v2, v1, time < start of v3, v2, ..., last)
        arms = []
        labels = [label for label, _ in meter.price_versions]
        for (_, start), label in zip(rest, labels, strict=False):
            arms.append(f"time < {p.bind(start, _TIME)}, {p.bind(label, 'String')}")
        return f"multiIf({', '.join(arms)}, {p.bind(labels[-1], 'String')})"
    if group_by in meter.group_by or group_by.startswith(("$.", "data.")):
        if not _GROUP_PATH.match(group_by):
            raise BadQuery("a group-by key is a JSON path of letters, digits, '_' or '-' ($.model, data.model)")
        path = "$." + group_by[5:] if group_by.startswith("data.") else group_by
        args = _path_args(path, p)
        return f"if(JSONType(data, {args}) = 'String', JSONExtractString(data, {args}), JSONExtractRaw(data, {args}))"
    raise BadQuery(f"group_by must be meter, subject, price_version, data.<key> or one of the meter's group-by keys "
                   f"({', '.join(meter.group_by) or 'none'})")
