"""API schema: ``session_revocations``, what every API process checks access tokens against.

Revision ID: api_0014
Revises: api_0013
Create Date: 2026-12-03

An access token (a JWT, api/tenancy/auth.py) carries its login's session id (``sid`` = the refresh-token family).
A row here says "tokens of this session (``session_id``) or of this user (``user_id``) stop working now":
written by logout and by refresh-token reuse (api/tenancy/auth.py ``revoke_family``) and — by the trigger below —
whenever a user is disabled (``users.disabled_at`` set, by whatever means). Each API process keeps the recent rows
in memory (api/tenancy/sessions.py) and reads new ones every ``API_SESSION_SYNC_S``, so the check costs no round
trip. Rows older than the longest access-token lifetime are useless (every token they could stop has expired)
and are purged by the scheduler.
"""

from alembic import op

revision = "api_0014"
down_revision = "api_0013"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE session_revocations (
    id          bigserial PRIMARY KEY,
    session_id  text,
    user_id     text,
    revoked_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK (session_id IS NOT NULL OR user_id IS NOT NULL)
);
CREATE INDEX session_revocations_at ON session_revocations (revoked_at);

CREATE FUNCTION users_disabled_revokes_sessions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO session_revocations (user_id) VALUES (NEW.id);
    RETURN NEW;
END $$;
CREATE TRIGGER users_disabled_revokes_sessions AFTER UPDATE OF disabled_at ON users
    FOR EACH ROW WHEN (NEW.disabled_at IS NOT NULL AND OLD.disabled_at IS DISTINCT FROM NEW.disabled_at)
    EXECUTE FUNCTION users_disabled_revokes_sessions();
"""

DOWNGRADE = """
DROP TRIGGER users_disabled_revokes_sessions ON users;
DROP FUNCTION users_disabled_revokes_sessions();
DROP TABLE session_revocations;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
