"""API schema: unverified webhook deliveries keep a digest, not a body; bookkeeping for their purge.

Revision ID: api_0013
Revises: api_0012
Create Date: 2026-12-03

Anyone can POST to a webhook endpoint. A delivery that fails verification (``rejected``) or repeats one already
settled (``duplicate``) is kept only as evidence: its sha256 (``body_sha256``), its size (``body_bytes``, new)
and a short prefix in ``body`` (api/payments/webhooks.py, ``UNVERIFIED_PREFIX_BYTES``) — so anonymous callers
cannot fill the database. The scheduler's ``purge_webhook_deliveries`` job deletes those rows after
``API_WEBHOOK_UNVERIFIED_RETENTION_S``; the partial index finds them oldest first. Existing rows keep their
bodies (``body_bytes`` NULL = the whole body is stored).
"""

from alembic import op

revision = "api_0013"
down_revision = "api_0012"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE webhook_events ADD COLUMN body_bytes integer CHECK (body_bytes >= 0);
CREATE INDEX webhook_events_unverified_age ON webhook_events (received_at) WHERE status IN ('rejected', 'duplicate');
"""

DOWNGRADE = """
DROP INDEX webhook_events_unverified_age;
ALTER TABLE webhook_events DROP COLUMN body_bytes;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
