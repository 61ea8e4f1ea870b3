"""The database enforces what it can: an application role that cannot rewrite history, and the invariant
check's results.

Revision ID: ledger_0008
Revises: ledger_0007
Create Date: 2026-12-03

Two roles (DESIGN §2 invariant 3, issue 13 item 9):
- the OWNER — whoever runs the migrations (``DATABASE_OWNER_URL``, else ``DATABASE_URL``) — owns every table,
  trigger and function;
- ``meterline_app`` — what api, streams, ledger and scheduler connect as (``DATABASE_URL``; ``meterline up``
  does it by itself on the embedded PostgreSQL). It may SELECT/INSERT/UPDATE/DELETE the working tables, but on
  the append-only ones (here ``transactions`` and ``transaction_allocations``; api_0009 adds the API's) only
  INSERT and SELECT. Not being their owner, it cannot ALTER them, so it cannot disable the triggers either;
  without UPDATE, DELETE and TRUNCATE privileges even a missing trigger would not let it rewrite a row.
  It cannot write the alembic version tables.

The role is created here when the migrating user may create roles (the embedded superuser can); otherwise an
operator creates it first (``CREATE ROLE meterline_app LOGIN PASSWORD '…'``) — the grants below then apply.
Default privileges give it the same rights on the tables later migrations create (as the same owner).

``invariant_checks``: one row per run of the scheduler's ``check_invariants`` job (ledger/invariant_check.py).
"""

from alembic import op

revision = "ledger_0008"
down_revision = "ledger_0007"
branch_labels = None
depends_on = None

APP_ROLE = "meterline_app"

UPGRADE = f"""
CREATE TABLE invariant_checks (
    id               bigserial PRIMARY KEY,
    checked_at       timestamptz NOT NULL DEFAULT now(),
    duration_ms      integer NOT NULL,
    wallets          bigint NOT NULL,
    transactions     bigint NOT NULL,    -- the highest transaction id checked
    violation_count  bigint NOT NULL CHECK (violation_count >= 0),
    violations       jsonb NOT NULL      -- check name -> {{count, sample}}
);
CREATE INDEX invariant_checks_latest ON invariant_checks (checked_at DESC);

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
        IF EXISTS (SELECT FROM pg_roles WHERE rolname = current_user AND (rolsuper OR rolcreaterole)) THEN
            CREATE ROLE {APP_ROLE} LOGIN;
        ELSE
            RAISE NOTICE 'role {APP_ROLE} does not exist and % may not create it: create it, then migrate again',
                current_user;
        END IF;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
        EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO {APP_ROLE}', current_database());
        GRANT USAGE ON SCHEMA public TO {APP_ROLE};
        GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {APP_ROLE};
        GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {APP_ROLE};
        ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {APP_ROLE};
        ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {APP_ROLE};
        REVOKE UPDATE, DELETE, TRUNCATE ON transactions, transaction_allocations FROM {APP_ROLE};
        REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON alembic_version_ledger FROM {APP_ROLE};
    END IF;
END $$;
"""

DOWNGRADE = f"""
DROP TABLE IF EXISTS invariant_checks;
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
        ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON TABLES FROM {APP_ROLE};
        ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON SEQUENCES FROM {APP_ROLE};
        REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {APP_ROLE};
        REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {APP_ROLE};
    END IF;
END $$;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
