-- Wallet drill-downs: a wallet's transactions are spread over the whole time-ordered table (a bloom filter on
-- wallet_id skips nothing when every granule holds some of every busy wallet). A projection ordered by
-- wallet finds them directly. Projections are not read under FINAL, so wallet-scoped queries deduplicate
-- with LIMIT 1 BY transaction_id instead (duplicates of a transaction are identical rows). On merges the
-- projection is rebuilt from the deduplicated rows.
ALTER TABLE ${db}.ledger_transactions MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild';
ALTER TABLE ${db}.ledger_transactions ADD PROJECTION IF NOT EXISTS by_wallet
(
    SELECT * ORDER BY project_id, wallet_id, created_at, transaction_id
);
ALTER TABLE ${db}.ledger_transactions MATERIALIZE PROJECTION by_wallet SETTINGS mutations_sync = 1;
