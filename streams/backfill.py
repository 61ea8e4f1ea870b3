"""Backfill sessions, the pure part: meter a session's held events with the workers' own core into ONE checkpoint
of the session's virtual source (``ledger.backfills``), each key in the event's ORIGINAL period.

How it differs from live metering, and why:
- arrival = the event's own time (capped at now): the live worker charges an event that arrives after its period
  ended plus the allowed lateness in the CURRENT period, marked late; a backfill is exactly such usage and must be
  charged in the period it happened in. Capping at now keeps the future-skew check (an event further ahead of now
  than ``future_skew_s`` is rejected ``time_in_future``);
- no seeding: the checkpoint is the session's own counter, beside the live partitions' counters; the ledger
  merges every counter of a key before pricing, so the price is the period's whole, never the session's alone;
- identities already charged (live, or by an earlier closed backfill) are skipped by the caller before metering
  (``skip``); duplicates inside the session never reach here (one row per identity).

Catalog: today's meters (counting version) and the price version in force at the event time — what
``meterline replay`` uses too."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from ledger.contracts import ChargeCheckpoint
from streams.catalog_model import CatalogSnapshot
from streams.metering import Limits, PartitionAggregator, dedupe_hash, period_bounds

__all__ = ["BackfillMetering", "HeldEvent", "KeyPeriod", "meter_backfill"]


@dataclass(frozen=True, slots=True)
class HeldEvent:
    """An event held by a session (normalized by the ingest edge: ``payload`` is the usage-event JSON)."""

    project_id: str
    source: str
    id: str
    time: datetime
    payload: bytes

    @property
    def identity_hash(self) -> int:
        return dedupe_hash(self.project_id, self.source, self.id)


@dataclass(frozen=True, slots=True)
class KeyPeriod:
    """A key's original period and whether it was already closed when the session was metered: its end plus
    the project's allowed lateness had passed, so live metering would have charged it in the current period."""

    period_start: datetime
    period_end: datetime
    closed: bool
    units: Decimal
    events: int
    meter_slug: str


@dataclass
class BackfillMetering:
    checkpoint: ChargeCheckpoint
    #: (wallet_id, meter_id, period_start, price_version_id) -> its original period, units, events
    keys: dict[tuple[str, str, datetime, str], KeyPeriod]
    events: int = 0
    accepted: int = 0
    unmetered: int = 0  # no meter filter matched, or the meter has no price: not charged (as live)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (already charged ...)
    rejected: list[dict[str, Any]] = field(default_factory=list)  # id, source, reason, detail


def meter_backfill(events: Iterable[HeldEvent], *, source_topic: str, catalog: CatalogSnapshot, limits: Limits,
                   now: datetime, skip: dict[int, str] | None = None) -> BackfillMetering:
    """Meter ``events`` (in the order they were held) into one checkpoint of ``source_topic``, partition 0,
    offset 0. ``skip``: identity hash -> reason, for events that must not be charged again."""
    skip = skip or {}
    aggregator = PartitionAggregator(source_topic=source_topic, partition=0, partitions=1, limits=limits)
    aggregator.seed(applied_through=-1, counters=(), dedupe_keys=(), periods_since=None)
    skipped: dict[str, int] = {}
    rejected: list[dict[str, Any]] = []
    count = 0
    for offset, event in enumerate(events):
        count += 1
        reason = skip.get(event.identity_hash)
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        arrival = min(event.time, now)
        for r in aggregator.process(offset=offset, value=event.payload, arrival=arrival, catalog=catalog):
            rejected.append({"id": event.id, "source": event.source, "reason": r.reason, "detail": r.detail})
    metered = aggregator.checkpoint()
    wire = metered.to_json(emitted_at=now) if metered is not None else None
    checkpoint = ChargeCheckpoint.model_validate_json(wire) if wire is not None and metered is not None \
        and metered.counters else ChargeCheckpoint(source_topic=source_topic, partition=0, as_of_offset=0,
                                                   counters=[], emitted_at=now)
    # one checkpoint per session: its offset is 0 whatever the number of events (the mark makes it once-only)
    checkpoint = checkpoint.model_copy(update={"as_of_offset": 0, "dedupe_keys": [], "stream_time": None})
    keys: dict[tuple[str, str, datetime, str], KeyPeriod] = {}
    for (wallet_id, project_id, meter_id, period_start, version_id), counter in aggregator.counters.items():
        if counter.events == 0 or counter.price is None:
            continue
        start, end = period_bounds(period_start, counter.price.period)
        lateness = timedelta(seconds=catalog.policy(project_id).allowed_lateness_s)
        slug = next((m.slug for ms in catalog.meters_by_type.values() for m in ms if m.id == meter_id), meter_id)
        keys[(wallet_id, meter_id, period_start.astimezone(UTC), version_id)] = KeyPeriod(
            start, end, end + lateness <= now, counter.units, counter.events, slug)
    stats = aggregator.stats
    return BackfillMetering(checkpoint, keys, events=count, accepted=stats.accepted,
                            unmetered=stats.unmetered, skipped=skipped, rejected=rejected)
