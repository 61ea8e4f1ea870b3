"""`meterline replay`, the pure part: which keys a range of the usage log touches, what the log says they
stand at, how far the ledger is from it, and the correction that would repair it (ledger/corrections.py).

Why whole partitions are metered even for a narrow range: a key's price is a function of its CUMULATIVE
units in the period (tiers, free allowances), so a sub-range of events has no price of its own. The range
SELECTS keys (those an event inside it touched); each selected key is then compared as a whole — every
partition's replayed counter from the start of the log up to the ledger's applied mark, merged as the ledger
merges them (``ledger.checkpoints.merge_units``) — against the ledger's counters of the same topic life plus
the corrections earlier replays of that life wrote. Counters of other lives are not in this log; they are
left out of the comparison and counted in the money (the ledger prices a key over every row it has).

Prices: each key carries its own price version, the one in force at the event time (``catalog.price_at``), so
a replay across a price change prices each side with its own version.

Determinism: the replay id is a hash of the topic life, the applied marks and the selection, so the same replay
of the same ledger state has the same id, and its corrections the same idempotency keys."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from ledger.checkpoints import merge_units
from ledger.contracts import CounterKey, CounterValue
from ledger.corrections import KeyCharge, StoredCounter
from ledger.pricing import price_minor
from streams.catalog_model import CatalogSnapshot
from streams.metering import Counter, CounterKeyTuple, Limits, PartitionAggregator
from streams.replay import LogMessage

__all__ = ["KeyDrift", "PartitionRun", "Selection", "diff_keys", "drift_rows", "replay_id", "replay_partition"]


@dataclass(frozen=True)
class Selection:
    """What a replay looks at. Offsets apply to every selected partition; times are Kafka message timestamps
    (arrival), [since, until). Filters narrow the keys: project, wallets (subjects resolved by the caller),
    meter ids."""

    partitions: tuple[int, ...]
    from_offset: int | None = None
    to_offset: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    project_id: str | None = None
    wallet_ids: frozenset[str] | None = None
    meter_ids: frozenset[str] | None = None

    @property
    def whole_log(self) -> bool:
        return self.from_offset is None and self.to_offset is None and self.since is None and self.until is None

    def in_range(self, message: LogMessage) -> bool:
        if self.from_offset is not None and message.offset < self.from_offset:
            return False
        if self.to_offset is not None and message.offset > self.to_offset:
            return False
        if self.since is not None and message.arrival < self.since:
            return False
        return self.until is None or message.arrival < self.until

    def wants(self, key: CounterKeyTuple) -> bool:
        wallet, project, meter = key[0], key[1], key[2]
        return ((self.project_id is None or project == self.project_id)
                and (self.wallet_ids is None or wallet in self.wallet_ids)
                and (self.meter_ids is None or meter in self.meter_ids))


@dataclass
class PartitionRun:
    """One partition metered again from its first offset up to the ledger's mark."""

    partition: int
    applied_through: int
    replayed_through: int = -1
    messages: int = 0
    touched: set[CounterKeyTuple] = field(default_factory=set)  # keys an in-range message changed
    counters: dict[CounterKeyTuple, Counter] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.replayed_through >= self.applied_through


def replay_partition(*, source_id: str, partition: int, partitions: int, applied_through: int,
                     messages: Iterable[LogMessage], catalog: CatalogSnapshot, limits: Limits,
                     selection: Selection) -> PartitionRun:
    """Meter ``messages`` (offset order, from the first) with the workers' own core, up to ``applied_through``,
    remembering which keys the messages inside the selected range touched."""
    run = PartitionRun(partition, applied_through)
    aggregator = PartitionAggregator(source_topic=source_id, partition=partition, partitions=partitions,
                                     limits=limits)
    aggregator.seed(applied_through=-1, counters=(), dedupe_keys=(), periods_since=None)
    for message in messages:
        if message.offset > applied_through:
            break
        aggregator.process(offset=message.offset, value=message.value, arrival=message.arrival, catalog=catalog)
        changed = aggregator.checkpoint()  # the keys this message changed (cheap: a message touches few)
        if changed is not None and selection.in_range(message):
            run.touched.update(key for key, _ in changed.counters)
    run.replayed_through = aggregator.processed_through
    run.messages = aggregator.stats.messages
    run.counters = {key: c for key, c in aggregator.counters.items() if c.events > 0}
    return run


@dataclass(frozen=True)
class KeyDrift:
    """One key where the ledger (this topic life + its corrections) and the log disagree."""

    key: CounterKeyTuple
    aggregation: str
    ledger_units: Decimal | None  # None: the ledger has no counter of this life for the key
    replayed_units: Decimal | None  # None: the log has no event for the key
    ledger_events: int
    replayed_events: int
    #: the correction counter that makes the ledger's merge equal the log; None when no counter can (a max or
    #: latest meter whose ledger value is above the log's: report only, an operator decides)
    correction: CounterValue | None
    #: what applying the correction posts now: + charges the wallet, − credits it back
    amount_minor: int

    @property
    def units_delta(self) -> Decimal:
        return (self.replayed_units or Decimal(0)) - (self.ledger_units or Decimal(0))


