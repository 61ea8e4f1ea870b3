"""Ledger schema: ``transaction_allocations.seq`` — the order a transaction's allocations were written in.

Revision ID: ledger_0012
Revises: ledger_0006
Create Date: 2026-12-03

A debit burns buckets in burn order (ledger/postings.py builds its allocations in that order: priority, expiry,
age; debt last) and every writer inserts them in that order from one JSON array, so a sequence default numbers
them as they were burned. GET transactions lists a transaction's allocations by ``seq`` (it used to sort them by
bucket id, which is not the order they were burned). Existing rows are numbered in physical order, which for this
append-only table (no UPDATE/DELETE ever) is the order they were inserted in.
"""

from alembic import op

revision = "ledger_0012"
down_revision = "ledger_0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE transaction_allocations ADD COLUMN seq bigserial NOT NULL")


def downgrade() -> None:
    op.execute("ALTER TABLE transaction_allocations DROP COLUMN seq")
