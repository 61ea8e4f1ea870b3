"""Burning credit updates its bucket in place: the burn-order index is partial on a flag, not on the amount.

Revision ID: ledger_0017
Revises: ledger_0016
Create Date: 2026-12-07

Every debit — a synchronous one, a usage posting, a settle pass — rewrites the ``remaining_minor`` of the buckets it
burns. ``credit_buckets_burn_order`` (ledger_0001) was partial on ``remaining_minor > 0``: a column of an index
predicate counts as indexed, so no bucket update was ever HOT (pg_stat_user_tables after ``bench.ledger_apply
--settle-later``: 79,348 bucket updates, 0 HOT) and each wrote new entries into all three of the table's indexes.
The predicate is now ``live``, a stored generated column (``remaining_minor > 0``) that changes only when a bucket
runs empty (or a credit refills an empty one); the database computes it, so it cannot disagree with the amount.
Pages are filled to 80% so the next versions of a bucket fit beside it (ledger_0016 did the same for the tables a
checkpoint rewrites per key).

Adding a stored generated column rewrites ``credit_buckets`` once (an exclusive lock for the duration).
"""

from alembic import op

revision = "ledger_0017"
down_revision = "ledger_0016"
branch_labels = None
depends_on = None

_BURN_ORDER = "(wallet_id, priority, expires_at ASC NULLS LAST, created_at, id)"


def upgrade() -> None:
    op.execute("DROP INDEX credit_buckets_burn_order")
    op.execute("ALTER TABLE credit_buckets ADD COLUMN live boolean "
               "GENERATED ALWAYS AS (remaining_minor > 0) STORED")
    op.execute(f"CREATE INDEX credit_buckets_burn_order ON credit_buckets {_BURN_ORDER} WHERE live")
    op.execute("ALTER TABLE credit_buckets SET (fillfactor = 80)")


def downgrade() -> None:
    op.execute("ALTER TABLE credit_buckets RESET (fillfactor)")
    op.execute("DROP INDEX credit_buckets_burn_order")
    op.execute("ALTER TABLE credit_buckets DROP COLUMN live")
    op.execute(f"CREATE INDEX credit_buckets_burn_order ON credit_buckets {_BURN_ORDER} WHERE remaining_minor > 0")
