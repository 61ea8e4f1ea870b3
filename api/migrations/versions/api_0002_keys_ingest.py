"""API schema: per-project API keys and the recent-ingestion log behind GET /api/v1/events.

Revision ID: api_0002
Revises: api_0001
Create Date: 2026-01-02

Invariants the database enforces:
- a key belongs to exactly one project; its 8-character prefix is unique (lookup by prefix, then a
  constant-time comparison of sha256(token) with secret_hash); the secret itself is never stored;
- scopes are a non-empty subset of {ingest, read, admin};
- a revoked key stays revoked (revoked_at never goes back to NULL) so "revoke" cannot be undone by a
  racing rotate; rotation links the successor to its predecessor (rotated_from).

ingested_events is a bounded debugging log (the OpenMeter "list ingested events" view), NOT the source of
truth: Kafka is. Rows are written after the broker acknowledged the events (or with validation_error for
rejected ones); a background pruner deletes rows past the retention window and beyond a row cap. It has no
foreign key so the append path stays cheap.
"""

from alembic import op

revision = "api_0002"
down_revision = "api_0001"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE api_keys (
    id                  text PRIMARY KEY,
    project_id          text NOT NULL REFERENCES projects (id),
    name                text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    prefix              text NOT NULL UNIQUE CHECK (prefix ~ '^[a-z0-9]{8}$'),
    secret_hash         text NOT NULL CHECK (length(secret_hash) = 64),
    scopes              text[] NOT NULL
                        CHECK (cardinality(scopes) > 0 AND scopes <@ ARRAY['ingest', 'read', 'admin']::text[]),
    created_at          timestamptz NOT NULL DEFAULT now(),
    created_by_user_id  text REFERENCES users (id),
    expires_at          timestamptz,
    revoked_at          timestamptz,
    last_used_at        timestamptz,
    rotated_from        text REFERENCES api_keys (id)
);
CREATE INDEX api_keys_project ON api_keys (project_id, created_at);

CREATE FUNCTION api_keys_revocation_is_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.revoked_at IS NOT NULL AND (NEW.revoked_at IS NULL OR NEW.revoked_at > OLD.revoked_at) THEN
        RAISE EXCEPTION 'api: key % is revoked; revocation is final', OLD.id USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER api_keys_revocation_final BEFORE UPDATE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_keys_revocation_is_final();

CREATE TABLE ingested_events (
    id                  bigserial PRIMARY KEY,
    project_id          text NOT NULL,
    event_id            text NOT NULL,
    source              text NOT NULL,
    subject             text NOT NULL,
    type                text NOT NULL,
    event_time          timestamptz,
    ingested_at         timestamptz NOT NULL,
    stored_at           timestamptz NOT NULL DEFAULT now(),
    event               json NOT NULL,
    validation_error    text
);
CREATE INDEX ingested_events_recent ON ingested_events (project_id, ingested_at DESC, id DESC);
CREATE INDEX ingested_events_ingested_at ON ingested_events (ingested_at);
"""

DOWNGRADE = """
DROP TABLE ingested_events;
DROP TABLE api_keys;
DROP FUNCTION api_keys_revocation_is_final();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
