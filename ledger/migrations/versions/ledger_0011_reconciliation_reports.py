"""Continuous reconciliation: ``reconciliation_reports``, one row per scheduled replay of the usage log.

Revision ID: ledger_0011
Revises: ledger_0010
Create Date: 2026-12-03

Written by the scheduler's ``reconcile_usage`` job (meterline/reconcile_job.py) when a read-only replay of the
current topic life finishes: the marks it replayed to, how much it read, and every key that differs between the
log and the ledger (project, wallet, meter, period, price version, units on each side, the amount a repair would
post). ``GET /api/v1/projects/{id}/reconciliation`` serves the latest report's rows of one project. Reports are
facts about a moment; nothing updates them.
"""

from alembic import op

revision = "ledger_0011"
down_revision = "ledger_0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE reconciliation_reports (
            id              bigserial PRIMARY KEY,
            source_topic    text NOT NULL,
            replay_id       text NOT NULL,
            marks           jsonb NOT NULL,
            started_at      timestamptz NOT NULL,
            finished_at     timestamptz NOT NULL DEFAULT now(),
            messages        bigint NOT NULL,
            incomplete      integer[] NOT NULL DEFAULT '{}',
            differences     jsonb NOT NULL,
            drift_minor     bigint NOT NULL
        );
        CREATE INDEX reconciliation_reports_latest ON reconciliation_reports (finished_at DESC);
    """)


def downgrade() -> None:
    op.execute("DROP TABLE reconciliation_reports")
