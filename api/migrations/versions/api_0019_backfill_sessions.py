"""API schema: backfill sessions — usage from another system or after an outage, held, reviewed, then posted once.

Revision ID: api_0019
Revises: api_0018
Create Date: 2026-12-03

``backfill_sessions``: one row per session (project, status open → closed | reverted, who and when, the close's
result). ``backfill_events``: the events ingested into an open session (``POST /api/v1/events?backfill_session_id=``),
held here and NOT produced to usage.events.v1, so the live pipeline never meters them. One row per event identity
(project, source, id) per session: an event sent twice into a session is held once. Rows are never updated or
deleted; a reverted session keeps its events (for the record) and posts nothing. api/ingest/backfills.py.
"""

from alembic import op

revision = "api_0019"
down_revision = "api_0018"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE backfill_sessions (
    id              text PRIMARY KEY,
    project_id      text NOT NULL REFERENCES projects (id),
    status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed', 'reverted')),
    description     text,
    opened_by       text,
    opened_at       timestamptz NOT NULL DEFAULT now(),
    ended_by        text,
    ended_at        timestamptz,
    result          jsonb,
    CONSTRAINT ended_when_not_open CHECK ((status = 'open') = (ended_at IS NULL))
);
CREATE INDEX backfill_sessions_project ON backfill_sessions (project_id, opened_at);

CREATE TABLE backfill_events (
    session_id      text NOT NULL REFERENCES backfill_sessions (id),
    project_id      text NOT NULL,
    event_source    text NOT NULL,
    event_id        text NOT NULL,
    seq             bigserial,
    event_time      timestamptz NOT NULL,
    payload         bytea NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, event_source, event_id)
);
-- "was this identity posted by an earlier (closed) backfill?"
CREATE INDEX backfill_events_identity ON backfill_events (project_id, event_source, event_id);
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute("DROP TABLE backfill_events; DROP TABLE backfill_sessions")
