-- Usage events as accepted from usage.events.v1 (one row per CloudEvent).
-- Plain MergeTree: a row is written at most once per Kafka identity (kafka_topic, kafka_partition,
-- kafka_offset, kafka_index) by the sink (see analytics/sink.py), so storage needs no merge-time dedup and
-- reads need no FINAL.
-- Pre-aggregations are PROJECTIONS, not materialized views: a projection lives inside the same data part
-- as its rows, so an insert commits rows and rollups together or not at all, and the sink's recovery
-- (which reads the rows) is exact for the rollups too. The optimizer answers a query from the smallest
-- projection that can (filters and keys must be expressible from the projection's keys: the queries filter
-- on toStartOfMinute(time) / toStartOfDay(time) for that reason).
CREATE TABLE IF NOT EXISTS ${db}.usage_events
(
    project_id      LowCardinality(String),
    event_type      LowCardinality(String),
    subject         LowCardinality(String),
    wallet_id       String DEFAULT '',
    time            DateTime64(3, 'UTC'),
    units           Decimal(38, 9),
    event_id        String,
    source          LowCardinality(String),
    data            String CODEC(ZSTD(3)),
    ingested_at     DateTime64(3, 'UTC'),
    kafka_topic     LowCardinality(String),
    kafka_partition UInt32,
    kafka_offset    UInt64,
    kafka_index     UInt32,
    PROJECTION by_minute
    (
        SELECT project_id, event_type, toStartOfMinute(time), count(), sum(units)
        GROUP BY project_id, event_type, toStartOfMinute(time)
    ),
    PROJECTION by_subject_day
    (
        SELECT project_id, event_type, subject, toStartOfDay(time), count(), sum(units)
        GROUP BY project_id, event_type, subject, toStartOfDay(time)
    ),
    PROJECTION by_subject_day_all_meters
    (
        SELECT project_id, subject, toStartOfDay(time), count()
        GROUP BY project_id, subject, toStartOfDay(time)
    ),
    PROJECTION kafka_marks
    (
        SELECT kafka_topic, kafka_partition, max(kafka_offset)
        GROUP BY kafka_topic, kafka_partition
    )
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (project_id, event_type, time, subject)
SETTINGS non_replicated_deduplication_window = 10000;
