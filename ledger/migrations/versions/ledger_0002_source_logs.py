"""Lives of the Kafka logs the ledger keeps offset marks for.

Revision ID: ledger_0002
Revises: ledger_0001
Create Date: 2026-12-01

One row per topic: ``epoch`` counts how many times the topic was created anew while this database already
held marks for it (see ledger/source_logs.py). The identity marks are kept under is ``topic`` for epoch 0
and ``topic@epoch`` after that.
"""

from alembic import op

revision = "ledger_0002"
down_revision = "ledger_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE TABLE source_logs (
    topic       text PRIMARY KEY,
    epoch       integer NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
""")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS source_logs")
