-- Ledger transactions from ledger.transactions.v1 (TransactionPosted, ledger/contracts.py).
-- The outbox relay is at-least-once: the same transaction may arrive twice at DIFFERENT offsets, so the
-- table is a ReplacingMergeTree on the transaction's identity and every query reads it with FINAL.
-- A duplicate always carries the same created_at, hence the same partition and sorting key: FINAL never
-- has to merge across partitions (do_not_merge_across_partitions_select_final is safe).
CREATE TABLE IF NOT EXISTS ${db}.ledger_transactions
(
    transaction_id         Int64,
    project_id             LowCardinality(String),
    wallet_id              String,
    kind                   LowCardinality(String),
    amount_minor           Int64,
    balance_before_minor   Int64,
    balance_after_minor    Int64,
    bucket_source          LowCardinality(String),
    source_ref             String,
    meter_id               LowCardinality(String),
    related_transaction_id Nullable(Int64),
    reason                 String,
    idempotency_key        String,
    debt_settled_minor     Int64,
    created_at             DateTime64(6, 'UTC'),
    ingested_at            DateTime64(3, 'UTC'),
    kafka_topic            LowCardinality(String),
    kafka_partition        UInt32,
    kafka_offset           UInt64,
    kafka_index            UInt32,
    INDEX wallet_bloom wallet_id TYPE bloom_filter GRANULARITY 4
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(created_at)
ORDER BY (project_id, created_at, transaction_id)
SETTINGS non_replicated_deduplication_window = 10000;
