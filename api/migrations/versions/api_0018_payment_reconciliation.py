"""API schema: reconciling receipts with the payment providers' APIs (api/payments/reconciliation.py).

Revision ID: api_0018
Revises: api_0017
Create Date: 2026-12-05

- ``payment_provider_configs.store_id``: the Lemon Squeezy store whose orders, subscriptions and subscription
  invoices the job lists (``filter[store_id]``). The provider's API key goes into the existing ``api_key``
  column (RevenueCat: a secret ``sk_…`` key; Lemon Squeezy: an API key), now accepted for every provider.
- ``webhook_events.origin``: ``webhook`` (a delivery) or ``reconciliation`` (an event the job rebuilt from the
  provider's API and applied through the same handlers; its ``event_id`` starts with ``reconcile:``).
- ``payment_reconciliations``: one report per (project, provider) run — what was checked, what was fixed
  (the applied events and their ledger transactions), the provider errors.
"""

from alembic import op

revision = "api_0018"
down_revision = "api_0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        ALTER TABLE payment_provider_configs ADD COLUMN store_id text CHECK (length(store_id) BETWEEN 1 AND 64);
        ALTER TABLE webhook_events ADD COLUMN origin text NOT NULL DEFAULT 'webhook'
            CHECK (origin IN ('webhook', 'reconciliation'));
        CREATE TABLE payment_reconciliations (
            id            bigserial PRIMARY KEY,
            project_id    text NOT NULL REFERENCES projects (id),
            provider      text NOT NULL CHECK (provider IN ('revenuecat', 'lemonsqueezy')),
            trigger       text NOT NULL CHECK (trigger IN ('scheduler', 'cli', 'api')),
            status        text NOT NULL CHECK (status IN ('clean', 'fixed', 'errors', 'not_configured')),
            checked       integer NOT NULL DEFAULT 0 CHECK (checked >= 0),
            fixed         integer NOT NULL DEFAULT 0 CHECK (fixed >= 0),
            fixes         jsonb NOT NULL DEFAULT '[]',
            errors        jsonb NOT NULL DEFAULT '[]',
            notes         jsonb NOT NULL DEFAULT '[]',
            started_at    timestamptz NOT NULL,
            finished_at   timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX payment_reconciliations_project ON payment_reconciliations (project_id, id);
    """)


def downgrade() -> None:
    op.execute("""
        DROP TABLE payment_reconciliations;
        ALTER TABLE webhook_events DROP COLUMN origin;
        ALTER TABLE payment_provider_configs DROP COLUMN store_id;
    """)
