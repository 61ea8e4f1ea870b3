"""Contracts the ledger owns: the charge checkpoint it consumes and the transaction event it emits.

Dependency-light on purpose (pydantic + stdlib): ``streams`` and ``analytics`` import this module, and
importing it must not pull in SQLAlchemy or Kafka clients.

Units and money:
- ``units`` are decimal strings (meters may SUM fractional values); they are never floats.
- every amount is an integer in minor units of the wallet's credit (``*_minor``).
- every time is a timezone-aware UTC datetime.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, PlainSerializer

__all__ = [
    "TOPIC_LEDGER_CHARGES",
    "TOPIC_LEDGER_TRANSACTIONS",
    "ChargeCheckpoint",
    "CounterKey",
    "CounterValue",
    "TransactionKind",
    "TransactionPosted",
    "Units",
]

TOPIC_LEDGER_CHARGES = "ledger.charges.v1"
TOPIC_LEDGER_TRANSACTIONS = "ledger.transactions.v1"

#: Units travel as decimal strings so no float ever touches a counter.
Units = Annotated[Decimal, PlainSerializer(lambda d: format(d, "f"), return_type=str)]


class TransactionKind(StrEnum):
    TOP_UP = "top_up"
    USAGE = "usage"
    DEBIT = "debit"
    REFUND = "refund"
    BONUS = "bonus"
    PROMO = "promo"
    SUBSCRIPTION_GRANT = "subscription_grant"
    EXPIRY = "expiry"
    ADJUSTMENT = "adjustment"
    RESERVATION_COMMIT = "reservation_commit"


class CounterKey(BaseModel):
    """Identity of one cumulative usage counter: what the ledger prices as a whole."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    wallet_id: str
    project_id: str
    meter_id: str
    period_start: AwareDatetime
    price_version_id: str


class CounterValue(BaseModel):
    """The cumulative state of a counter as seen by ONE source partition, as of the checkpoint's offset.

    ``units`` is the meter's aggregate over every event of this key that the partition has accepted in the
    period (SUM/COUNT: running sum; MAX: running max; LATEST: value of the latest event, with its time;
    UNIQUE_COUNT: distinct values seen). The ledger merges the partitions' values and prices the total."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: CounterKey
    units: Units
    latest_at: AwareDatetime | None = None
    events: int = Field(ge=0, description="events counted into this value (cumulative)")
    late_events: int = Field(default=0, ge=0, description="of which arrived after the allowed lateness")


class ChargeCheckpoint(BaseModel):
    """"For source partition ``partition``, as of offset ``as_of_offset``, these counters stand at these
    cumulative values."

    The ledger applies it only if ``as_of_offset > applied_through[source_topic, partition]``; a stale or
    repeated checkpoint is a no-op (DESIGN §2.2). ``counters`` lists only the keys that changed since the
    previous checkpoint of the same partition, but each value is cumulative, never a delta."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source_topic: str
    partition: int = Field(ge=0)
    as_of_offset: int = Field(ge=0)
    counters: list[CounterValue]
    dedupe_keys: list[int] = Field(
        default_factory=list,
        description="64-bit hashes of the (project, source, id) identities accepted in this checkpoint",
    )
    emitted_at: AwareDatetime


class TransactionPosted(BaseModel):
    """Emitted (through the outbox, after commit) for every transaction row the ledger writes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    transaction_id: int
    project_id: str
    wallet_id: str
    kind: TransactionKind
    amount_minor: int
    balance_before_minor: int
    balance_after_minor: int
    idempotency_key: str
    source_ref: str | None = None
    meter_id: str | None = None
    bucket_source: str | None = None
    created_at: datetime
