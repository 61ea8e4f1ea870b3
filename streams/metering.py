"""The pure core of the streams worker: raw message bytes → validated events → cumulative counters of ONE
source partition → a charge checkpoint. No I/O here (the worker in streams/worker.py does the I/O).

Steps and the invariant each protects (DESIGN §2.2):

1. ``parse_message``: a message is one event (JSON object) or a packed JSON array of events. Anything
   unusable becomes a ``Rejection`` with a stable reason code and the original bytes — never dropped.
2. ``validate_event``: CloudEvents attributes + project, types, size, time. Same input → same verdict.
3. dedupe by (project, source, id): a 64-bit signed hash (the ledger stores it in ``dedupe_keys``). An
   event already seen within the horizon — in memory, or seeded from the ledger — is not counted again.
4. ``PartitionAggregator.process``: meters → units, wallet by subject key, price version in effect, period
   bucket (late events beyond the allowed lateness go to the current period, marked late, never dropped).
   Offsets ``<= processed_through`` (the ledger's applied mark after seeding, then our own progress) are
   skipped, so a redelivered or replayed message is never counted twice.
5. ``PartitionAggregator.checkpoint``: the changed keys at their CUMULATIVE values as of the last offset
   processed. Cumulative values make a repeated or stale checkpoint harmless (the ledger ignores
   ``as_of_offset <= applied_through``) and a lost one recoverable (the next one carries the totals).
   A checkpoint is produced even when no counter changed (all events rejected or duplicates), so the
   ledger's applied mark always reaches the last offset the worker consumed — the assignment protocol
   waits for that mark.

Time: "now" is the Kafka message timestamp (arrival), not the wall clock, so replaying a message after a
crash buckets it the same way. The dedupe horizon runs on the same clock: ``stream_time`` is the newest arrival
seen in the partition (DESIGN §2 invariant 10).

Bounds: a value beyond ``ledger.limits`` — or one that would take its key's cumulative units (and so its
charge) beyond them in this partition — is rejected as ``value_out_of_range`` before anything is counted
(DESIGN §2 invariant 8). Units are Decimal (JSON numbers with a fraction arrive from orjson as floats
and are converted through their shortest repr, which is the decimal literal that was sent).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import numpy as np
import orjson

from ledger.limits import UNITS_FRACTION_DIGITS_MAX, UNITS_PER_EVENT_MAX
from streams.catalog_model import (
    MISSING,
    CatalogSnapshot,
    Meter,
    PriceVersion,
    counter_version_id,
    read_path,
)
from streams.contracts import partition_for
from streams.dedupe_memory import slot_seconds
from streams.dedupe_store import DedupeStore, Int64s

__all__ = [
    "REASONS",
    "Checkpoint",
    "Limits",
    "PartitionAggregator",
    "Rejection",
    "SeedCounter",
    "ValidEvent",
    "dedupe_hash",
    "parse_message",
    "period_bounds",
    "validate_event",
]

#: Stable reason codes of rejected events (the DLQ envelope's ``reason``). Never rename one.
REASONS: dict[str, str] = {
    "bad_json": "the message is not valid JSON",
    "not_an_object": "an event must be a JSON object",
    "empty_batch": "a packed message must hold at least one event",
    "too_many_events": "a packed message holds more events than allowed",
    "oversized": "the event is larger than the allowed size",
    "missing_field": "a required CloudEvents attribute (id, source, type, subject, project) is missing",
    "wrong_type": "an attribute has the wrong type",
    "unsupported_specversion": "only CloudEvents specversion 1.0 is accepted",
    "bad_time": "time is not an RFC 3339 timestamp with a UTC offset",
    "time_in_future": "time is further in the future than allowed",
    "unknown_meter": "no meter of the project handles this event type",
    "unknown_subject": "the subject has no wallet and the project dead-letters unknown subjects",
    "bad_value": "the meter's value property is missing or not a valid number",
    "value_out_of_range": "the value, or the key's cumulative units or charge, is beyond the ledger's bounds "
                          "(ledger/limits.py)",
}

_REQUIRED = ("id", "source", "type", "subject", "project")
_ATTR_MAX = 256
_ZERO = Decimal(0)
_ONE = Decimal(1)


@dataclass(frozen=True, slots=True)
class Limits:
    event_bytes_max: int = 64 * 1024
    message_events_max: int = 10_000
    future_skew_s: int = 3_600
    dedupe_horizon_s: int = 86_400
    #: dedupe keys kept in RAM per partition; older ones spill to disk, nothing is forgotten before the horizon
    #: (streams/dedupe_store.py: the RAM per partition is ~80 B x this + ``dedupe_filter_bytes`` + transients)
    dedupe_memory_max: int = 500_000
    dedupe_filter_bytes: int = 256 * 1024 * 1024
    dedupe_dir: str | None = None  # None: the system's temporary directory
    #: a checkpoint is cut early (mid-batch, at a message boundary) once it carries this many, so one ledger
    #: transaction stays moderate and a message ~1.3 MB at most (~330 B per counter, ~21 B per key). One packed
    #: message of many distinct wallets can still exceed it: the limit is soft, never a reason to fail.
    checkpoint_counters_max: int = 4_000
    checkpoint_dedupe_keys_max: int = 50_000


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str  # a key of REASONS
    detail: str
    original: bytes  # the message bytes, or the event re-serialized when it came inside a packed array
    index: int | None = None  # position inside a packed message


# Not frozen, like _Measure: one per event on the hot path, and a frozen dataclass's __init__ sets each field
# through object.__setattr__ (~4x the time of a plain one). The frozen ones were 11-14% of a worker's samples in
# `bench.pipeline --profile`. Nothing assigns to either after construction.
@dataclass(slots=True)
class ValidEvent:
    id: str
    source: str
    type: str
    subject: str
    project: str
    time: datetime | None
    data: Any
    raw: dict[str, Any]
    index: int | None


def parse_message(value: bytes | None, *, limits: Limits) -> tuple[list[tuple[int | None, Any]], list[Rejection]]:
    """Split a message into (index, decoded event) items. ``index`` is None for a one-event message."""
    if value is None:
        return [], [Rejection("bad_json", "empty message value", b"")]
    try:
        decoded = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return [], [Rejection("bad_json", str(exc)[:200], value)]
    if isinstance(decoded, dict):
        if len(value) > limits.event_bytes_max:
            return [], [Rejection("oversized", f"{len(value)} bytes > {limits.event_bytes_max}", value)]
        return [(None, decoded)], []
    if isinstance(decoded, list):
        if not decoded:
            return [], [Rejection("empty_batch", REASONS["empty_batch"], value)]
        if len(decoded) > limits.message_events_max:
            return [], [Rejection("too_many_events", f"{len(decoded)} > {limits.message_events_max}", value)]
        # Only a message larger than one event's limit can hold an oversized event: check sizes lazily.
        check_sizes = len(value) > limits.event_bytes_max
        items: list[tuple[int | None, Any]] = []
        rejections: list[Rejection] = []
        for index, item in enumerate(decoded):
            if check_sizes:
                size = len(orjson.dumps(item))
                if size > limits.event_bytes_max:
                    rejections.append(Rejection("oversized", f"{size} bytes > {limits.event_bytes_max}",
                                                orjson.dumps(item), index))
                    continue
            items.append((index, item))
        return items, rejections
    return [], [Rejection("not_an_object", f"a message holds a JSON object or array, got {type(decoded).__name__}",
                          value)]


def _original(raw: Any, index: int | None, value: bytes) -> bytes:
    return value if index is None else orjson.dumps(raw)


def validate_event(raw: Any, *, index: int | None, message: bytes, arrival: datetime,
                   limits: Limits) -> ValidEvent | Rejection:
    """CloudEvents 1.0 attributes plus ``project``; ``time`` optional (arrival is used when absent)."""
    if not isinstance(raw, dict):
        return Rejection("not_an_object", f"got {type(raw).__name__}", _original(raw, index, message), index)
    values: list[str] = []
    for name in _REQUIRED:
        value = raw.get(name)
        if value is None or value == "":  # name every missing attribute, not only the first
            missing = [n for n in _REQUIRED if raw.get(n) is None or raw.get(n) == ""]
            verb = "is" if len(missing) == 1 else "are"
            return Rejection("missing_field", f"{', '.join(missing)} {verb} required", _original(raw, index, message),
                             index)
        if not isinstance(value, str):
            return Rejection("wrong_type", f"{name} must be a string", _original(raw, index, message), index)
        if len(value) > _ATTR_MAX:
            return Rejection("wrong_type", f"{name} is longer than {_ATTR_MAX}", _original(raw, index, message),
                             index)
        values.append(value)
    spec = raw.get("specversion", "1.0")
    if spec != "1.0":
        return Rejection("unsupported_specversion", f"specversion {spec!r}", _original(raw, index, message), index)
    time_value = raw.get("time")
    when: datetime | None = None
    if time_value is not None:
        if not isinstance(time_value, str):
            return Rejection("bad_time", "time must be a string", _original(raw, index, message), index)
        try:
            when = datetime.fromisoformat(time_value)
        except ValueError:
            return Rejection("bad_time", f"cannot parse {time_value[:64]!r}", _original(raw, index, message), index)
        if when.tzinfo is None:
            return Rejection("bad_time", "time needs a UTC offset", _original(raw, index, message), index)
        if when.utcoffset():
            when = when.astimezone(UTC)
        if when > arrival + _seconds(limits.future_skew_s):
            return Rejection("time_in_future", f"{time_value} is after arrival {arrival.isoformat()}",
                             _original(raw, index, message), index)
    data = raw.get("data")
    if data is not None and not isinstance(data, dict):
        return Rejection("wrong_type", "data must be a JSON object", _original(raw, index, message), index)
    return ValidEvent(values[0], values[1], values[2], values[3], values[4], when, data, raw, index)


def dedupe_hash(project: str, source: str, event_id: str) -> int:
    """64-bit SIGNED hash of an event identity (PostgreSQL bigint), stable across processes."""
    digest = hashlib.blake2b(f"e\x1f{project}\x1f{source}\x1f{event_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _unique_hash(key: tuple[Any, ...], value: Any) -> int:
    """Hash of one distinct value of a UNIQUE_COUNT counter (kept with the event dedupe keys)."""
    text = "u\x1f" + "\x1f".join(str(part) for part in key) + "\x1f" + orjson.dumps(value).decode()
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big", signed=True)


def period_bounds(at: datetime, granularity: str) -> tuple[datetime, datetime]:
    """[start, end) of the UTC calendar month or day containing ``at`` (a UTC datetime)."""
    return _bounds(granularity, at.year, at.month, at.day if granularity == "day" else 1)


@functools.lru_cache(maxsize=4_096)
def _bounds(granularity: str, year: int, month: int, day: int) -> tuple[datetime, datetime]:
    start = datetime(year, month, day, tzinfo=UTC)
    if granularity == "day":
        return start, start + timedelta(days=1)
    end = datetime(year + 1, 1, 1, tzinfo=UTC) if month == 12 else datetime(year, month + 1, 1, tzinfo=UTC)
    return start, end


@functools.lru_cache(maxsize=1_024)
def _seconds(value: int) -> timedelta:
    return timedelta(seconds=value)


def _number(value: Any) -> Decimal | None:
    if isinstance(value, bool) or value is MISSING or value is None:
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value)) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            return None
        return number if number.is_finite() else None
    return None


def _in_range(number: Decimal, *, integral: bool = False) -> bool:
    """Within ``ledger.limits``: |number| ≤ UNITS_PER_EVENT_MAX and at most UNITS_FRACTION_DIGITS_MAX
    decimal places (a JSON integer written out as 10^30 arrives as a float 1e+30; 1e300 likewise).
    ``integral``: it came from a JSON integer, which has no decimal places (skips ``as_tuple``: 0.1 vs 0.5 µs)."""
    if abs(number) > UNITS_PER_EVENT_MAX:
        return False
    if integral:
        return True
    exponent = number.as_tuple().exponent
    return isinstance(exponent, int) and exponent >= -UNITS_FRACTION_DIGITS_MAX


#: key = (wallet_id, project_id, meter_id, period_start, price_version_id)
CounterKeyTuple = tuple[str, str, str, datetime, str]


class Counter:
    """One key's cumulative state in this partition."""

    __slots__ = ("aggregation", "events", "late_events", "latest_at", "meter_version", "price", "units")

    def __init__(self, units: Decimal = _ZERO, events: int = 0, late_events: int = 0,
                 latest_at: datetime | None = None) -> None:
        self.units = units
        self.events = events
        self.late_events = late_events
        self.latest_at = latest_at
        self.price: PriceVersion | None = None
        self.aggregation = "sum"
        self.meter_version = 1  # the meter's counting version (part of the key, see counter_version_id)


