"""Four-record reconciliation, the pure part: which of the records of one usage key disagree.

The same usage is recorded four times (docs/architecture.md "Continuous reconciliation"):

* ``usage_log`` — the events in ``usage.events.v1``, metered again with the workers' own core;
* ``ledger`` — the ledger's counters (units) and charges (PostgreSQL);
* ``clickhouse_usage`` — the events the analytics sink stored (``usage_events``), metered with the same core;
* ``clickhouse_flow`` — the usage postings the sink stored (``ledger_transactions``).

Readers (meterline/reconcile_sources.py, one per record) turn each into numbers per key (project, wallet,
meter, period, price version); this module only compares them. Two measures: ``units`` (usage_log, ledger,
clickhouse_usage) and ``charged_minor`` (ledger postings vs clickhouse_flow).

Who is named when values differ (``disagreeing``):
* three values, two equal → the odd one; all three different → all three;
* two values (a record left out because it has not settled, or the money measure, which only two records
  hold) → the COPY, never the reference: clickhouse_usage is a copy of the log, clickhouse_flow a copy of the
  ledger's postings, and the ledger is metered from the log (the log is the reference of ``units``).
A record missing a key counts as 0 (it has no event / posting for it), except a record not compared at all for
that key (``None`` is "not compared", never "zero")."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

__all__ = ["RECORDS", "Mismatch", "Reading", "compare_readings", "disagreeing", "drift_by_pair", "drift_wallets"]

USAGE_LOG, LEDGER, CLICKHOUSE_USAGE, CLICKHOUSE_FLOW = "usage_log", "ledger", "clickhouse_usage", "clickhouse_flow"
RECORDS = (USAGE_LOG, LEDGER, CLICKHOUSE_USAGE, CLICKHOUSE_FLOW)
#: when only two records are compared, the one trusted (the other is a copy of it)
REFERENCE_OF = {CLICKHOUSE_USAGE: USAGE_LOG, LEDGER: USAGE_LOG, CLICKHOUSE_FLOW: LEDGER}

#: (wallet_id, project_id, meter_id, period_start, price_version_id), as streams' CounterKeyTuple
Key = tuple[str, str, str, datetime, str]
Value = Decimal | int


@dataclass(frozen=True)
class Reading:
    """Several records' values of one measure over a set of keys, at one cut.

    ``values[record][key]``; a record absent from ``values`` is not part of this reading. ``cut`` says where the
    records were read up to (e.g. "ledger mark", "clickhouse watermark", "posted before 2026-12-03T18:00Z")."""

    measure: str  # "units" | "charged_minor"
    cut: str
    values: Mapping[str, Mapping[Key, Value]]


@dataclass(frozen=True)
class Mismatch:
    key: Key
    measure: str
    cut: str
    values: dict[str, Value]
    disagreeing: tuple[str, ...]
    #: money a repair of the disagreeing record would move (reference − disagreeing, priced; + = under-charged)
    amount_minor: int

    def as_row(self) -> dict[str, object]:
        wallet, project, meter, period, version = self.key
        return {"project_id": project, "wallet_id": wallet, "meter_id": meter, "period_start": period.isoformat(),
                "price_version_id": version, "measure": self.measure, "cut": self.cut,
                "values": {r: format(v, "f") if isinstance(v, Decimal) else v for r, v in self.values.items()},
                "disagreeing": list(self.disagreeing), "amount_minor": self.amount_minor}


def disagreeing(values: Mapping[str, Value]) -> tuple[str, ...]:
    """The records whose value is not the agreed one (rules in the module doc); () when all agree."""
    distinct = set(values.values())
    if len(distinct) <= 1:
        return ()
    if len(values) == 2:
        copy = next((r for r in values if REFERENCE_OF.get(r) in values), None)
        return (copy,) if copy is not None else tuple(sorted(values))
    counts: dict[Value, int] = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    majority = [v for v, n in counts.items() if n * 2 > len(values)]
    if not majority:
        return tuple(r for r in RECORDS if r in values)
    return tuple(r for r in RECORDS if r in values and values[r] != majority[0])


def compare_readings(readings: Iterable[Reading], *,
                     price: Callable[[Key, Value], int | None] | None = None) -> list[Mismatch]:
    """Every key of every reading whose records disagree, in key order. ``price(key, units)`` prices units
    (None when the key's price is unknown: the amount is then 0); charged_minor values are money already."""
    found: list[Mismatch] = []
    for reading in readings:
        keys: set[Key] = set()
        for per_key in reading.values.values():
            keys.update(per_key)
        for key in sorted(keys, key=lambda k: (k[1], k[0], k[2], k[3], k[4])):
            values: dict[str, Value] = {r: per_key.get(key, _zero(reading.measure))
                                        for r, per_key in reading.values.items()}
            wrong = disagreeing(values)
            if not wrong:
                continue
            found.append(Mismatch(key, reading.measure, reading.cut, values, wrong,
                                  _amount(key, reading.measure, values, wrong, price)))
    return found


def _zero(measure: str) -> Value:
    return Decimal(0) if measure == "units" else 0


def _amount(key: Key, measure: str, values: Mapping[str, Value], wrong: tuple[str, ...],
            price: Callable[[Key, Value], int | None] | None) -> int:
    right = [r for r in values if r not in wrong]
    if not right:
        right = [REFERENCE_OF.get(wrong[0], wrong[0])] if REFERENCE_OF.get(wrong[0]) in values else [wrong[0]]
    reference, odd = values[right[0]], values[wrong[0]]
    if measure != "units":
        return int(reference) - int(odd)
    if price is None:
        return 0
    a, b = price(key, reference), price(key, odd)
    return 0 if a is None or b is None else a - b


def drift_wallets(mismatches: Iterable[Mismatch]) -> dict[str, int]:
    """Per record: how many distinct wallets it disagrees on (every record listed, 0 = agrees everywhere)."""
    wallets: dict[str, set[tuple[str, str]]] = {r: set() for r in RECORDS}
    for m in mismatches:
        for record in m.disagreeing:
            wallets[record].add((m.key[1], m.key[0]))
    return {r: len(w) for r, w in wallets.items()}


def drift_by_pair(mismatches: Iterable[Mismatch]) -> dict[str, int]:
    """Absolute money drift per pair "reference/disagreeing" (e.g. ``usage_log/clickhouse_usage``)."""
    pairs: dict[str, int] = {}
    for m in mismatches:
        agreed = [r for r in m.values if r not in m.disagreeing]
        for record in m.disagreeing:
            reference = agreed[0] if agreed else REFERENCE_OF.get(record, record)
            pair = f"{reference}/{record}"
            pairs[pair] = pairs.get(pair, 0) + abs(m.amount_minor)
    return pairs
