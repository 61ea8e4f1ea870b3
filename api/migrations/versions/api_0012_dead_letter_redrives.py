"""API schema: ``dead_letter_redrives`` — every dead-lettered event that was redriven into usage.events.v1.

Revision ID: api_0012
Revises: api_0008
Create Date: 2026-12-03

One row per redriven dead letter: (project, dead-letter id = source partition:offset:index, event source, event
id) — the same letter re-emitted by a crashed worker has the same key; a position reused by a later topic life
holds another event, hence another key. api/ingest/redrive.py inserts the rows of a redrive (``ON CONFLICT DO NOTHING``)
and produces only the events whose row it inserted, in the same transaction, committing after the broker
acknowledged them — so a dead letter is redriven at most once. An event redriven too early (cause not fixed) is
dead-lettered again as a NEW letter, which can be redriven once the cause is fixed; copies of one event are
counted once by the workers' dedupe on (project, source, id). Nothing updates or deletes a row.
"""

from alembic import op

revision = "api_0012"
down_revision = "api_0010"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE dead_letter_redrives (
    project_id      text NOT NULL REFERENCES projects (id),
    event_source    text NOT NULL,
    event_id        text NOT NULL,
    dead_letter_id  text NOT NULL,
    reason          text NOT NULL,
    redrive_id      text NOT NULL,
    redriven_by     text,
    redriven_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, dead_letter_id, event_source, event_id)
);
CREATE INDEX dead_letter_redrives_run ON dead_letter_redrives (project_id, redrive_id);
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute("DROP TABLE dead_letter_redrives")
