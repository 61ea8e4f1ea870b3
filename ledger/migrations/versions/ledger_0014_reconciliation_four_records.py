"""Continuous reconciliation of four records: what each report compared and every key the records disagree on.

Revision ID: ledger_0014
Revises: ledger_0013
Create Date: 2026-12-03

``reconciliation_reports`` (ledger_0011) held the log-vs-ledger replay only. The scheduler's ``reconcile_usage``
job now also reads ClickHouse usage and ClickHouse credit flow (meterline/reconcile_job.py):

* ``coverage`` — per record, whether it was compared and up to where (the ledger's marks, the ClickHouse sink's
  watermark per partition, the settle cut-off of postings), and the partitions left out because not settled;
* ``mismatches`` — one row per (wallet, meter, period, price version, measure) whose records disagree, with every
  record's value and WHICH records disagree (ledger/reconcile_compare.py).

Rows written before this revision keep ``'{}'`` / ``'[]'``; nothing updates a report.
"""

from alembic import op

revision = "ledger_0014"
down_revision = "ledger_0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        ALTER TABLE reconciliation_reports
            ADD COLUMN coverage   jsonb NOT NULL DEFAULT '{}'::jsonb,
            ADD COLUMN mismatches jsonb NOT NULL DEFAULT '[]'::jsonb
    """)


def downgrade() -> None:
    op.execute("ALTER TABLE reconciliation_reports DROP COLUMN coverage, DROP COLUMN mismatches")
