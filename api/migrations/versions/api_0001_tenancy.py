"""API schema: people and tenancy (users, refresh tokens, projects, members, invitations), the development
email outbox, the append-only audit log, idempotency records for money operations, per-project feature costs.

Revision ID: api_0001
Revises:
Create Date: 2026-01-01

Invariants the database enforces:
- a project has exactly the members listed in project_members; roles are owner/admin/member/viewer;
  projects.owner_user_id is always a member with role 'owner' (kept by the service; transfer swaps both in
  one transaction);
- the audit log is append-only: a trigger refuses UPDATE, DELETE and TRUNCATE;
- one idempotency record per (project, key): the stored response is replayed, a different request conflicts;
- emails and invitation tokens are stored lower-cased / hashed (an invitation token is never stored in clear).
"""

from alembic import op

revision = "api_0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE users (
    id              text PRIMARY KEY,
    email           text NOT NULL,
    display_name    text,
    password_hash   text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    disabled_at     timestamptz,
    CONSTRAINT users_email_lower CHECK (email = lower(email))
);
CREATE UNIQUE INDEX users_email ON users (email);

-- refresh tokens rotate: each use revokes the token and issues a successor in the same family;
-- reuse of a revoked token revokes the whole family (stolen-token detection)
CREATE TABLE refresh_tokens (
    id              text PRIMARY KEY,
    user_id         text NOT NULL REFERENCES users (id),
    family_id       text NOT NULL,
    token_hash      text NOT NULL UNIQUE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    revoked_at      timestamptz,
    replaced_by     text
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id);

CREATE TABLE projects (
    id              text PRIMARY KEY,
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    external_key    text UNIQUE,
    owner_user_id   text NOT NULL REFERENCES users (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE project_members (
    project_id      text NOT NULL REFERENCES projects (id),
    user_id         text NOT NULL REFERENCES users (id),
    role            text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'viewer')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, user_id)
);
CREATE INDEX project_members_user ON project_members (user_id);

CREATE TABLE invitations (
    id              text PRIMARY KEY,
    project_id      text NOT NULL REFERENCES projects (id),
    email           text NOT NULL CHECK (email = lower(email)),
    role            text NOT NULL CHECK (role IN ('admin', 'member', 'viewer')),
    token_hash      text NOT NULL UNIQUE,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'accepted', 'revoked', 'expired')),
    invited_by      text REFERENCES users (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    last_sent_at    timestamptz NOT NULL DEFAULT now(),
    send_count      integer NOT NULL DEFAULT 1,
    accepted_at     timestamptz,
    accepted_by     text REFERENCES users (id),
    revoked_at      timestamptz
);
-- at most one open invitation per (project, email): a second invite is a resend, not a duplicate
CREATE UNIQUE INDEX invitations_open ON invitations (project_id, email) WHERE status = 'pending';
CREATE INDEX invitations_project ON invitations (project_id, created_at);

CREATE TABLE email_outbox (
    id              bigserial PRIMARY KEY,
    to_address      text NOT NULL,
    subject         text NOT NULL,
    body_text       text NOT NULL,
    kind            text NOT NULL,
    project_id      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz
);
CREATE INDEX email_outbox_unsent ON email_outbox (id) WHERE sent_at IS NULL;

CREATE TABLE audit_log (
    id              bigserial PRIMARY KEY,
    project_id      text,
    actor_kind      text NOT NULL CHECK (actor_kind IN ('user', 'api_key', 'system')),
    actor_user_id   text,
    actor_key_id    text,
    action          text NOT NULL,
    target_kind     text NOT NULL,
    target_id       text,
    before          jsonb,
    after           jsonb,
    request_id      text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_project ON audit_log (project_id, id);
CREATE INDEX audit_log_project_action ON audit_log (project_id, action, id);

CREATE FUNCTION api_audit_refuse_mutation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'api: % on % is refused: the audit log is append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION api_audit_refuse_mutation();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION api_audit_refuse_mutation();

-- written in the SAME transaction as the money operation it records, so a replay sees either both or neither
CREATE TABLE idempotency_records (
    project_id          text NOT NULL,
    idempotency_key     text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    request_fingerprint text NOT NULL,       -- sha256 of method, route and canonical body
    status_code         integer NOT NULL,
    response_body       jsonb NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, idempotency_key)
);
CREATE INDEX idempotency_records_created ON idempotency_records (created_at);

-- what a named feature costs (the seed's ProviderFeatureCost); admins edit it without a deploy
CREATE TABLE feature_costs (
    project_id      text NOT NULL REFERENCES projects (id),
    feature_key     text NOT NULL CHECK (feature_key ~ '^[a-z0-9][a-z0-9_.:-]{0,99}$'),
    cost_minor      bigint NOT NULL CHECK (cost_minor >= 0),
    description     text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, feature_key)
);
"""

DOWNGRADE = """
DROP TABLE IF EXISTS feature_costs, idempotency_records, audit_log, email_outbox, invitations,
    project_members, projects, refresh_tokens, users CASCADE;
DROP FUNCTION IF EXISTS api_audit_refuse_mutation();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
