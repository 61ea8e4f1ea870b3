-- Recent messages of usage.events.dlq.v1 for the dashboard's dead-letter viewer (kept 30 days).
-- project_id is '' when the rejected payload did not name one (visible to no project).
CREATE TABLE IF NOT EXISTS ${db}.dead_letters
(
    project_id      LowCardinality(String),
    received_at     DateTime64(3, 'UTC'),
    reason          String,
    payload         String CODEC(ZSTD(3)),
    headers         String,
    kafka_topic     LowCardinality(String),
    kafka_partition UInt32,
    kafka_offset    UInt64,
    kafka_index     UInt32
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(received_at)
ORDER BY (project_id, received_at, kafka_partition, kafka_offset)
TTL toDateTime(received_at) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 10000;
