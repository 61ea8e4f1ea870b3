"""Billing rules (fixed fees on a schedule) and the log of every run.

Revision ID: ledger_0003
Revises: ledger_0002
Create Date: 2026-12-01

- a rule charges ``amount_minor`` to its wallet at every due time of its schedule (a 5-field cron expression in
  UTC, from a preset or given as is); ``next_run_at`` is the next due time not yet run;
- one billing_runs row per (rule, due time), UNIQUE: a due time is run at most once, whatever the runners do
  (the ledger's idempotency key ``billing:{rule}:{due}`` guards the money itself).
"""

from alembic import op

revision = "ledger_0003"
down_revision = "ledger_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE TABLE billing_rules (
    id                 text PRIMARY KEY,
    project_id         text NOT NULL,
    wallet_id          text NOT NULL REFERENCES wallets (id),
    name               text NOT NULL,
    schedule           jsonb NOT NULL,
    cron               text NOT NULL,
    amount_minor       bigint NOT NULL CHECK (amount_minor > 0),
    when_insufficient  text NOT NULL CHECK (when_insufficient IN ('debt', 'skip')),
    status             text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused', 'archived')),
    next_run_at        timestamptz NOT NULL,
    last_run_at        timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_rules_due ON billing_rules (next_run_at) WHERE status = 'active';
CREATE INDEX billing_rules_project ON billing_rules (project_id, created_at);

CREATE TABLE billing_runs (
    id              bigserial PRIMARY KEY,
    rule_id         text NOT NULL REFERENCES billing_rules (id),
    project_id      text NOT NULL,
    wallet_id       text NOT NULL,
    due_at          timestamptz NOT NULL,
    status          text NOT NULL CHECK (status IN ('charged', 'debt', 'skipped')),
    amount_minor    bigint NOT NULL,
    transaction_id  bigint REFERENCES transactions (id),
    detail          text,
    ran_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (rule_id, due_at)
);
CREATE INDEX billing_runs_project ON billing_runs (project_id, id DESC);
""")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS billing_runs, billing_rules")
