"""Project-scoped analytics: pure SQL builders (``build_*`` -> ``Query``) and their execution (``Analytics``).

Every builder takes ``project_id`` and puts it in the WHERE clause as a bound parameter: no query can read
another project's rows. Values are always bound (``{name:Type}``), never formatted into SQL; the only
identifiers formatted in are the database name (validated by settings) and fixed expressions.

Wallet figures (over a window [start, end), from ledger transactions; the sink stores each transaction once
although the outbox relay may deliver it twice, so no FINAL; whole hours come from the ``flows_by_hour``
rollup and only the partial hours at a window's edges from raw rows, see ``_tx_rows``):
- issued   = credits granted: top_up + subscription_grant + bonus + promo + refund, and positive adjustments;
- spent    = −(usage + debit + reservation_commit) (a volume-price credit-back is a negative spend);
- expired  = −expiry (breakage);
- adjusted_out = −(negative adjustments);
- net_movement = Σ amount_minor of every transaction in the window = the change in outstanding credits;
  issued − spent − expired − adjusted_out + other = net_movement, where ``other`` is any kind this module
  does not classify (0 today; reported so nothing is silently dropped).
- utilization_rate = spent / issued. It exceeds 1 when the window's spending burns balances issued BEFORE
  the window (hoarded credits): issuance is counted only inside the window, consumption of any vintage is.
- expiration_rate = expired / issued, likewise > 1 possible when older grants expire in the window.
Rates are decimal strings rounded to 4 places (ratios, not money); null when nothing was issued.

Usage figures come from usage_events; pre-aggregated projections answer them when the query shape allows
(filters on toStartOfMinute(time) use ``by_minute``; toStartOfHour(time) ``by_hour``; day/month per-subject
filters on toStartOfDay(time) use ``by_subject_day`` / ``by_subject_meter_day``), otherwise the raw rows
(primary key: project, event type, time) are scanned. Usage BY METER (units as each meter defines them,
analytics/meter_units.py) reads whole hours from the hourly per-meter rollup and the rest from raw rows
(analytics/meter_rollup.py: ``Analytics.usage`` / ``usage_totals``; ``build_usage`` / ``build_usage_totals`` are the
raw computation, used when the rollup cannot answer and as the reference the tests compare it with).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Literal

from clickhouse_connect.driver.client import Client

from analytics.client import ClientPool
from analytics.errors import BadQuery
from analytics.hours import STEP as _STEP
from analytics.hours import ceil_to as _ceil
from analytics.hours import floor_to as _floor
from analytics.hours import split_hours
from analytics.meter_rollup import (
    MeterRollup,
    Resolved,
    ResolveStats,
    merge_expression,
    plan,
    rollup_group_path,
    rows_sql,
)
from analytics.meter_units import MeterSpec, group_expression, meter_rows_sql, units_expression
from analytics.settings import AnalyticsSettings

Granularity = Literal["minute", "hour", "day", "month"]
GRANULARITIES: tuple[str, ...] = ("minute", "hour", "day", "month")
_JSON_KEY = re.compile(r"^[A-Za-z0-9_\-]{1,64}(\.[A-Za-z0-9_\-]{1,64}){0,4}$")

ISSUED_KINDS = ("top_up", "subscription_grant", "bonus", "promo", "refund")
SPENT_KINDS = ("usage", "debit", "reservation_commit")
PURCHASE_KINDS = ("top_up", "subscription_grant")
PAYWALL_REASONS = ("upgrade_required", "insufficient_balance", "insufficient_credits", "wallet_blocked",
                   "paywall")
RATE_PLACES = Decimal("0.0001")

#: A flow row's classification, over the columns every flow query reads: ``kind``, ``pos`` (amount > 0),
#: ``amount`` (a sum of amount_minor) and ``n`` (a count of transactions) — see ``_tx_rows``.
_ISSUED = f"(kind IN {ISSUED_KINDS!r} OR (kind = 'adjustment' AND pos))"


def _flows_sql(within: str = "1") -> str:
    """The flow aggregates over flow rows matching ``within`` (a fixed SQL condition)."""
    return f"""
    sumIf(amount, ({within}) AND {_ISSUED}) AS issued_minor,
    -sumIf(amount, ({within}) AND kind IN {SPENT_KINDS!r}) AS spent_minor,
    -sumIf(amount, ({within}) AND kind = 'expiry') AS expired_minor,
    -sumIf(amount, ({within}) AND kind = 'adjustment' AND NOT pos) AS adjusted_out_minor,
    sumIf(amount, {within}) AS net_movement_minor,
    sumIf(n, {within}) AS transactions"""


_FLOWS = _flows_sql()

#: A grant's source: the bucket source the ledger reported, else derived from the kind.
_SOURCE = ("if(bucket_source != '', bucket_source, multiIf(kind = 'top_up', 'top_up', kind = 'subscription_grant', "
           "'subscription', kind = 'bonus', 'bonus', kind = 'promo', 'promo', kind = 'refund', 'refund', "
           "'adjustment'))")

#: The pack or plan of a purchase: the first two ':' segments of source_ref ("pack:starter:cs_123" ->
#: "pack:starter"); a ref without ':' is its own key; no ref -> "(none)".
_OFFER = ("if(source_ref = '', '(none)', arrayStringConcat(arraySlice(splitByChar(':', source_ref), 1, 2), ':'))")


@dataclass(frozen=True)
class Query:
    sql: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime

    def as_dict(self) -> dict[str, str]:
        return {"from": self.start.isoformat(), "to": self.end.isoformat()}


# ----------------------------------------------------------------------------- windows and buckets


def _aware(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise BadQuery(f"{name} must carry a timezone (e.g. 2026-11-01T00:00:00Z)")
    return moment.astimezone(UTC)


def window(start: datetime | None, end: datetime | None, *, default_days: int = 30,
           now: datetime | None = None) -> Window:
    """[start, end) in UTC; defaults to the last ``default_days`` days."""
    end = _aware(end, "to") if end else (now or datetime.now(UTC))
    start = _aware(start, "from") if start else end - timedelta(days=default_days)
    if start >= end:
        raise BadQuery("`from` must be before `to`")
    if end - start > timedelta(days=3_660):
        raise BadQuery("a window may span at most ten years")
    return Window(start, end)


def aligned(win: Window, unit: str) -> Window:
    """The window widened to whole ``unit``s (the pre-aggregations hold whole minutes/days)."""
    return Window(_floor(win.start, unit), _ceil(win.end, unit))


def check_buckets(win: Window, granularity: str, buckets_max: int) -> None:
    if granularity not in GRANULARITIES:
        raise BadQuery(f"granularity must be one of {', '.join(GRANULARITIES)}")
    count = (win.end - win.start) / _STEP[granularity]
    if count > buckets_max:
        raise BadQuery(f"{granularity} buckets over this window would be ~{int(count)}; at most {buckets_max} "
                       "— use a coarser granularity or a shorter window")


def _bucket(granularity: str, base: str) -> str:
    """Bucket expression over ``base`` (toStartOf{Minute,Hour,Day}(time)), as UTC DateTime."""
    if granularity == "minute" or (granularity == "hour" and base.startswith("toStartOfHour")):
        return base
    if granularity == "hour":
        return f"toStartOfHour({base})"
    if granularity == "day":
        return f"toStartOfDay({base})"
    return f"toDateTime(toStartOfMonth({base}), 'UTC')"


def _json_key(key: str) -> list[str]:
    if not _JSON_KEY.match(key):
        raise BadQuery("a data key is letters, digits, '_' or '-', dotted for nesting (at most 5 levels)")
    return key.split(".")


def _json_args(parts: list[str], params: dict[str, Any], prefix: str) -> str:
    names = []
    for i, part in enumerate(parts):
        params[f"{prefix}{i}"] = part
        names.append(f"{{{prefix}{i}:String}}")
    return ", ".join(names)


# ----------------------------------------------------------------------------- usage builders


def _meter_window(win: Window, params: dict[str, Any]) -> list[str]:
    params["start"], params["end"] = win.start, win.end
    return ["time >= {start:DateTime64(3, 'UTC')}", "time < {end:DateTime64(3, 'UTC')}"]


def _time_bucket(granularity: str) -> str:
    return {"minute": "toStartOfMinute(time)", "hour": "toStartOfHour(time)", "day": "toStartOfDay(time)",
            "month": "toDateTime(toStartOfMonth(time), 'UTC')"}[granularity]


def build_usage(*, db: str, project_id: str, win: Window, granularity: str, meters: list[MeterSpec],
                subject: str | None = None, group_by: str | None = None,
                buckets_max: int = 5_000) -> tuple[Query, Window]:
    """Events, units and rejected events per bucket, as each meter defines its units (analytics/meter_units.py).
    ``group_by``: "meter" (one series per meter), or — for ONE meter — "subject", one of the meter's group-by
    paths ("$.model") or "data.<key>"."""
    group_by = group_by or "meter"
    if group_by != "meter" and len(meters) != 1:
        raise BadQuery("group_by subject or a data key needs one meter (?meter=slug)")
    if granularity not in GRANULARITIES:
        raise BadQuery(f"granularity must be one of {', '.join(GRANULARITIES)}")
    win = aligned(win, granularity)
    check_buckets(win, granularity, buckets_max)
    params: dict[str, Any] = {"project": project_id}
    where = _meter_window(win, params)
    if subject is not None:
        where.append("subject = {subject:String}")
        params["subject"] = subject
    bucket = _time_bucket(granularity)
    parts = []
    for n, meter in enumerate(meters):
        grp = group_expression(meter, group_by, params, prefix=f"g{n}_")
        rows = meter_rows_sql(db, meter, params, prefix=f"m{n}_", extra_where=where,
                              columns=f"time, {grp} AS grp")
        parts.append(f"SELECT formatDateTime({bucket}, '%Y-%m-%dT%H:%i:%S+00:00', 'UTC') AS bucket, grp, "
                     f"countIf(ok = 1) AS events, toString({units_expression(meter.aggregation)}) AS total_units, "
                     f"countIf(ok = 0) AS rejected FROM ({rows}) GROUP BY bucket, grp")
    if not parts:
        return Query("SELECT '' AS bucket, '' AS grp, 0 AS events, '0' AS total_units, 0 AS rejected WHERE 0",
                     {}), win
    sql = f"SELECT * FROM ({' UNION ALL '.join(parts)}) ORDER BY bucket, grp"
    return Query(sql, params), win


def build_usage_totals(*, db: str, project_id: str, win: Window, meters: list[MeterSpec]) -> list[Query]:
    """Per meter over the window: events counted, units, and rejected events (invalid values): one query per
    meter, each reading only its event type's rows (the sort key's prefix)."""
    queries = []
    for meter in meters:
        params: dict[str, Any] = {"project": project_id}
        rows = meter_rows_sql(db, meter, params, prefix="m_", extra_where=_meter_window(win, params),
                              columns="time")
        queries.append(Query(f"SELECT countIf(ok = 1) AS events, toString({units_expression(meter.aggregation)}) "
                             f"AS total_units, countIf(ok = 0) AS rejected FROM ({rows})", params))
    return queries


_HOUR_BUCKET = {"hour": "hour", "day": "toStartOfDay(hour)", "month": "toDateTime(toStartOfMonth(hour), 'UTC')"}


def _by_aggregation(meters: list[tuple[MeterSpec, list[Resolved]]]) -> dict[str, list[Resolved]]:
    out: dict[str, list[Resolved]] = {}
    for meter, resolved in meters:
        out.setdefault(meter.aggregation, []).extend(resolved)
    return out


def build_usage_from_rollup(*, db: str, project_id: str, granularity: str,
                            meters: list[tuple[MeterSpec, list[Resolved]]]) -> Query:
    """``build_usage`` (same rows, same order) with whole hours from the hourly rollup (analytics/meter_rollup.py):
    hour/day/month buckets; group by meter, price version or a group-by path; no subject filter. Meters of one
    aggregation kind share one read of the rollup (grp = the meter's slug when grouping by meter)."""
    params: dict[str, Any] = {"project": project_id}
    bucket = _HOUR_BUCKET[granularity]
    parts = []
    for n, (aggregation, resolved) in enumerate(_by_aggregation(meters).items()):
        rows = rows_sql(db, resolved, params, prefix=f"a{n}")
        if rows:
            parts.append(f"SELECT formatDateTime({bucket}, '%Y-%m-%dT%H:%i:%S+00:00', 'UTC') AS bucket, grp, "
                         f"sum(ev) AS events, toString({merge_expression(aggregation)}) AS total_units, "
                         f"sum(rj) AS rejected FROM ({rows}) GROUP BY bucket, grp")
    if not parts:
        return Query("SELECT '' AS bucket, '' AS grp, 0 AS events, '0' AS total_units, 0 AS rejected WHERE 0", {})
    return Query(f"SELECT * FROM ({' UNION ALL '.join(parts)}) ORDER BY bucket, grp", params)


def build_usage_totals_from_rollup(*, db: str, project_id: str,
                                   meters: list[tuple[MeterSpec, list[Resolved]]]) -> Query:
    """``build_usage_totals``'s figures for every meter in ONE query (a row per meter that has rows: ``meter``
    = its slug), whole hours from the hourly rollup."""
    params: dict[str, Any] = {"project": project_id}
    parts = []
    for n, (aggregation, resolved) in enumerate(_by_aggregation(meters).items()):
        rows = rows_sql(db, resolved, params, prefix=f"a{n}")
        if rows:
            parts.append(f"SELECT grp AS meter, sum(ev) AS events, toString({merge_expression(aggregation)}) "
                         f"AS total_units, sum(rj) AS rejected FROM ({rows}) GROUP BY grp")
    if not parts:
        return Query("SELECT '' AS meter, 0 AS events, '0' AS total_units, 0 AS rejected WHERE 0", {})
    return Query(" UNION ALL ".join(parts), params)


def build_billed_by_meter(*, db: str, project_id: str, win: Window) -> Query:
    """Credits the ledger charged per meter in the window (usage transactions; a credit-back is negative)."""
    where, params = _tx_where(project_id, win, None)
    return Query(f"SELECT meter_id, -sum(amount_minor) AS billed_minor, count() AS transactions "
                 f"FROM `{db}`.ledger_transactions WHERE {where} AND kind = 'usage' AND meter_id != '' "
                 "GROUP BY meter_id", params)


def build_dead_letter_reasons(*, db: str, project_id: str, win: Window) -> Query:
    """Dead-lettered usage messages of the project in the window, by reason (unknown_meter, bad_value, ...)."""
    return Query(f"SELECT reason, count() AS messages FROM `{db}`.dead_letters WHERE project_id = {{project:String}} "
                 "AND received_at >= {start:DateTime64(3, 'UTC')} AND received_at < {end:DateTime64(3, 'UTC')} "
                 "GROUP BY reason ORDER BY messages DESC, reason",
                 {"project": project_id, "start": win.start, "end": win.end})


def build_top_consumers(*, db: str, project_id: str, win: Window, meter: MeterSpec | None = None,
                        limit: int = 10) -> tuple[Query, Window]:
    """Subjects by units of one meter (as the meter counts them), or by events across all types."""
    if not 1 <= limit <= 1_000:
        raise BadQuery("limit must be between 1 and 1000")
    if meter is None:
        win = aligned(win, "day")
        params: dict[str, Any] = {"project": project_id, "start": win.start, "end": win.end, "limit": limit}
        sql = (f"SELECT subject, count() AS events FROM `{db}`.usage_events WHERE project_id = {{project:String}} "
               "AND toStartOfDay(time) >= {start:DateTime64(3, 'UTC')} AND toStartOfDay(time) < "
               "{end:DateTime64(3, 'UTC')} GROUP BY subject ORDER BY events DESC, subject LIMIT {limit:UInt32}")
        return Query(sql, params), win
    params = {"project": project_id, "limit": limit}
    rows = meter_rows_sql(db, meter, params, prefix="m_", extra_where=_meter_window(win, params),
                          columns="time, subject")
    units = units_expression(meter.aggregation)
    sql = (f"SELECT subject, countIf(ok = 1) AS events, toString({units}) AS total_units FROM ({rows}) "
           f"GROUP BY subject HAVING events > 0 ORDER BY {units} DESC, subject LIMIT {{limit:UInt32}}")
    return Query(sql, params), win


# ----------------------------------------------------------------------------- wallet builders


def _tx_from(db: str, wallet_id: str | None) -> str:
    """Where transactions are read from, each transaction once.

    Project-wide: the table itself — the sink stores a transaction once (it drops a copy whose transaction_id
    is already stored, analytics/sink.py), so no FINAL is needed and the ``flows_by_hour`` rollup can answer.
    One wallet: its rows through the ``by_wallet`` projection, with LIMIT 1 BY transaction_id on top (a
    wallet's rows are few; it also hides a copy a stalled former sink might have written until a merge drops
    it). Binds {project} and {wallet}."""
    if wallet_id is None:
        return f"`{db}`.ledger_transactions"
    return (f"(SELECT * FROM `{db}`.ledger_transactions WHERE project_id = {{project:String}} "
            "AND wallet_id = {wallet:String} ORDER BY transaction_id LIMIT 1 BY transaction_id)")


def _tx_where(project_id: str, win: Window, wallet_id: str | None) -> tuple[str, dict[str, Any]]:
    params: dict[str, Any] = {"project": project_id, "start": win.start, "end": win.end}
    where = ("project_id = {project:String} AND created_at >= {start:DateTime64(6, 'UTC')} "
             "AND created_at < {end:DateTime64(6, 'UTC')}")
    if wallet_id is not None:
        where += " AND wallet_id = {wallet:String}"
        params["wallet"] = wallet_id
    return where, params


_RAW_ROW = ("created_at AS ts, kind, bucket_source, amount_minor > 0 AS pos, amount_minor AS amount, "
            "toUInt64(1) AS n")



def _tx_rows(db: str, params: dict[str, Any], *, lo: datetime | None, hi: datetime,
             cuts: tuple[datetime, ...] = (), wallet_id: str | None = None, rollup: bool = True) -> str:
    """A subquery of flow rows (ts, kind, bucket_source, pos, amount, n) covering created_at in [lo, hi)
    exactly, for the project {project} (and the wallet {wallet}). Project-wide with ``rollup``: whole hours
    from the ``flows_by_hour`` projection (one row per hour/kind/source/sign, ts = the hour), partial hours
    around lo, hi and ``cuts`` from raw rows (ts = created_at); so ``ts >= cut`` is exact for every row."""
    if wallet_id is not None or not rollup:
        where = ["project_id = {project:String}", "created_at < {tx_hi:DateTime64(6, 'UTC')}"]
        params["tx_hi"] = hi
        if lo is not None:
            where.append("created_at >= {tx_lo:DateTime64(6, 'UTC')}")
            params["tx_lo"] = lo
        if wallet_id is not None:
            where.append("wallet_id = {wallet:String}")
            params["wallet"] = wallet_id
        return f"(SELECT {_RAW_ROW} FROM {_tx_from(db, wallet_id)} WHERE {' AND '.join(where)})"
    split = split_hours(lo, hi, cuts)
    parts = []
    if split.rollup:
        hour = "toStartOfHour(created_at)"
        ranges = []
        for i, (a, b) in enumerate(split.rollup):
            params[f"h{i}_hi"] = b
            cond = f"{hour} < {{h{i}_hi:DateTime64(6, 'UTC')}}"
            if a is not None:
                params[f"h{i}_lo"] = a
                cond = f"{hour} >= {{h{i}_lo:DateTime64(6, 'UTC')}} AND {cond}"
            ranges.append(f"({cond})")
        parts.append(
            f"SELECT toDateTime64({hour}, 6, 'UTC') AS ts, kind, bucket_source, amount_minor > 0 AS pos, "
            f"sum(amount_minor) AS amount, count() AS n FROM `{db}`.ledger_transactions "
            f"WHERE project_id = {{project:String}} AND ({' OR '.join(ranges)}) GROUP BY ts, kind, bucket_source, pos")
    if split.raw:
        ranges = []
        for i, (a, b) in enumerate(split.raw):
            params[f"r{i}_lo"], params[f"r{i}_hi"] = a, b
            ranges.append(f"(created_at >= {{r{i}_lo:DateTime64(6, 'UTC')}} AND created_at < {{r{i}_hi:DateTime64(6, 'UTC')}})")
        parts.append(f"SELECT {_RAW_ROW} FROM `{db}`.ledger_transactions WHERE project_id = {{project:String}} "
                     f"AND ({' OR '.join(ranges)})")
    return "(" + " UNION ALL ".join(parts) + ")"


def build_wallet_flows(*, db: str, project_id: str, win: Window, wallet_id: str | None = None) -> Query:
    params: dict[str, Any] = {"project": project_id}
    rows = _tx_rows(db, params, lo=win.start, hi=win.end, wallet_id=wallet_id)
    return Query(f"SELECT {_FLOWS} FROM {rows}", params)


def build_wallet_summary(*, db: str, project_id: str, win: Window, wallet_id: str | None = None) -> Query:
    """The window's flows, the outstanding credits at its start and the source breakdown, in ONE query over
    history up to the window's end (whole hours from the rollup). Outstanding at t = Σ amount_minor before t
    (the ledger's invariant: a balance is the sum of its transactions' amounts). Rows: one with
    ``is_total = 1`` (the figures), one per source of credits issued in the window (``grants > 0``)."""
    params: dict[str, Any] = {"project": project_id, "start": win.start}
    rows = _tx_rows(db, params, lo=None, hi=win.end, cuts=(win.start,), wallet_id=wallet_id)
    within = "ts >= {start:DateTime64(6, 'UTC')}"
    return Query(
        f"SELECT grouping({_SOURCE}) = 1 AS is_total, {_SOURCE} AS source, "
        f"sumIf(amount, NOT ({within})) AS outstanding_start_minor, {_flows_sql(within)}, "
        f"sumIf(n, ({within}) AND {_ISSUED}) AS grants FROM {rows} GROUP BY GROUPING SETS ((), ({_SOURCE}))",
        params)


def build_outstanding(*, db: str, project_id: str, at: datetime, wallet_id: str | None = None) -> Query:
    """Outstanding credits at ``at`` = Σ amount_minor of every transaction before it (the ledger's invariant:
    a wallet's balance is the sum of its transactions' amounts). Whole hours from the rollup."""
    params: dict[str, Any] = {"project": project_id}
    rows = _tx_rows(db, params, lo=None, hi=at, wallet_id=wallet_id)
    return Query(f"SELECT sum(amount) AS outstanding_minor FROM {rows}", params)


def _tx_bucket(granularity: str) -> str:
    if granularity == "month":
        return "toDateTime(toStartOfMonth(ts), 'UTC')"
    fn = {"minute": "toStartOfMinute", "hour": "toStartOfHour", "day": "toStartOfDay"}[granularity]
    return f"toDateTime({fn}(ts), 'UTC')"


def build_credit_flow(*, db: str, project_id: str, win: Window, granularity: str, wallet_id: str | None = None,
                      buckets_max: int = 5_000) -> Query:
    """Flows per bucket; hour/day/month buckets from the hourly rollup, minute buckets from raw rows."""
    check_buckets(win, granularity, buckets_max)
    params: dict[str, Any] = {"project": project_id}
    rows = _tx_rows(db, params, lo=win.start, hi=win.end, wallet_id=wallet_id, rollup=granularity != "minute")
    return Query(f"SELECT {_tx_bucket(granularity)} AS bucket, {_FLOWS} FROM {rows} GROUP BY bucket ORDER BY bucket",
                 params)


def build_source_breakdown(*, db: str, project_id: str, win: Window, wallet_id: str | None = None) -> Query:
    params: dict[str, Any] = {"project": project_id}
    rows = _tx_rows(db, params, lo=win.start, hi=win.end, wallet_id=wallet_id)
    return Query(
        f"SELECT {_SOURCE} AS source, sum(amount) AS issued_minor, sum(n) AS grants FROM {rows} WHERE {_ISSUED} "
        "GROUP BY source ORDER BY issued_minor DESC, source", params)


def build_top_wallets(*, db: str, project_id: str, win: Window, limit: int = 10) -> Query:
    if not 1 <= limit <= 1_000:
        raise BadQuery("limit must be between 1 and 1000")
    where, params = _tx_where(project_id, win, None)
    params["limit"] = limit
    return Query(f"SELECT wallet_id, {_FLOWS} FROM (SELECT wallet_id, {_RAW_ROW} FROM {_tx_from(db, None)} "
                 f"WHERE {where}) GROUP BY wallet_id ORDER BY spent_minor DESC, wallet_id LIMIT {{limit:UInt32}}",
                 params)


def build_wallet_transactions(*, db: str, project_id: str, wallet_id: str, limit: int = 100,
                              before_id: int | None = None) -> Query:
    if not 1 <= limit <= 500:
        raise BadQuery("limit must be between 1 and 500")
    params: dict[str, Any] = {"project": project_id, "wallet": wallet_id, "limit": limit}
    where = "project_id = {project:String} AND wallet_id = {wallet:String}"
    if before_id is not None:
        where += " AND transaction_id < {before:Int64}"
        params["before"] = before_id
    return Query(
        "SELECT transaction_id, kind, amount_minor, balance_before_minor, balance_after_minor, bucket_source, "
        "source_ref, meter_id, related_transaction_id, reason, created_at "
        f"FROM {_tx_from(db, wallet_id)} WHERE {where} ORDER BY transaction_id DESC LIMIT {{limit:UInt32}}",
        params)


def build_revenue(*, db: str, project_id: str, win: Window) -> Query:
    where, params = _tx_where(project_id, win, None)
    return Query(
        f"SELECT kind, {_OFFER} AS offer, sum(amount_minor) AS credits_minor, count() AS purchases, "
        f"uniqExact(wallet_id) AS wallets FROM {_tx_from(db, None)} WHERE {where} "
        f"AND kind IN {PURCHASE_KINDS!r} AND amount_minor > 0 GROUP BY kind, offer "
        "ORDER BY credits_minor DESC, offer", params)


# ----------------------------------------------------------------------------- paywall and dead letters


def build_decision_reasons(*, db: str, project_id: str, win: Window) -> Query:
    params = {"project": project_id, "start": win.start, "end": win.end}
    return Query(
        "SELECT allowed, reason, policy_id, count() AS decisions, uniqExact(subject) AS subjects "
        f"FROM `{db}`.access_decisions FINAL WHERE project_id = {{project:String}} "
        "AND time >= {start:DateTime64(3, 'UTC')} AND time < {end:DateTime64(3, 'UTC')} "
        "GROUP BY allowed, reason, policy_id ORDER BY decisions DESC", params)


def build_paywall_funnel(*, db: str, project_id: str, win: Window) -> Query:
    """Subjects that (1) asked for access, (2) were denied by a paywall reason, (3) then bought credits or a
    plan (top_up / subscription_grant on the wallet of a paywalled decision, after the first denial), and
    (4) were allowed again after buying."""
    params = {"project": project_id, "start": win.start, "end": win.end}
    sql = f"""
WITH d AS (
    SELECT subject, wallet_id, allowed, reason, time FROM `{db}`.access_decisions FINAL
    WHERE project_id = {{project:String}} AND time >= {{start:DateTime64(3, 'UTC')}}
      AND time < {{end:DateTime64(3, 'UTC')}}),
walled AS (
    SELECT subject, any(wallet_id) AS wallet_id, min(time) AS first_denied FROM d
    WHERE allowed = 0 AND reason IN {PAYWALL_REASONS!r} GROUP BY subject),
bought AS (
    SELECT w.subject AS subject, min(t.created_at) AS first_purchase
    FROM walled AS w INNER JOIN (
        SELECT wallet_id, created_at FROM {_tx_from(db, None)}
        WHERE project_id = {{project:String}} AND kind IN {PURCHASE_KINDS!r} AND amount_minor > 0
          AND created_at >= {{start:DateTime64(6, 'UTC')}} AND created_at < {{end:DateTime64(6, 'UTC')}}
    ) AS t ON t.wallet_id = w.wallet_id
    WHERE w.wallet_id != '' AND t.created_at >= w.first_denied GROUP BY w.subject)
SELECT
    (SELECT uniqExact(subject) FROM d) AS requested,
    (SELECT count() FROM walled) AS paywalled,
    (SELECT count() FROM bought) AS purchased,
    (SELECT uniqExact(d.subject) FROM d INNER JOIN bought AS b ON b.subject = d.subject
      WHERE d.allowed = 1 AND d.time >= b.first_purchase) AS returned"""
    return Query(sql, params)


def build_dead_letters(*, db: str, project_id: str, limit: int = 50) -> Query:
    if not 1 <= limit <= 200:
        raise BadQuery("limit must be between 1 and 200")
    return Query(
        "SELECT received_at, reason, payload, headers, kafka_partition, kafka_offset "
        f"FROM `{db}`.dead_letters WHERE project_id = {{project:String}} "
        "ORDER BY received_at DESC, kafka_partition, kafka_offset DESC LIMIT {limit:UInt32}",
        {"project": project_id, "limit": limit})


# ----------------------------------------------------------------------------- execution


def rate(numerator: int, denominator: int) -> str | None:
    if denominator <= 0:
        return None
    return str((Decimal(numerator) / Decimal(denominator)).quantize(RATE_PLACES, rounding=ROUND_HALF_EVEN))


def _flows(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: int(row[k] or 0) for k in ("issued_minor", "spent_minor", "expired_minor", "adjusted_out_minor",
                                          "net_movement_minor", "transactions")}
    out["other_minor"] = out["net_movement_minor"] - (out["issued_minor"] - out["spent_minor"]
                                                      - out["expired_minor"] - out["adjusted_out_minor"])
    out["utilization_rate"] = rate(out["spent_minor"], out["issued_minor"])
    out["expiration_rate"] = rate(out["expired_minor"], out["issued_minor"])
    return out


class Analytics:
    """Executes the builders for one database through a client pool (thread-safe)."""

    def __init__(self, settings: AnalyticsSettings, pool: ClientPool) -> None:
        self.settings = settings
        self.pool = pool
        self.db = settings.database
        self.rollup = MeterRollup(settings.database)
        #: what the last rollup read did (hours from the rollup, filled, empty); for tests and the bench
        self.last_rollup_stats: ResolveStats | None = None
        self._query_settings = {"max_execution_time": settings.query_timeout_s,
                                "max_memory_usage": settings.query_memory_bytes_max,
                                "do_not_merge_across_partitions_select_final": 1}

    def rows(self, query: Query) -> list[dict[str, Any]]:
        with self.pool.client() as client:
            return list(_dicts(client, query, self._query_settings))

    # usage
    def _resolved(self, client: Client, project_id: str, win: Window, group_by: str,
                  meters: list[MeterSpec]) -> list[tuple[MeterSpec, list[Resolved]]]:
        settled_before = datetime.now(UTC) - timedelta(seconds=self.settings.meter_rollup_settle_s)
        planned = [(m, plan(m, win.start, win.end, group_by, settled_before=settled_before,
                            hours_max=self.settings.meter_rollup_hours_max)) for m in meters]
        resolved, self.last_rollup_stats = self.rollup.resolve(
            client, project_id, [s for _, segments in planned for s in segments], self._query_settings)
        out, i = [], 0
        for meter, segments in planned:
            out.append((meter, resolved[i:i + len(segments)]))
            i += len(segments)
        return out

    def _from_rollup(self, group_by: str, meters: list[MeterSpec]) -> bool:
        # slugs name the series (and a meter's rows are combined by slug): they must be distinct
        return (self.settings.meter_rollup and len({m.slug for m in meters}) == len(meters)
                and all(rollup_group_path(m, group_by) is not None for m in meters))

    def usage(self, *, project_id: str, win: Window, granularity: str, meters: list[MeterSpec],
              subject: str | None = None, group_by: str | None = None) -> dict[str, Any]:
        query, effective = build_usage(db=self.db, project_id=project_id, win=win, granularity=granularity,
                                       meters=meters, subject=subject, group_by=group_by,
                                       buckets_max=self.settings.buckets_max)
        group = group_by or "meter"
        with self.pool.client() as client:
            if granularity != "minute" and subject is None and self._from_rollup(group, meters):
                query = build_usage_from_rollup(db=self.db, project_id=project_id, granularity=granularity,
                                                meters=self._resolved(client, project_id, effective, group, meters))
            result = client.query(query.sql, parameters=query.params, settings=self._query_settings)
        # text columns already (bucket, group, units): no per-value conversion
        series = [{"bucket": bucket, "group": group, "events": int(events), "units": _units_text(units),
                   "rejected_events": int(rejected)}
                  for bucket, group, events, units, rejected in result.result_rows]
        return {"window": effective.as_dict(), "granularity": granularity, "group_by": group_by or "meter",
                "meters": [m.slug for m in meters], "series": series}

    def usage_totals(self, *, project_id: str, win: Window, meters: list[MeterSpec]) -> dict[str, Any]:
        """Per meter: units as the meter counts them and rejected events beside the credits the ledger billed;
        and the project's dead letters by reason (events no meter could take: unknown_meter, ...)."""
        billed = {r["meter_id"]: r for r in self.rows(build_billed_by_meter(db=self.db, project_id=project_id,
                                                                           win=win))}
        if self._from_rollup("meter", meters):
            with self.pool.client() as client:
                query = build_usage_totals_from_rollup(db=self.db, project_id=project_id,
                                                       meters=self._resolved(client, project_id, win, "meter", meters))
            found = {r["meter"]: r for r in self.rows(query)}
            rows = [found.get(m.slug, {"events": 0, "total_units": "0", "rejected": 0}) for m in meters]
        else:
            rows = [self.rows(q)[0] for q in build_usage_totals(db=self.db, project_id=project_id, win=win,
                                                                 meters=meters)]
        out = []
        for meter, row in zip(meters, rows, strict=True):
            charged = billed.get(meter.id)
            out.append({"meter": meter.slug, "meter_id": meter.id, "event_type": meter.versions[-1].event_type,
                        "aggregation": meter.aggregation, "priced": meter.priced, "events": int(row["events"]),
                        "units": _units_text(row["total_units"]), "rejected_events": int(row["rejected"]),
                        "billed_minor": int(charged["billed_minor"]) if charged else 0})
        letters = self.rows(build_dead_letter_reasons(db=self.db, project_id=project_id, win=win))
        return {"window": win.as_dict(), "meters": out,
                "dead_letters": [{"reason": r["reason"], "messages": int(r["messages"])} for r in letters]}

    def top_consumers(self, *, project_id: str, win: Window, meter: MeterSpec | None = None,
                      limit: int = 10) -> dict[str, Any]:
        query, effective = build_top_consumers(db=self.db, project_id=project_id, win=win, meter=meter, limit=limit)
        consumers = [{"subject": r["subject"], "events": int(r["events"]),
                      **({"units": _units_text(r["total_units"])} if "total_units" in r else {})}
                     for r in self.rows(query)]
        return {"window": effective.as_dict(), "meter": meter.slug if meter else None, "consumers": consumers}

    # wallets
    def wallet_summary(self, *, project_id: str, win: Window, wallet_id: str | None = None) -> dict[str, Any]:
        rows = self.rows(build_wallet_summary(db=self.db, project_id=project_id, win=win, wallet_id=wallet_id))
        total = next(r for r in rows if r["is_total"])
        flows = _flows(total)
        start = int(total["outstanding_start_minor"] or 0)
        issued = [r for r in rows if not r["is_total"] and int(r["grants"]) > 0]
        issued.sort(key=lambda r: (-int(r["issued_minor"]), r["source"]))
        breakdown = [{"source": r["source"], "issued_minor": int(r["issued_minor"]), "grants": int(r["grants"]),
                      "share": rate(int(r["issued_minor"]), flows["issued_minor"])} for r in issued]
        # end = start + Σ amounts in [start, end): the same identity, without a second scan of history
        return {"window": win.as_dict(), "wallet_id": wallet_id, **flows, "outstanding_start_minor": start,
                "outstanding_end_minor": start + flows["net_movement_minor"], "sources": breakdown}

    def credit_flow(self, *, project_id: str, win: Window, granularity: str,
                    wallet_id: str | None = None) -> dict[str, Any]:
        query = build_credit_flow(db=self.db, project_id=project_id, win=win, granularity=granularity,
                                  wallet_id=wallet_id, buckets_max=self.settings.buckets_max)
        return {"window": win.as_dict(), "granularity": granularity, "wallet_id": wallet_id,
                "series": [{"bucket": r["bucket"], **_flows(r)} for r in self.rows(query)]}

    def source_breakdown(self, *, project_id: str, win: Window, wallet_id: str | None = None) -> dict[str, Any]:
        rows = self.rows(build_source_breakdown(db=self.db, project_id=project_id, win=win, wallet_id=wallet_id))
        total = sum(int(r["issued_minor"]) for r in rows)
        return {"window": win.as_dict(), "issued_minor": total,
                "sources": [{"source": r["source"], "issued_minor": int(r["issued_minor"]),
                             "grants": int(r["grants"]), "share": rate(int(r["issued_minor"]), total)}
                            for r in rows]}

    def top_wallets(self, *, project_id: str, win: Window, limit: int = 10) -> dict[str, Any]:
        rows = self.rows(build_top_wallets(db=self.db, project_id=project_id, win=win, limit=limit))
        return {"window": win.as_dict(), "wallets": [{"wallet_id": r["wallet_id"], **_flows(r)} for r in rows]}

    def wallet_transactions(self, *, project_id: str, wallet_id: str, limit: int = 100,
                            before_id: int | None = None) -> dict[str, Any]:
        rows = self.rows(build_wallet_transactions(db=self.db, project_id=project_id, wallet_id=wallet_id,
                                                   limit=limit, before_id=before_id))
        return {"wallet_id": wallet_id, "transactions": rows,
                "next_before_id": rows[-1]["transaction_id"] if len(rows) == limit else None}

    def revenue(self, *, project_id: str, win: Window) -> dict[str, Any]:
        rows = self.rows(build_revenue(db=self.db, project_id=project_id, win=win))
        return {"window": win.as_dict(), "offers": [
            {"kind": r["kind"], "offer": r["offer"], "credits_minor": int(r["credits_minor"]),
             "purchases": int(r["purchases"]), "wallets": int(r["wallets"])} for r in rows]}

    # paywall and dead letters
    def paywall_funnel(self, *, project_id: str, win: Window) -> dict[str, Any]:
        funnel = self.rows(build_paywall_funnel(db=self.db, project_id=project_id, win=win))[0]
        stages = [{"stage": name, "subjects": int(funnel[name])}
                  for name in ("requested", "paywalled", "purchased", "returned")]
        reasons = self.rows(build_decision_reasons(db=self.db, project_id=project_id, win=win))
        return {"window": win.as_dict(), "stages": stages,
                "conversion_rate": rate(int(funnel["purchased"]), int(funnel["paywalled"])),
                "reasons": [{**r, "allowed": bool(r["allowed"]), "decisions": int(r["decisions"]),
                             "subjects": int(r["subjects"])} for r in reasons]}

    def dead_letters(self, *, project_id: str, limit: int = 50) -> dict[str, Any]:
        return {"dead_letters": self.rows(build_dead_letters(db=self.db, project_id=project_id, limit=limit))}


def _units_text(text: str | None) -> str:
    """ClickHouse's decimal text, normalized ("12.500000000" -> "12.5"; NULL or "" of an empty set -> "0")."""
    if text is None:
        return "0"
    try:
        value = Decimal(text)
    except (ArithmeticError, ValueError):
        return "0"
    return format(value.normalize(), "f") if value.is_finite() and value else "0"


def _dicts(client: Client, query: Query, settings: dict[str, Any]) -> Iterator[dict[str, Any]]:
    result = client.query(query.sql, parameters=query.params, settings=settings)
    names = result.column_names
    for row in result.result_rows:
        yield {name: _plain(value) for name, value in zip(names, row, strict=True)}


def _plain(value: Any) -> Any:
    """JSON-ready values: UTC datetimes as ISO strings, Decimals as exact strings."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC).isoformat()
    if isinstance(value, Decimal):
        return format(value.normalize(), "f") if value else "0"
    return value
