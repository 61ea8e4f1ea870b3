"""A hash chain over each wallet's transactions: ``transactions.chain_hash``.

Revision ID: ledger_0010
Revises: ledger_0005
Create Date: 2026-12-03

``chain_hash = sha256(previous chain_hash of the same wallet (empty for its first) || payload)``, where the
payload is the UTF-8 text of ``ledger_chain_payload(row)``: a JSON array (PostgreSQL's json output: ``, ``
between items) of id, project_id, wallet_id, kind, amount_minor, balance_before_minor, balance_after_minor,
idempotency_key, request_fingerprint, source_ref, related_transaction_id, hold_id, meter_id, period_start,
price_version_id, reason, metadata (jsonb text), created_at — the two times as integer microseconds since the
Unix epoch, so the text never depends on a session's time zone. ledger/chain.py recomputes the same payload
in Python from the columns (``meterline ledger verify``).

Written by a BEFORE INSERT trigger, so every path that posts (the set-based writer, the API's pipelined hot
path, group-committed debits) chains in the posting's own transaction and statement, and nothing can insert an
unchained row. Concurrency: every posting holds its wallet's row lock (``FOR UPDATE``) and allocates its
transaction ids under it, so a wallet's postings commit one after another in id order; the trigger's lookup of
the wallet's previous row (``id < NEW.id``, newest first, index ``transactions_wallet_id``) therefore sees the
committed predecessor, and within one multi-row INSERT the rows processed before it (PostgreSQL shows a row-level
BEFORE trigger the rows its statement already inserted; the writers insert in id order).

Existing rows are chained once here, wallet by wallet in id order (the append-only trigger is disabled for
that UPDATE only, inside this migration's transaction).
"""

from alembic import op

revision = "ledger_0010"
down_revision = "ledger_0005"
branch_labels = None
depends_on = None

PAYLOAD = """
CREATE FUNCTION ledger_chain_payload(t transactions) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT json_build_array(t.id, t.project_id, t.wallet_id, t.kind, t.amount_minor, t.balance_before_minor,
        t.balance_after_minor, t.idempotency_key, t.request_fingerprint, t.source_ref, t.related_transaction_id,
        t.hold_id, t.meter_id, (extract(epoch FROM t.period_start) * 1000000)::bigint, t.price_version_id,
        t.reason, t.metadata, (extract(epoch FROM t.created_at) * 1000000)::bigint)::text
$$;
"""

LINK = r"""
CREATE FUNCTION ledger_chain_link() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    previous bytea;
BEGIN
    SELECT chain_hash INTO previous FROM transactions
    WHERE wallet_id = NEW.wallet_id AND id < NEW.id ORDER BY id DESC LIMIT 1;
    NEW.chain_hash := sha256(coalesce(previous, '\x'::bytea) || convert_to(ledger_chain_payload(NEW), 'UTF8'));
    RETURN NEW;
END $$;
"""

BACKFILL = r"""
DO $$
DECLARE
    r transactions;
    previous bytea;
    current_wallet text;
BEGIN
    FOR r IN SELECT * FROM transactions ORDER BY wallet_id, id LOOP
        IF current_wallet IS DISTINCT FROM r.wallet_id THEN
            previous := NULL;
            current_wallet := r.wallet_id;
        END IF;
        previous := sha256(coalesce(previous, '\x'::bytea) || convert_to(ledger_chain_payload(r), 'UTF8'));
        UPDATE transactions SET chain_hash = previous WHERE id = r.id;
    END LOOP;
END $$;
"""


def upgrade() -> None:
    op.execute("ALTER TABLE transactions ADD COLUMN chain_hash bytea")
    op.execute(PAYLOAD)
    op.execute("ALTER TABLE transactions DISABLE TRIGGER transactions_append_only")
    op.execute(BACKFILL)
    op.execute("ALTER TABLE transactions ENABLE TRIGGER transactions_append_only")
    op.execute("ALTER TABLE transactions ALTER COLUMN chain_hash SET NOT NULL")
    op.execute(LINK)
    op.execute("CREATE TRIGGER transactions_chain BEFORE INSERT ON transactions "
               "FOR EACH ROW EXECUTE FUNCTION ledger_chain_link()")


def downgrade() -> None:
    op.execute("DROP TRIGGER transactions_chain ON transactions")
    op.execute("DROP FUNCTION ledger_chain_link()")
    op.execute("DROP FUNCTION ledger_chain_payload(transactions)")
    op.execute("ALTER TABLE transactions DROP COLUMN chain_hash")
