"""Dedupe keys stored as one array per applied checkpoint instead of one row per event.

Revision ID: ledger_0004
Revises: ledger_0003
Create Date: 2026-12-01

Why: a row per event (with its primary key and two more indexes) was the single most expensive statement of a
checkpoint's application — 6.3 ms of a 38.6 ms median with 720 keys (bench.ledger_apply, SQL timed per
statement) — and at 20,000 events/s it was 20,000 index-heavy rows/s. The keys are only ever read in bulk (a
worker seeding a partition) and purged by age, never looked up one by one, so one ``bigint[]`` per checkpoint
serves every reader.

- one row per applied (merged) checkpoint: ``(source_topic, partition, as_of_offset)`` is unique because
  applied offsets only move forward; a hash may repeat across rows (readers build sets);
- rows migrated from ``dedupe_keys`` were recorded before offsets were kept: they get negative, distinct
  ``as_of_offset`` values (one row per (topic, partition, seen_at)), which no real checkpoint can carry.
"""

from alembic import op

revision = "ledger_0004"
down_revision = "ledger_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE TABLE dedupe_key_sets (
    source_topic   text NOT NULL,
    partition      integer NOT NULL CHECK (partition >= 0),
    as_of_offset   bigint NOT NULL,
    seen_at        timestamptz NOT NULL DEFAULT now(),
    key_hashes     bigint[] NOT NULL,
    PRIMARY KEY (source_topic, partition, as_of_offset)
);
CREATE INDEX dedupe_key_sets_purge ON dedupe_key_sets (seen_at);

INSERT INTO dedupe_key_sets (source_topic, partition, as_of_offset, seen_at, key_hashes)
SELECT source_topic, partition,
       -row_number() OVER (PARTITION BY source_topic, partition ORDER BY seen_at),
       seen_at, array_agg(key_hash ORDER BY key_hash)
FROM dedupe_keys
GROUP BY source_topic, partition, seen_at;

DROP TABLE dedupe_keys;
""")


def downgrade() -> None:
    op.execute("""
CREATE TABLE dedupe_keys (
    source_topic     text NOT NULL,
    partition        integer NOT NULL,
    key_hash         bigint NOT NULL,
    seen_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_topic, partition, key_hash)
);
CREATE INDEX dedupe_keys_seen ON dedupe_keys (source_topic, partition, seen_at);
CREATE INDEX dedupe_keys_purge ON dedupe_keys (seen_at);

INSERT INTO dedupe_keys (source_topic, partition, key_hash, seen_at)
SELECT source_topic, partition, h, min(seen_at)
FROM dedupe_key_sets, unnest(key_hashes) AS h
GROUP BY source_topic, partition, h;

DROP TABLE dedupe_key_sets;
""")
