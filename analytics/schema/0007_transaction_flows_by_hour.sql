-- Wallet figures without FINAL, from an hourly rollup.
-- Why it is exact: since this version the sink drops a transaction whose transaction_id is already stored
-- (the outbox relay's second copy) before inserting, so the table holds each transaction once and queries read
-- it without FINAL. The rollup is a PROJECTION (inside the same part as its rows, like usage_events'), so an
-- insert commits rows and rollup together and the sink's redelivery repair keeps both exact; a materialized
-- view would be a separate insert that a crash can split from its rows. ReplacingMergeTree stays as the
-- backstop for the one residual window (a stalled former partition owner): its merges drop such a copy and,
-- with deduplicate_merge_projection_mode = 'rebuild' (0006), rebuild the rollup from the surviving rows.
-- Grouped by everything a flow is classified by (kind, the sign of the amount, the bucket source), so flows,
-- outstanding credits, credit flow per hour/day/month and the source breakdown all read it; the queries read
-- raw rows only for the partial hours at the edges of a window (analytics/queries.py).
ALTER TABLE ${db}.ledger_transactions ADD PROJECTION IF NOT EXISTS flows_by_hour
(
    SELECT project_id, toStartOfHour(created_at), kind, bucket_source, amount_minor > 0, sum(amount_minor), count()
    GROUP BY project_id, toStartOfHour(created_at), kind, bucket_source, amount_minor > 0
);
ALTER TABLE ${db}.ledger_transactions MATERIALIZE PROJECTION flows_by_hour SETTINGS mutations_sync = 1;
-- Copies stored before this version are removed once (a duplicate has the same created_at, hence the same
-- partition and sorting key); merged parts get every projection rebuilt. Instant on an empty table.
OPTIMIZE TABLE ${db}.ledger_transactions FINAL;
