"""Meters carry a counting version: the meter version whose definition of units is in force.

Revision ID: streams_0002
Revises: streams_0001
Create Date: 2026-12-03

Issue 13 item 3 / DESIGN §2 invariant 9: changing how a meter counts (event type, aggregation, value property,
filters) must not re-price charged history. ``counting_version`` is the version at which the current
definition of units started: a cosmetic edit (name, description, group_by) copies it, a counting edit sets it
to the new version. Counters of a later counting version are new keys (streams/metering.py folds it into the
key), so the ledger never merges units counted under two definitions.

Existing rows get 1: their counters were keyed without a counting version and keep counting where they are.
"""

from alembic import op

revision = "streams_0002"
down_revision = "streams_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
ALTER TABLE meters ADD COLUMN counting_version integer NOT NULL DEFAULT 1;
ALTER TABLE meters ADD CONSTRAINT meters_counting_version_valid CHECK (counting_version BETWEEN 1 AND version);
""")


def downgrade() -> None:
    op.execute("ALTER TABLE meters DROP COLUMN counting_version")
