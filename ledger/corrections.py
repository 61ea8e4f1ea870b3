"""Replay corrections: what `meterline replay --apply` writes when the usage log and the ledger disagree.

A replay (streams/replay_diff.py) meters a topic life's log again and finds, per key (wallet, meter, period,
price version), how far the ledger's counters of that life are from what the log says. The repair must never
edit history and must keep working with the live pipeline afterwards, so it is written as a correction
COUNTER beside the partitions' counters, applied like a checkpoint from a virtual source:

- source ``replay:{source identity}:{replay id}``, partition 0, ``as_of_offset`` 0, one counter per drifted key
  holding the correction (sum/count/unique_count: the missing units, negative for an over-count; max/latest:
  the log's value, which then wins the merge);
- ``apply_checkpoints(kind=ADJUSTMENT)`` does the rest exactly as for usage: lock the keys' charges in key
  order, merge EVERY counter row of the key (all partitions, all topic lives, earlier corrections — so the
  live workers' next checkpoints keep pricing the corrected total), post ``price(merged) − charged`` as an
  ``adjustment`` keyed ``adjustment:replay:{source}:{replay id}:0:0:{wallet}:{meter}:{period}:{version}``
  (same meter / period / price version columns as the usage rows it compensates, ``source_ref`` naming the
  replay), debt when the wallet cannot pay, a credit into an ``adjustment`` bucket for an over-charge;
- exactly once: the virtual source's applied mark makes a second apply of the same replay id ``stale``, and a
  fresh replay of the same range then finds no drift (the correction counts on the ledger side).

The live workers never read these rows (they seed from their own topic identity's counters only)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, text

from ledger.checkpoints import apply_checkpoints
from ledger.contracts import ChargeCheckpoint, CounterValue, PriceModel, TransactionKind
from ledger.rows import CheckpointOutcome
from ledger.sqlrows import rows_json

__all__ = ["CORRECTION_PREFIX", "KeyCharge", "StoredCounter", "apply_correction", "correction_source", "key_state",
           "life_counters"]

#: Source topics of correction counters start with this (never a Kafka topic: ``:`` is not a legal character).
CORRECTION_PREFIX = "replay:"


def correction_source(source_id: str, replay_id: str) -> str:
    return f"{CORRECTION_PREFIX}{source_id}:{replay_id}"


#: (wallet_id, project_id, meter_id, period_start, price_version_id) — streams' CounterKeyTuple
KeyTuple = tuple[str, str, str, datetime, str]


@dataclass(frozen=True, slots=True)
class StoredCounter:
    key: KeyTuple
    source_topic: str
    partition: int
    units: Decimal
    latest_at: datetime | None
    events: int


@dataclass(frozen=True, slots=True)
class KeyCharge:
    """A key's ``usage_charges`` row: what has been charged for it as a whole, and its price version."""

    charged_minor: int
    aggregation: str
    price: PriceModel


_COUNTERS_OF_LIFE = text("""
    SELECT wallet_id, project_id, meter_id, period_start, price_version_id, source_topic, partition, units,
           latest_at, events
    FROM usage_counters
    WHERE (source_topic = :sid OR starts_with(source_topic, :corrections))
      AND (CAST(:project AS text) IS NULL OR project_id = :project)
""")

_COUNTERS_OF_KEYS = text("""
    SELECT c.wallet_id, c.project_id, c.meter_id, c.period_start, c.price_version_id, c.source_topic, c.partition,
           c.units, c.latest_at, c.events
    FROM json_to_recordset(CAST(:rows AS json)) AS k(wallet_id text, meter_id text, period_start timestamptz,
                                                       price_version_id text)
    JOIN usage_counters c ON c.wallet_id = k.wallet_id AND c.meter_id = k.meter_id
         AND c.period_start = k.period_start AND c.price_version_id = k.price_version_id
""")

_CHARGES_OF_KEYS = text("""
    SELECT ch.wallet_id, ch.project_id, ch.meter_id, ch.period_start, ch.price_version_id, ch.charged_minor,
           ch.aggregation, ch.price
    FROM json_to_recordset(CAST(:rows AS json)) AS k(wallet_id text, meter_id text, period_start timestamptz,
                                                       price_version_id text)
    JOIN usage_charges ch ON ch.wallet_id = k.wallet_id AND ch.meter_id = k.meter_id
         AND ch.period_start = k.period_start AND ch.price_version_id = k.price_version_id
""")


def _stored(rows: Iterable[Any]) -> list[StoredCounter]:
    return [StoredCounter((r.wallet_id, r.project_id, r.meter_id, r.period_start, r.price_version_id),
                          r.source_topic, int(r.partition), Decimal(r.units), r.latest_at, int(r.events))
            for r in rows]


def life_counters(conn: Connection, source_id: str, *, project_id: str | None = None) -> list[StoredCounter]:
    """The counters of topic life ``source_id`` and the corrections replays of that life wrote (optionally one
    project's). Read it in the same REPEATABLE READ transaction as the applied marks: one instant."""
    return _stored(conn.execute(_COUNTERS_OF_LIFE, {"sid": source_id, "project": project_id,
                                                    "corrections": f"{CORRECTION_PREFIX}{source_id}:"}))


def key_state(conn: Connection, keys: Sequence[KeyTuple]) -> tuple[list[StoredCounter], dict[KeyTuple, KeyCharge]]:
    """Every counter row of ``keys`` (all sources, all lives) and their ``usage_charges`` rows: what the ledger
    prices them from."""
    if not keys:
        return [], {}
    rows = rows_json({"wallet_id": k[0], "meter_id": k[2], "period_start": k[3], "price_version_id": k[4]}
                     for k in sorted(set(keys)))
    every = _stored(conn.execute(_COUNTERS_OF_KEYS, {"rows": rows}))
    charges = {(r.wallet_id, r.project_id, r.meter_id, r.period_start, r.price_version_id):
               KeyCharge(int(r.charged_minor), r.aggregation, PriceModel.model_validate(r.price))
               for r in conn.execute(_CHARGES_OF_KEYS, {"rows": rows})}
    return every, charges


def apply_correction(conn: Connection, *, source_id: str, replay_id: str,
                     counters: Sequence[CounterValue]) -> CheckpointOutcome:
    """Post a replay's corrections inside the caller's transaction (the caller commits). ``stale`` when this
    replay id was applied before: nothing is written twice."""
    checkpoint = ChargeCheckpoint(source_topic=correction_source(source_id, replay_id), partition=0, as_of_offset=0,
                                  counters=list(counters), dedupe_keys=[], emitted_at=datetime.now(UTC))
    return apply_checkpoints(conn, [checkpoint], kind=TransactionKind.ADJUSTMENT,
                             reason=f"replay {replay_id}: usage re-metered from {source_id}").outcome
