-- Hourly per-meter usage: a cache of whole hours that the queries use only while it is provably exact
-- (analytics/meter_rollup.py states the invariant). Meter definitions live in the catalog (PostgreSQL), so
-- neither a projection nor the sink can compute meter units at insert time: the api fills an hour from the
-- raw rows the first time a query needs it, and stamps the fill with the hour's row count in usage_events.
-- meter_usage_by_hour: one row per (project, definition, hour, fill, group value). `definition` is a hash of
-- everything that decides a row's contribution (version's event type, aggregation, value property, filters,
-- the meter's aggregation, the group-by path). Only the column of the meter's aggregation is filled: `units`
-- (SUM: the sum, MAX: the max), `latest` (LATEST: argMax state), `uniq` (UNIQUE_COUNT: uniqExact state);
-- COUNT is `events`. Plain MergeTree: every fill has its own fill_id (one per hour), nothing is merged
-- away, a reader picks one fill per hour.
CREATE TABLE IF NOT EXISTS ${db}.meter_usage_by_hour
(
    project_id  LowCardinality(String),
    definition  String,
    hour        DateTime('UTC'),
    fill_id     UInt64,
    grp         String,
    events      UInt64,
    rejected    UInt64,
    units       Nullable(Decimal(38, 9)),
    latest      AggregateFunction(argMax, Decimal(38, 9), DateTime64(3, 'UTC')),
    uniq        AggregateFunction(uniqExact, String)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (project_id, definition, hour, fill_id, grp);
-- One row per filled hour, written only after the fill's rows were inserted (the fill's commit record):
-- src_events = the count of the event type's rows in that hour (by_hour projection) read BEFORE the fill.
CREATE TABLE IF NOT EXISTS ${db}.meter_usage_fills
(
    project_id  LowCardinality(String),
    definition  String,
    hour        DateTime('UTC'),
    src_events  UInt64,
    fill_id     UInt64,
    filled_at   DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (project_id, definition, hour, src_events)
