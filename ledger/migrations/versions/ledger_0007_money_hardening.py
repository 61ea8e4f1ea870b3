"""Money hardening (issue 13): halted partitions, the tenant boundary in the schema, owner epochs (fencing).

Revision ID: ledger_0007
Revises: ledger_0011
Create Date: 2026-12-03

- ``partition_halts``: one row per halted lane of the ledger consumer (a source partition whose checkpoint
  cannot be applied, or a charges partition holding an undecodable message). Written by the consumer when
  it halts, refreshed on each failed retry, deleted when the lane resumes. Operators and the API's health
  read it (``ledger.queries.partition_halts``). It is a status table, not history: the history is the log.
- ``wallets UNIQUE (project_id, id)`` and composite foreign keys ``(project_id, wallet_id)`` from every ledger
  table that belongs to a project and names a wallet: a row can never say "project B" and point at project
  A's wallet (DESIGN §2 invariant 7). They replace the single-column ``wallet_id`` foreign keys.
- ``refused_counters``: the ledger's dead letters — a counter of a checkpoint whose wallet belongs to another
  project than the counter's (ledger/checkpoints.py). Nothing is posted for it; its cumulative value is kept
  here with the reason, so the usage is not lost and an operator can see and settle it.
- ``applied_offsets.owner_epoch``: the fencing epoch of a source partition (DESIGN §2 invariant 11). A
  streams worker takes ``owner_epoch + 1`` when it seeds the partition; the ledger refuses checkpoints that
  carry an older epoch. 0 = never taken (checkpoints without an epoch are epoch 0).
- ``topic_partitions``: the partition count of ``ledger.charges.v1`` recorded at its first use; a consumer
  refuses to start on a re-partitioned topic (a source partition's checkpoints would be spread over two
  charges partitions and could be applied out of order).
"""

from alembic import op

revision = "ledger_0007"
down_revision = "ledger_0006"
branch_labels = None
depends_on = None

#: table -> the single-column FK it had (ledger_0001) that the composite one replaces
_WALLET_REFERENCES = {
    "credit_buckets": "credit_buckets_wallet_id_fkey",
    "transactions": "transactions_wallet_id_fkey",
    "holds": "holds_wallet_id_fkey",
    "usage_charges": "usage_charges_wallet_id_fkey",
    # NOT usage_counters: its upsert runs before the charge-key locks, and a foreign key there takes KEY SHARE
    # locks on wallets out of the ledger's lock order (applied_offsets → usage_charges → wallets): two
    # partitions' appliers deadlocked (tests/integration/ledger/test_ledger_concurrency.py). Every counter has
    # its usage_charges row (same key, same transaction), which carries the boundary.
}

UPGRADE = """
CREATE TABLE partition_halts (
    scope               text NOT NULL CHECK (scope IN ('source', 'charges')),
    topic               text NOT NULL,     -- the source topic identity, or the charges topic (scope 'charges')
    partition           integer NOT NULL CHECK (partition >= 0),
    reason              text NOT NULL,     -- stable code: apply_failed, database_error, undecodable
    error               text NOT NULL,
    as_of_offset        bigint,            -- the first checkpoint that could not be applied (scope 'source')
    charges_partition   integer NOT NULL,
    charges_offset      bigint NOT NULL,   -- where the ledger.charges.v1 group offset is held
    pending_checkpoints integer NOT NULL,
    attempts            integer NOT NULL DEFAULT 1,
    halted_at           timestamptz NOT NULL DEFAULT now(),
    last_attempt_at     timestamptz NOT NULL DEFAULT now(),
    consumer            text NOT NULL,
    PRIMARY KEY (scope, topic, partition)
);

ALTER TABLE wallets ADD CONSTRAINT wallets_project_wallet UNIQUE (project_id, id);

CREATE TABLE refused_counters (
    id                bigserial PRIMARY KEY,
    source_topic      text NOT NULL,
    partition         integer NOT NULL,
    as_of_offset      bigint NOT NULL,
    reason            text NOT NULL,    -- wallet_in_other_project
    project_id        text NOT NULL,    -- the counter's (the checkpoint's) project
    wallet_id         text NOT NULL,
    wallet_project_id text NOT NULL,    -- the project the wallet belongs to
    meter_id          text NOT NULL,
    period_start      timestamptz NOT NULL,
    price_version_id  text NOT NULL,
    units             numeric NOT NULL,
    events            bigint NOT NULL,
    counter           jsonb NOT NULL,   -- the whole CounterValue as the checkpoint carried it
    refused_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source_topic, partition, as_of_offset, wallet_id, meter_id, period_start, price_version_id)
);
CREATE INDEX refused_counters_project ON refused_counters (project_id, refused_at);

ALTER TABLE applied_offsets ADD COLUMN owner_epoch bigint NOT NULL DEFAULT 0 CHECK (owner_epoch >= 0);

CREATE TABLE topic_partitions (
    topic        text PRIMARY KEY,
    partitions   integer NOT NULL CHECK (partitions > 0),
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
"""

DOWNGRADE = """
DROP TABLE IF EXISTS topic_partitions, refused_counters, partition_halts;
ALTER TABLE applied_offsets DROP COLUMN IF EXISTS owner_epoch;
"""


def upgrade() -> None:
    op.execute(UPGRADE)
    for table, old in _WALLET_REFERENCES.items():
        if old:
            op.execute(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {old}")
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {table}_project_wallet_fkey "
                   "FOREIGN KEY (project_id, wallet_id) REFERENCES wallets (project_id, id)")


def downgrade() -> None:
    for table, old in _WALLET_REFERENCES.items():
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {table}_project_wallet_fkey")
        if old:
            op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {old} FOREIGN KEY (wallet_id) REFERENCES wallets (id)")
    # CASCADE: the API's composite keys (api_0009) depend on this UNIQUE; a ledger downgrade below ledger_0007
    # takes them too (downgrade api first to keep api_0009's bookkeeping true)
    op.execute("ALTER TABLE wallets DROP CONSTRAINT IF EXISTS wallets_project_wallet CASCADE")
    op.execute(DOWNGRADE)
