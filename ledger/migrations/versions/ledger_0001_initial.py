"""Ledger schema: wallets, credit buckets, the append-only transaction log, usage counters, the checkpoint
protocol's applied offsets and dedupe keys, reservations (holds) and the transactions outbox.

Revision ID: ledger_0001
Revises:
Create Date: 2026-01-01

Invariants the database itself enforces (the service relies on them, tests check them):
- transactions and transaction_allocations are append-only: a trigger refuses UPDATE, DELETE, TRUNCATE;
- every transaction satisfies balance_after = balance_before + amount; idempotency keys are unique;
- a bucket's remaining credit stays within [0, granted]; a wallet's held amount is never negative;
- one applied_offsets row per (source_topic, partition); one counter per key and partition.
"""

from alembic import op

revision = "ledger_0001"
down_revision = None
branch_labels = None
depends_on = None

KINDS = ("top_up", "usage", "debit", "refund", "bonus", "promo", "subscription_grant", "expiry",
         "adjustment", "reservation_commit")
BUCKET_SOURCES = ("top_up", "subscription", "bonus", "refund", "promo", "adjustment")


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


UPGRADE = f"""
CREATE TABLE wallets (
    id              text PRIMARY KEY,
    project_id      text NOT NULL,
    owner_kind      text NOT NULL CHECK (owner_kind IN ('user', 'project', 'subject')),
    owner_ref       text NOT NULL,
    credit_code     text NOT NULL DEFAULT 'credits',
    credit_scale    smallint NOT NULL DEFAULT 0 CHECK (credit_scale BETWEEN 0 AND 18),
    balance_minor   bigint NOT NULL DEFAULT 0,   -- sum of all transaction amounts; negative = debt
    held_minor      bigint NOT NULL DEFAULT 0 CHECK (held_minor >= 0),
    floor_minor     bigint NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, owner_kind, owner_ref)
);

CREATE TABLE credit_buckets (
    id              bigserial PRIMARY KEY,
    wallet_id       text NOT NULL REFERENCES wallets (id),
    project_id      text NOT NULL,
    source          text NOT NULL CHECK (source IN ({_in(BUCKET_SOURCES)})),
    priority        integer NOT NULL,
    granted_minor   bigint NOT NULL CHECK (granted_minor >= 0),
    remaining_minor bigint NOT NULL CHECK (remaining_minor >= 0 AND remaining_minor <= granted_minor),
    expires_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    source_ref      text,
    expired_at      timestamptz
);
-- the burn plan reads a wallet's live buckets in burn order
CREATE INDEX credit_buckets_burn_order ON credit_buckets
    (wallet_id, priority, expires_at ASC NULLS LAST, created_at, id) WHERE remaining_minor > 0;
-- the expiry job finds due buckets
CREATE INDEX credit_buckets_due ON credit_buckets (expires_at) WHERE expired_at IS NULL AND expires_at IS NOT NULL;
CREATE INDEX credit_buckets_wallet ON credit_buckets (wallet_id, id);

CREATE TABLE transactions (
    id                      bigserial PRIMARY KEY,
    project_id              text NOT NULL,
    wallet_id               text NOT NULL REFERENCES wallets (id),
    kind                    text NOT NULL CHECK (kind IN ({_in(KINDS)})),
    amount_minor            bigint NOT NULL,
    balance_before_minor    bigint NOT NULL,
    balance_after_minor     bigint NOT NULL,
    idempotency_key         text NOT NULL UNIQUE,
    request_fingerprint     text,       -- what the key was first used for; a different request = conflict
    source_ref              text,
    related_transaction_id  bigint REFERENCES transactions (id),
    hold_id                 text,
    meter_id                text,
    period_start            timestamptz,
    price_version_id        text,
    reason                  text,
    metadata                jsonb,
    created_at              timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT balance_arithmetic CHECK (balance_after_minor = balance_before_minor + amount_minor),
    CONSTRAINT refund_links_original CHECK (kind <> 'refund' OR related_transaction_id IS NOT NULL),
    CONSTRAINT refund_is_credit CHECK (kind <> 'refund' OR amount_minor > 0),
    CONSTRAINT adjustment_has_reason CHECK (kind <> 'adjustment' OR reason IS NOT NULL)
);
CREATE INDEX transactions_wallet_id ON transactions (wallet_id, id);
CREATE INDEX transactions_wallet_created ON transactions (wallet_id, created_at);
CREATE INDEX transactions_project_created ON transactions (project_id, created_at);
CREATE INDEX transactions_source_ref ON transactions (source_ref) WHERE source_ref IS NOT NULL;
CREATE INDEX transactions_related ON transactions (related_transaction_id) WHERE related_transaction_id IS NOT NULL;

-- bucket_id NULL = the wallet's debt: usage beyond the buckets (negative) or a credit repaying debt
-- (positive). Invariant: the allocations of a transaction sum to its amount.
CREATE TABLE transaction_allocations (
    transaction_id  bigint NOT NULL REFERENCES transactions (id),
    bucket_id       bigint REFERENCES credit_buckets (id),
    amount_minor    bigint NOT NULL CHECK (amount_minor <> 0)
);
CREATE INDEX transaction_allocations_tx ON transaction_allocations (transaction_id);
CREATE INDEX transaction_allocations_bucket ON transaction_allocations (bucket_id) WHERE bucket_id IS NOT NULL;

CREATE FUNCTION ledger_refuse_mutation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger: % on % is refused: the ledger is append-only (post a compensating transaction)',
        TG_OP, TG_TABLE_NAME USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER transactions_append_only BEFORE UPDATE OR DELETE ON transactions
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_mutation();
CREATE TRIGGER transactions_no_truncate BEFORE TRUNCATE ON transactions
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_mutation();
CREATE TRIGGER transaction_allocations_append_only BEFORE UPDATE OR DELETE ON transaction_allocations
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_mutation();
CREATE TRIGGER transaction_allocations_no_truncate BEFORE TRUNCATE ON transaction_allocations
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_mutation();

-- one partition's view of a key (what streams seeds from)
CREATE TABLE usage_counters (
    wallet_id        text NOT NULL,
    project_id       text NOT NULL,
    meter_id         text NOT NULL,
    period_start     timestamptz NOT NULL,
    price_version_id text NOT NULL,
    source_topic     text NOT NULL,
    partition        integer NOT NULL CHECK (partition >= 0),
    units            numeric NOT NULL,
    latest_at        timestamptz,
    events           bigint NOT NULL DEFAULT 0 CHECK (events >= 0),
    late_events      bigint NOT NULL DEFAULT 0 CHECK (late_events >= 0),
    as_of_offset     bigint NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (wallet_id, meter_id, period_start, price_version_id, source_topic, partition)
);
CREATE INDEX usage_counters_partition ON usage_counters (source_topic, partition);

-- a key merged across partitions, and what has been charged for it
CREATE TABLE usage_charges (
    wallet_id        text NOT NULL REFERENCES wallets (id),
    project_id       text NOT NULL,
    meter_id         text NOT NULL,
    period_start     timestamptz NOT NULL,
    price_version_id text NOT NULL,
    aggregation      text NOT NULL CHECK (aggregation IN ('sum', 'count', 'max', 'latest', 'unique_count')),
    price            jsonb NOT NULL,
    units            numeric NOT NULL DEFAULT 0,
    charged_minor    bigint NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (wallet_id, meter_id, period_start, price_version_id)
);

CREATE TABLE applied_offsets (
    source_topic     text NOT NULL,
    partition        integer NOT NULL CHECK (partition >= 0),
    applied_through  bigint NOT NULL DEFAULT -1,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_topic, partition)
);

CREATE TABLE dedupe_keys (
    source_topic     text NOT NULL,
    partition        integer NOT NULL,
    key_hash         bigint NOT NULL,
    seen_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_topic, partition, key_hash)
);
CREATE INDEX dedupe_keys_seen ON dedupe_keys (source_topic, partition, seen_at);
CREATE INDEX dedupe_keys_purge ON dedupe_keys (seen_at);

CREATE TABLE holds (
    id                       text PRIMARY KEY,
    wallet_id                text NOT NULL REFERENCES wallets (id),
    project_id               text NOT NULL,
    amount_minor             bigint NOT NULL CHECK (amount_minor > 0),
    status                   text NOT NULL DEFAULT 'active'
                             CHECK (status IN ('active', 'committed', 'voided', 'expired')),
    expires_at               timestamptz NOT NULL,
    idempotency_key          text NOT NULL UNIQUE,
    committed_transaction_id bigint REFERENCES transactions (id),
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT committed_has_transaction CHECK ((status = 'committed') = (committed_transaction_id IS NOT NULL))
);
CREATE INDEX holds_active_due ON holds (expires_at) WHERE status = 'active';
CREATE INDEX holds_wallet ON holds (wallet_id, created_at);

CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    topic         text NOT NULL,         -- base topic name; the relay adds the deployment prefix
    key           text NOT NULL,
    payload       bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;

-- the scheduler's single-runner lease
CREATE TABLE scheduler_leases (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    expires_at  timestamptz NOT NULL,
    renewed_at  timestamptz NOT NULL DEFAULT now()
);
"""

DOWNGRADE = """
DROP TABLE IF EXISTS scheduler_leases, outbox, holds, dedupe_keys, applied_offsets, usage_charges,
    usage_counters, transaction_allocations, transactions, credit_buckets, wallets CASCADE;
DROP FUNCTION IF EXISTS ledger_refuse_mutation();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