def _copy(c: Counter) -> Counter:
    copy = Counter(c.units, c.events, c.late_events, c.latest_at)
    copy.price, copy.aggregation, copy.meter_version = c.price, c.aggregation, c.meter_version
    return copy


@dataclass(frozen=True, slots=True)
class SeedCounter:
    """A counter as the ledger stored it for this partition (from ``partition_snapshot``)."""

    wallet_id: str
    project_id: str
    meter_id: str
    period_start: datetime
    price_version_id: str
    units: Decimal
    events: int
    late_events: int = 0
    latest_at: datetime | None = None


@dataclass(slots=True)
class _Measure:
    key: CounterKeyTuple
    meter: Meter
    price: PriceVersion
    value: Any  # Decimal units, or the raw value for UNIQUE_COUNT
    at: datetime
    late: bool


@dataclass
class Stats:
    messages: int = 0
    skipped_messages: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    unmetered: int = 0
    unpriced: int = 0
    late: int = 0
    misplaced: int = 0


@dataclass(frozen=True)
class Checkpoint:
    """What one partition's aggregator says at the end of a batch (serialized by ``to_json``)."""

    source_topic: str
    partition: int
    as_of_offset: int
    counters: list[tuple[CounterKeyTuple, Counter]]
    dedupe_keys: list[int]
    #: the newest arrival seen in the partition (stream time); the ledger stores it with the dedupe keys
    stream_time: datetime | None = None

    def to_json(self, *, emitted_at: datetime, owner_epoch: int = 0) -> bytes:
        """The ``ledger.contracts.ChargeCheckpoint`` wire form, written directly (a checkpoint may carry
        thousands of counters; building pydantic models for each costs more than the metering itself).
        tests/unit/streams check it against the pydantic model.

        Each price is serialized once per checkpoint (an ``orjson.Fragment`` reused by every counter of its
        version) and datetimes are left to orjson, which writes them as ``isoformat`` does: at 100,000 wallets
        this method was a quarter of a worker's CPU."""
        prices: dict[int, tuple[orjson.Fragment, datetime]] = {}
        counters = []
        for (wallet_id, project_id, meter_id, period_start, price_version_id), c in self.counters:
            price = c.price
            assert price is not None, "only keys touched by an event (which resolved a price) are emitted"
            wire = prices.get(id(price))
            if wire is None:
                wire = prices[id(price)] = (orjson.Fragment(orjson.dumps(price.model_json)), price.effective_from)
            counters.append({
                "key": {"wallet_id": wallet_id, "project_id": project_id, "meter_id": meter_id,
                        "period_start": period_start, "price_version_id": price_version_id},
                "units": format(c.units, "f"),
                "price": wire[0],
                "aggregation": c.aggregation,
                "latest_at": c.latest_at,
                "events": c.events,
                "late_events": c.late_events,
                "meter_version": c.meter_version,
                "price_effective_from": wire[1],
            })
        return orjson.dumps({
            "source_topic": self.source_topic, "partition": self.partition, "as_of_offset": self.as_of_offset,
            "counters": counters, "dedupe_keys": self.dedupe_keys, "emitted_at": emitted_at,
            "stream_time": self.stream_time, "owner_epoch": owner_epoch,
        })


