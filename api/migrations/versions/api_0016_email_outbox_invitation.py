"""API schema: ``email_outbox.invitation_id`` — which invitation an email announces.

Revision ID: api_0016
Revises: api_0015
Create Date: 2026-12-03

The relay (api/tenancy/email_outbox.py) uses it to not send an invitation's email once the invitation is no longer
pending (revoked, accepted, expired) or a newer email of it exists (resent: the older link no longer works); such
rows are marked failed with the reason instead. Rows queued before this revision have no invitation id; the
relay's age cutoff (``API_EMAIL_MAX_AGE_S``) covers them.
"""

from alembic import op

revision = "api_0016"
down_revision = "api_0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        ALTER TABLE email_outbox ADD COLUMN invitation_id text;
        CREATE INDEX email_outbox_invitation ON email_outbox (invitation_id, id) WHERE invitation_id IS NOT NULL;
        CREATE INDEX email_outbox_sent ON email_outbox (sent_at) WHERE sent_at IS NOT NULL;
    """)


def downgrade() -> None:
    op.execute("""
        DROP INDEX email_outbox_sent;
        DROP INDEX email_outbox_invitation;
        ALTER TABLE email_outbox DROP COLUMN invitation_id;
    """)
