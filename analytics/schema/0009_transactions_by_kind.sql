-- Revenue by pack/plan and the paywall funnel read only purchases (top_up, subscription_grant), a few percent
-- of the transactions; ordered by time they sat among every usage row of the window. Ordered by kind first,
-- with only the columns those queries read, a window's purchases are contiguous (measured by
-- bench/analytics_queries.py: revenue over 30 days reads 7 granules instead of 62).
ALTER TABLE ${db}.ledger_transactions ADD PROJECTION IF NOT EXISTS by_kind
(
    SELECT project_id, kind, created_at, transaction_id, wallet_id, amount_minor, source_ref
    ORDER BY project_id, kind, created_at
);
ALTER TABLE ${db}.ledger_transactions MATERIALIZE PROJECTION by_kind SETTINGS mutations_sync = 1;