@dataclass
class PartitionAggregator:
    """Cumulative counters of one source partition, seeded from the ledger's applied state."""

    source_topic: str
    partition: int
    partitions: int
    limits: Limits = field(default_factory=Limits)
    #: every offset <= this has been counted (by us or, before seeding, by the ledger): skip it
    processed_through: int = -1
    #: the offset the last checkpoint was cut at
    checkpointed_through: int = -1
    counters: dict[CounterKeyTuple, Counter] = field(default_factory=dict)
    #: counters of periods starting before this were NOT seeded: never write them (a cumulative starting
    #: from zero would overwrite the ledger's value). Events that would land there are charged in the
    #: first seeded period instead, marked late. None = everything was seeded.
    periods_since: datetime | None = None
    #: the newest arrival (Kafka timestamp) seen in this partition: the clock of the dedupe horizon. Stream
    #: time, never the wall clock — a worker 24 h behind (outage, slow ledger, replay) still remembers the
    #: last 24 h of ITS stream, so the horizon cannot shrink by the consumer lag (DESIGN §2 invariant 10)
    stream_time: datetime | None = None
    stats: Stats = field(default_factory=Stats)
    _changed: set[CounterKeyTuple] = field(default_factory=set)
    _new_keys: list[int] = field(default_factory=list)
    #: dedupe hashes (events and UNIQUE_COUNT values) seen within the horizon
    _seen: DedupeStore = field(init=False)

    def __post_init__(self) -> None:
        self._seen = DedupeStore(slot_s=slot_seconds(self.limits.dedupe_horizon_s),
                                 horizon_s=self.limits.dedupe_horizon_s, ram_keys=self.limits.dedupe_memory_max,
                                 filter_bytes=self.limits.dedupe_filter_bytes, directory=self.limits.dedupe_dir)

    def seed(self, *, applied_through: int, counters: Iterable[SeedCounter],
             dedupe_keys: Iterable[tuple[int, datetime]] = (),
             dedupe_chunks: Iterable[tuple[Int64s, datetime]] = (), periods_since: datetime | None = None) -> None:
        """Start from the ledger's state: counters as of ``applied_through``, offsets up to it skipped.
        ``counters`` must hold every stored counter of periods starting at or after ``periods_since``.
        Dedupe keys come as ``(key, arrival)`` pairs (any order) and/or ``(keys, arrival)`` chunks in ascending
        arrival (the worker streams the ledger's rows: the horizon never has to fit in RAM)."""
        self.periods_since = periods_since
        self.counters.clear()
        self._changed.clear()
        self._new_keys.clear()
        self._seen.clear()
        for sc in counters:
            key = (sc.wallet_id, sc.project_id, sc.meter_id, sc.period_start.astimezone(UTC), sc.price_version_id)
            self.counters[key] = Counter(Decimal(sc.units), sc.events, sc.late_events,
                                         sc.latest_at.astimezone(UTC) if sc.latest_at else None)
        self.stream_time = None
        for chunk, seen_at in dedupe_chunks:
            self._seen.seed_chunk(chunk, seen_at.timestamp())
            if self.stream_time is None or seen_at > self.stream_time:
                self.stream_time = seen_at
        for key_hash, seen_at in sorted(dedupe_keys, key=lambda kv: kv[1]):
            self._seen.seed_chunk(np.array([key_hash], dtype=np.int64), seen_at.timestamp())
            if self.stream_time is None or seen_at > self.stream_time:
                self.stream_time = seen_at
        self._seen.seed_done()
        self.processed_through = applied_through
        self.checkpointed_through = applied_through

    # -- per message -------------------------------------------------------------------------------------

    def process(self, *, offset: int, value: bytes | None, arrival: datetime,
                catalog: CatalogSnapshot) -> list[Rejection]:
        """Count one message (skipped when ``offset <= processed_through``). Returns its rejections."""
        if offset <= self.processed_through:
            self.stats.skipped_messages += 1
            return []
        self.processed_through = offset
        self.stats.messages += 1
        if self.stream_time is None or arrival > self.stream_time:
            self.stream_time = arrival
        items, rejections = parse_message(value, limits=self.limits)
        raw_value = value or b""
        for index, raw in items:
            verdict = validate_event(raw, index=index, message=raw_value, arrival=arrival, limits=self.limits)
            if isinstance(verdict, Rejection):
                rejections.append(verdict)
                continue
            rejection = self._count(verdict, arrival, catalog, raw_value)
            if rejection is not None:
                rejections.append(rejection)
        self.stats.rejected += len(rejections)
        return rejections

    def _count(self, event: ValidEvent, arrival: datetime, catalog: CatalogSnapshot,
               message: bytes) -> Rejection | None:
        key_hash = dedupe_hash(event.project, event.source, event.id)
        if key_hash in self._seen:
            self.stats.duplicates += 1
            return None
        meters = catalog.meters_by_type.get((event.project, event.type))
        if not meters:
            return Rejection("unknown_meter", f"project {event.project!r} has no meter for type {event.type!r}",
                             _original(event.raw, event.index, message), event.index)
        wallet_id = catalog.wallets_by_subject.get((event.project, event.subject))
        policy = catalog.policy(event.project)
        if wallet_id is None:
            if policy.unknown_subjects == "dead_letter":
                return Rejection("unknown_subject", f"subject {event.subject!r} has no wallet",
                                 _original(event.raw, event.index, message), event.index)
            wallet_id = catalog.auto_wallet(event.project, event.subject)
        at = event.time or arrival
        measures: list[_Measure] = []
        for meter in meters:
            if meter.filters and not meter.matches(event.data):
                continue
            if meter.aggregation == "COUNT":
                value: Any = _ONE
            else:
                found = read_path(event.data, meter.value_steps)
                if meter.aggregation == "UNIQUE_COUNT":
                    if found is MISSING or found is None or isinstance(found, dict | list):
                        return Rejection("bad_value", f"meter {meter.slug}: {meter.value_property} is missing",
                                         _original(event.raw, event.index, message), event.index)
                    value = found
                else:
                    number = _number(found)
                    if number is None or (meter.aggregation == "SUM" and number < 0):
                        why = "missing" if found is MISSING else "negative" if number is not None else "not a number"
                        return Rejection("bad_value", f"meter {meter.slug}: {meter.value_property} is {why}",
                                         _original(event.raw, event.index, message), event.index)
                    if not _in_range(number, integral=type(found) is int):
                        return Rejection("value_out_of_range",
                                         f"meter {meter.slug}: {meter.value_property} = {number} is beyond "
                                         f"±{UNITS_PER_EVENT_MAX} or has more than {UNITS_FRACTION_DIGITS_MAX}"
                                         " decimal places", _original(event.raw, event.index, message), event.index)
                    value = number
            price = catalog.price_at(meter.id, at)
            if price is None:
                self.stats.unpriced += 1
                continue
            start, end = period_bounds(at, price.period)
            late = arrival > end + _seconds(policy.allowed_lateness_s)
            floor = self.periods_since
            if late or (floor is not None and start < floor):
                # beyond the allowed lateness: charged in the current period, marked late, never dropped
                late = True
                pivot = arrival if floor is None or arrival >= floor else floor
                price = catalog.price_at(meter.id, pivot) or price
                start, _ = period_bounds(pivot, price.period)
            version_id = price.id if meter.counting_version == 1 else counter_version_id(price.id,
                                                                                         meter.counting_version)
            measures.append(_Measure((wallet_id, event.project, meter.id, start, version_id), meter, price, value,
                                     at, late))
        if not measures:
            self.stats.unmetered += 1
            return None
        for m in measures:  # before anything is counted: an event is accepted or rejected as a whole
            units = self._units_after(m)
            if units > m.price.units_max:
                return Rejection("value_out_of_range",
                                 f"meter {m.meter.slug}: the key's cumulative units would reach {units}, beyond "
                                 f"{m.price.units_max} (ledger/limits.py: units and charge per key)",
                                 _original(event.raw, event.index, message), event.index)
        self._remember(key_hash, arrival)
        self.stats.accepted += 1
        if partition_for(event.subject, self.partitions) != self.partition:
            self.stats.misplaced += 1
        for m in measures:
            self._apply(m, arrival)
        return None

    def _units_after(self, m: _Measure) -> Decimal:
        """The key's cumulative units in this partition if ``m`` were counted (an upper bound for
        UNIQUE_COUNT, whose value may be a repeat). Other partitions' units of the key are not known here:
        the ledger merges them (ledger/README, "Bounds")."""
        counter = self.counters.get(m.key)
        units = counter.units if counter is not None and counter.events else _ZERO
        aggregation = m.meter.aggregation
        if aggregation == "SUM" or aggregation == "COUNT":
            return units + m.value  # type: ignore[no-any-return]
        if aggregation == "UNIQUE_COUNT":
            return units + _ONE
        if aggregation == "MAX":
            return max(units, m.value)  # type: ignore[no-any-return]
        return m.value  # type: ignore[no-any-return]  # LATEST (a negative gauge prices as zero)

    def _remember(self, key_hash: int, arrival: datetime) -> None:
        self._seen.remember(key_hash, arrival.timestamp())
        self._new_keys.append(key_hash)

    def _apply(self, m: _Measure, arrival: datetime) -> None:
        counter = self.counters.get(m.key)
        if counter is None:
            counter = self.counters[m.key] = Counter()
        counter.price = m.price
        counter.meter_version = m.meter.counting_version
        aggregation = m.meter.aggregation
        counter.aggregation = m.meter.ledger_aggregation
        counter.events += 1
        if m.late:
            counter.late_events += 1
            self.stats.late += 1
        if aggregation == "SUM" or aggregation == "COUNT":
            counter.units += m.value
            if counter.latest_at is None or m.at > counter.latest_at:
                counter.latest_at = m.at
        elif aggregation == "MAX":
            if counter.events == 1 or m.value > counter.units:
                counter.units = m.value
            if counter.latest_at is None or m.at > counter.latest_at:
                counter.latest_at = m.at
        elif aggregation == "LATEST":
            if counter.latest_at is None or m.at >= counter.latest_at:
                counter.units = m.value
                counter.latest_at = m.at
        else:  # UNIQUE_COUNT: distinct values are remembered with the dedupe keys (same horizon)
            unique = _unique_hash(m.key, m.value)
            if unique not in self._seen:
                counter.units += _ONE
                self._remember(unique, arrival)
            if counter.latest_at is None or m.at > counter.latest_at:
                counter.latest_at = m.at
        self._changed.add(m.key)

    # -- per batch ---------------------------------------------------------------------------------------

    def checkpoint_full(self) -> bool:
        """Cut a checkpoint now (before the next message) to keep its size bounded."""
        return (len(self._changed) >= self.limits.checkpoint_counters_max
                or len(self._new_keys) >= self.limits.checkpoint_dedupe_keys_max)

    def checkpoint(self) -> Checkpoint | None:
        """The changed keys as of ``processed_through``; None when nothing new was consumed. Then forgets
        the dedupe keys that left the horizon, measured back from ``stream_time`` (never the wall clock)."""
        if self.processed_through <= self.checkpointed_through:
            return None
        counters = [(key, _copy(self.counters[key])) for key in self._changed]
        result = Checkpoint(self.source_topic, self.partition, self.processed_through, counters,
                            list(self._new_keys), self.stream_time)
        self._changed = set()
        self._new_keys = []
        self.checkpointed_through = self.processed_through
        if self.stream_time is not None:
            self.forget_before(self.stream_time - timedelta(seconds=self.limits.dedupe_horizon_s))
        return result

    def forget_before(self, cutoff: datetime) -> int:
        """Drop dedupe keys older than the horizon (oldest first; kept up to one time slot longer, never
        shorter). Returns how many were dropped."""
        return self._seen.forget_before(cutoff.timestamp())

    @property
    def dedupe_size(self) -> int:
        return len(self._seen)

    @property
    def dedupe_on_disk(self) -> int:
        """Dedupe keys held in the store's disk runs (the rest are in RAM)."""
        return len(self._seen) - self._seen.ram_keys_now