def _merge(aggregation: str, values: Iterable[tuple[Decimal, datetime | None]]) -> Decimal:
    return merge_units(aggregation, values)


def diff_keys(runs: Sequence[PartitionRun], *, source_id: str, selection: Selection,
              life: Sequence[StoredCounter], every: Sequence[StoredCounter],
              charges: dict[CounterKeyTuple, KeyCharge]) -> list[KeyDrift]:
    """Every selected key whose merged units differ between the log and the ledger, with its correction.

    ``life``: the ledger's counters of topic life ``source_id`` and its corrections; ``every``: all counter rows
    of the compared keys (all lives); ``charges``: their ``usage_charges`` rows (ledger/corrections.py)."""
    replayed: dict[CounterKeyTuple, list[Counter]] = {}
    touched: set[CounterKeyTuple] = set()
    for run in runs:
        touched |= run.touched
        for key, counter in run.counters.items():
            replayed.setdefault(key, []).append(counter)
    ledger: dict[CounterKeyTuple, list[StoredCounter]] = {}
    for row in life:
        if row.source_topic == source_id and row.partition not in selection.partitions:
            continue  # a partition this replay did not read
        ledger.setdefault(row.key, []).append(row)
    all_rows: dict[CounterKeyTuple, list[StoredCounter]] = {}
    for row in every:
        all_rows.setdefault(row.key, []).append(row)
    # a narrow range selects the keys its events touched; the whole log selects every key either side knows
    candidates = (set(replayed) | set(ledger)) if selection.whole_log else touched
    drifts: list[KeyDrift] = []
    for key in sorted(filter(selection.wants, candidates), key=lambda k: (k[0], k[2], k[3], k[4])):
        mine, theirs = replayed.get(key, []), ledger.get(key, [])
        charge = charges.get(key)
        aggregation = charge.aggregation if charge else (mine[0].aggregation if mine else "sum")
        mine_units = _merge(aggregation, ((c.units, c.latest_at) for c in mine)) if mine else None
        theirs_units = _merge(aggregation, ((c.units, c.latest_at) for c in theirs)) if theirs else None
        if mine_units == theirs_units or (mine_units is None and theirs_units == 0):
            continue
        drifts.append(_drift(key, aggregation, mine, theirs, mine_units, theirs_units, all_rows.get(key, []), charge))
    return drifts


def _drift(key: CounterKeyTuple, aggregation: str, mine: list[Counter], theirs: list[StoredCounter],
           mine_units: Decimal | None, theirs_units: Decimal | None, all_rows: list[StoredCounter],
           charge: KeyCharge | None) -> KeyDrift:
    target = mine_units if mine_units is not None else Decimal(0)
    mine_events = sum(c.events for c in mine)
    theirs_events = sum(c.events for c in theirs)
    latest = max((c.latest_at for c in mine if c.latest_at is not None), default=None)
    if aggregation in ("max", "latest"):
        value, at = target, latest
    else:
        value, at = target - (theirs_units or Decimal(0)), latest
    price = charge.price if charge else (mine[0].price.model if mine and mine[0].price is not None else None)
    merged_all = [(r.units, r.latest_at) for r in all_rows]
    repaired = merge_units(aggregation, [*((r.units, r.latest_at) for r in theirs), (value, at)])
    correction: CounterValue | None = None
    amount = 0
    if price is not None and repaired == target:
        correction = CounterValue(
            key=CounterKey(wallet_id=key[0], project_id=key[1], meter_id=key[2], period_start=key[3],
                           price_version_id=key[4]),
            units=value, price=price, aggregation=aggregation,  # type: ignore[arg-type]
            latest_at=at, events=max(mine_events - theirs_events, 0))
        charged = charge.charged_minor if charge else 0
        amount = price_minor(price, merge_units(aggregation, [*merged_all, (value, at)])) - charged
    return KeyDrift(key, aggregation, theirs_units, mine_units, theirs_events, mine_events, correction, amount)


def replay_id(*, source_id: str, marks: dict[int, int], selection: Selection) -> str:
    """Deterministic: the same replay of the same ledger state → the same id (and idempotency keys)."""
    parts = [source_id, repr(sorted(marks.items())), repr(selection.from_offset), repr(selection.to_offset),
             selection.since.isoformat() if selection.since else "", selection.until.isoformat() if selection.until
             else "", selection.project_id or "", repr(sorted(selection.wallet_ids or ())),
             repr(sorted(selection.meter_ids or ()))]
    return "rp_" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:20]


def drift_rows(drifts: Sequence[KeyDrift]) -> Iterator[dict[str, object]]:
    """The report's rows (table, JSON, CSV): per wallet, meter, period and price version."""
    for d in drifts:
        wallet, project, meter, period, version = d.key
        yield {"project_id": project, "wallet_id": wallet, "meter_id": meter, "period_start": period.isoformat(),
               "price_version_id": version, "aggregation": d.aggregation,
               "ledger_units": None if d.ledger_units is None else format(d.ledger_units, "f"),
               "replayed_units": None if d.replayed_units is None else format(d.replayed_units, "f"),
               "ledger_events": d.ledger_events, "replayed_events": d.replayed_events,
               "amount_minor": d.amount_minor, "repairable": d.correction is not None}
