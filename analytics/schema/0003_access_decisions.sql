-- Access decisions (paywall telemetry): every allow/deny with its reason, policy and cost. Empty until the
-- policy engine emits to the access decisions topic (ANALYTICS_ACCESS_DECISIONS_TOPIC).
CREATE TABLE IF NOT EXISTS ${db}.access_decisions
(
    decision_id     String,
    project_id      LowCardinality(String),
    subject         String,
    wallet_id       String,
    asset_id        String,
    action          LowCardinality(String),
    allowed         UInt8,
    reason          LowCardinality(String),
    policy_id       LowCardinality(String),
    cost_minor      Int64,
    time            DateTime64(3, 'UTC'),
    ingested_at     DateTime64(3, 'UTC'),
    kafka_topic     LowCardinality(String),
    kafka_partition UInt32,
    kafka_offset    UInt64,
    kafka_index     UInt32
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(time)
ORDER BY (project_id, time, decision_id)
SETTINGS non_replicated_deduplication_window = 10000;
