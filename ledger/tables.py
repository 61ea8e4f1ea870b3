"""SQLAlchemy Core views of the ledger's tables (the schema itself lives in the ledger_0001 migration).

These mirror the migration column for column so queries can be written with Core expressions; the
migration is the source of truth for constraints, indexes and triggers."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Computed,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    SmallInteger,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

metadata = MetaData()


def _ts(name: str, *, nullable: bool = False) -> Column[object]:
    return Column(name, DateTime(timezone=True), nullable=nullable)


wallets = Table(
    "wallets", metadata,
    Column("id", Text, primary_key=True),
    Column("project_id", Text, nullable=False),
    Column("owner_kind", Text, nullable=False),
    Column("owner_ref", Text, nullable=False),
    Column("credit_code", Text, nullable=False),
    Column("credit_scale", SmallInteger, nullable=False),
    Column("balance_minor", BigInteger, nullable=False),
    Column("held_minor", BigInteger, nullable=False),
    Column("floor_minor", BigInteger, nullable=False),
    _ts("created_at"),
    _ts("updated_at"),
    Column("unsettled_minor", BigInteger, nullable=False),  # ledger_0015: usage priced, not yet posted
)

credit_buckets = Table(
    "credit_buckets", metadata,
    Column("id", BigInteger, primary_key=True),
    Column("wallet_id", Text, nullable=False),
    Column("project_id", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("priority", Integer, nullable=False),
    Column("granted_minor", BigInteger, nullable=False),
    Column("remaining_minor", BigInteger, nullable=False),
    _ts("expires_at", nullable=True),
    _ts("created_at"),
    Column("source_ref", Text),
    _ts("expired_at", nullable=True),
    # ledger_0017: the burn-order index is partial on this, not on the amount (HOT updates)
    Column("live", Boolean, Computed("remaining_minor > 0", persisted=True)),
)

transactions = Table(
    "transactions", metadata,
    Column("id", BigInteger, primary_key=True),
    Column("project_id", Text, nullable=False),
    Column("wallet_id", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("balance_before_minor", BigInteger, nullable=False),
    Column("balance_after_minor", BigInteger, nullable=False),
    Column("idempotency_key", Text, nullable=False, unique=True),
    Column("request_fingerprint", Text),
    Column("source_ref", Text),
    Column("related_transaction_id", BigInteger),
    Column("hold_id", Text),
    Column("meter_id", Text),
    _ts("period_start", nullable=True),
    Column("price_version_id", Text),
    Column("reason", Text),
    Column("metadata", JSONB),
    _ts("created_at"),
)

transaction_allocations = Table(
    "transaction_allocations", metadata,
    Column("transaction_id", BigInteger, nullable=False),
    Column("bucket_id", BigInteger),  # NULL = the wallet's debt
    Column("amount_minor", BigInteger, nullable=False),
    Column("seq", BigInteger),  # bigserial: the order allocations were written (= burned) in; ledger_0012
)

usage_counters = Table(
    "usage_counters", metadata,
    Column("wallet_id", Text, primary_key=True),
    Column("project_id", Text, nullable=False),
    Column("meter_id", Text, primary_key=True),
    Column("period_start", DateTime(timezone=True), primary_key=True),
    Column("price_version_id", Text, primary_key=True),
    Column("source_topic", Text, primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("units", Numeric, nullable=False),
    _ts("latest_at", nullable=True),
    Column("events", BigInteger, nullable=False),
    Column("late_events", BigInteger, nullable=False),
    Column("as_of_offset", BigInteger, nullable=False),
    _ts("updated_at"),
)

usage_charges = Table(
    "usage_charges", metadata,
    Column("wallet_id", Text, primary_key=True),
    Column("project_id", Text, nullable=False),
    Column("meter_id", Text, primary_key=True),
    Column("period_start", DateTime(timezone=True), primary_key=True),
    Column("price_version_id", Text, primary_key=True),
    Column("aggregation", Text, nullable=False),
    Column("price", JSONB, nullable=False),
    Column("units", Numeric, nullable=False),
    Column("charged_minor", BigInteger, nullable=False),
    _ts("updated_at"),
    Column("meter_version", Integer, nullable=False),  # ledger_0006
    Column("price_effective_from", DateTime(timezone=True)),  # ledger_0006: NULL = priced on its own
    Column("posted_minor", BigInteger, nullable=False),  # ledger_0015: what its usage transactions add up to
    Column("settlements", Integer, nullable=False),  # ledger_0015: settle passes that posted it
    # ledger_0016: the partial index of keys left to settle is on this, not on the two amounts (HOT updates)
    Column("unsettled", Boolean, Computed("charged_minor <> posted_minor", persisted=True)),
)

usage_charge_groups = Table(  # ledger_0006: the lock of a (wallet, meter, period, meter version)'s price versions
    "usage_charge_groups", metadata,
    Column("wallet_id", Text, primary_key=True),
    Column("meter_id", Text, primary_key=True),
    Column("period_start", DateTime(timezone=True), primary_key=True),
    Column("meter_version", Integer, primary_key=True),
)

applied_offsets = Table(
    "applied_offsets", metadata,
    Column("source_topic", Text, primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("applied_through", BigInteger, nullable=False),
    _ts("updated_at"),
)

dedupe_key_sets = Table(
    "dedupe_key_sets", metadata,
    Column("source_topic", Text, primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("as_of_offset", BigInteger, primary_key=True),
    _ts("seen_at"),
    Column("key_hashes", ARRAY(BigInteger), nullable=False),
    Column("arrived_at", DateTime(timezone=True)),  # ledger_0006: stream time of the checkpoint
)

holds = Table(
    "holds", metadata,
    Column("id", Text, primary_key=True),
    Column("wallet_id", Text, nullable=False),
    Column("project_id", Text, nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("status", Text, nullable=False),
    _ts("expires_at"),
    Column("idempotency_key", Text, nullable=False, unique=True),
    Column("committed_transaction_id", BigInteger),
    _ts("created_at"),
    _ts("updated_at"),
)

outbox = Table(
    "outbox", metadata,
    Column("id", BigInteger, primary_key=True),
    Column("topic", Text, nullable=False),
    Column("key", Text, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    _ts("created_at"),
    _ts("published_at", nullable=True),
)

scheduler_leases = Table(
    "scheduler_leases", metadata,
    Column("name", Text, primary_key=True),
    Column("holder", Text, nullable=False),
    _ts("expires_at"),
    _ts("renewed_at"),
)
