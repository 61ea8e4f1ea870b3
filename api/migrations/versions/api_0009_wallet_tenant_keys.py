"""API schema: every reference from a project's object to a wallet carries the project (DESIGN §2 invariant 7).

Revision ID: api_0009
Revises: api_0012
Create Date: 2026-12-03

Composite foreign keys ``(project_id, wallet_id) → wallets (project_id, id)`` (the UNIQUE of ledger_0007) on the
API tables whose wallet always exists when the row is written: checkout sessions, entitlements, payments,
signup bonus grants, wallet erasures. A row can then never say "project B" and name project A's wallet, whatever
the code above it does.

Not here, on purpose (the check lives in the code that writes them, and is tested there):
- ``access_decisions``: a decision is recorded for a subject that has no wallet yet (a denial), so the wallet may
  not exist; it is append-only and moves no money (a charged decision's debit is a ledger transaction, which
  carries the composite key).
- ``subject_keys`` (streams): a subject may be mapped to its auto-provisioned wallet id before the ledger creates
  the wallet on the first checkpoint. The ledger refuses a counter whose wallet is in another project
  (ledger/checkpoints.py step 2) and the catalog refuses such a mapping (streams/catalog.py).

The application role (ledger_0008: ``meterline_app``) may only INSERT and SELECT on the API's append-only tables
(``audit_log``, ``access_decisions``) and on the immutable ``price_versions`` of streams (this is the last
migration to run, so every table exists), and cannot write any alembic version table.
"""

from alembic import op

revision = "api_0009"
down_revision = "api_0014"
branch_labels = None
depends_on = None

TABLES = ("checkout_sessions", "entitlements", "payments", "signup_bonus_grants", "wallet_erasures")

APP_ROLE_LIMITS = """
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'meterline_app') THEN
        REVOKE UPDATE, DELETE, TRUNCATE ON audit_log, access_decisions, price_versions FROM meterline_app;
        REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON alembic_version_streams, alembic_version_api FROM meterline_app;
    END IF;
END $$;
"""


def upgrade() -> None:
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {table}_project_wallet_fkey "
                   "FOREIGN KEY (project_id, wallet_id) REFERENCES wallets (project_id, id)")
    op.execute(APP_ROLE_LIMITS)


def downgrade() -> None:
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {table}_project_wallet_fkey")
