"""API schema: the access layer — features gated by an entitlement, and the append-only decision record.

Revision ID: api_0005
Revises: api_0004
Create Date: 2026-12-01

- ``feature_costs.requires_entitlement``: NULL = anyone with the credits may use the feature; ``*`` = only a
  wallet with an active plan (any); otherwise the slug of the plan offer the wallet must have active.
- ``access_decisions``: one row per access check (allowed or denied, with reason, policy and cost). Written in
  the check's transaction — for a charged check together with the debit — so a charged decision is never
  missing its record and a record never claims a charge that rolled back. Append-only (UPDATE, DELETE and
  TRUNCATE are refused). Relayed to ``access.decisions.v1`` through the ledger's outbox.
"""

from alembic import op

revision = "api_0005"
down_revision = "api_0004"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE feature_costs
    ADD COLUMN requires_entitlement text
        CHECK (requires_entitlement IS NULL OR requires_entitlement = '*'
               OR requires_entitlement ~ '^[a-z0-9][a-z0-9_.-]{0,63}$');

CREATE TABLE access_decisions (
    id                  text PRIMARY KEY,
    project_id          text NOT NULL REFERENCES projects (id),
    wallet_id           text NOT NULL,      -- no FK: a subject without a wallet yet is a decision too
    subject             text NOT NULL,
    feature_key         text NOT NULL,
    quantity            bigint NOT NULL CHECK (quantity > 0),
    asset_id            text,
    action              text,
    allowed             boolean NOT NULL,
    reason              text,               -- NULL when allowed
    policy_id           text NOT NULL,
    cost_minor          bigint NOT NULL CHECK (cost_minor >= 0),
    charged             boolean NOT NULL DEFAULT false,
    transaction_id      bigint,             -- the debit of a charged decision (ledger transactions.id)
    balance_after_minor bigint,
    idempotency_key     text,
    actor_kind          text NOT NULL,
    actor_id            text,
    request_id          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (allowed = (reason IS NULL)),
    CHECK (charged = (transaction_id IS NOT NULL)),
    CHECK (NOT charged OR allowed)
);
CREATE INDEX access_decisions_project_time ON access_decisions (project_id, created_at DESC, id DESC);
CREATE INDEX access_decisions_wallet_time ON access_decisions (project_id, wallet_id, created_at DESC, id DESC);
CREATE INDEX access_decisions_transaction ON access_decisions (transaction_id) WHERE transaction_id IS NOT NULL;

CREATE FUNCTION api_access_decisions_refuse_mutation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'api: % on % is refused: access decisions are append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER access_decisions_append_only BEFORE UPDATE OR DELETE ON access_decisions
    FOR EACH ROW EXECUTE FUNCTION api_access_decisions_refuse_mutation();
CREATE TRIGGER access_decisions_no_truncate BEFORE TRUNCATE ON access_decisions
    FOR EACH STATEMENT EXECUTE FUNCTION api_access_decisions_refuse_mutation();
"""

DOWNGRADE = """
DROP TABLE IF EXISTS access_decisions;
DROP FUNCTION IF EXISTS api_access_decisions_refuse_mutation();
ALTER TABLE feature_costs DROP COLUMN IF EXISTS requires_entitlement;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
