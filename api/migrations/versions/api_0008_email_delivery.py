"""API schema: delivery bookkeeping on ``email_outbox`` for the SMTP relay (the scheduler's ``deliver_emails`` job).

Revision ID: api_0008
Revises: api_0007
Create Date: 2026-12-08

A row is queued by ``OutboxEmailSender`` in the transaction of what it announces (an invitation) and is then in
one of three states: due (``sent_at`` and ``failed_at`` NULL; tried once ``next_attempt_at`` has come), ``sent``
(the SMTP server accepted it) or ``failed`` (the server refused it for good — a 5xx — or ``API_EMAIL_MAX_ATTEMPTS``
transient failures; ``last_error`` keeps the server's reply). ``attempts`` counts tries; ``next_attempt_at`` is the
backoff. Existing unsent rows become due at once (the default), so turning SMTP on sends what the outbox holds.

Invariants: never both sent and failed (CHECK); due rows are found by a partial index ordered like the job claims
them (``next_attempt_at, id``), which replaces ``email_outbox_unsent``.
"""

from alembic import op

revision = "api_0008"
down_revision = "api_0007"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE email_outbox
    ADD COLUMN attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    ADD COLUMN next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN last_error       text,
    ADD COLUMN failed_at        timestamptz,
    ADD CONSTRAINT email_outbox_sent_or_failed CHECK (sent_at IS NULL OR failed_at IS NULL);
DROP INDEX email_outbox_unsent;
CREATE INDEX email_outbox_due ON email_outbox (next_attempt_at, id) WHERE sent_at IS NULL AND failed_at IS NULL;
"""

DOWNGRADE = """
DROP INDEX email_outbox_due;
ALTER TABLE email_outbox DROP CONSTRAINT email_outbox_sent_or_failed,
    DROP COLUMN attempts, DROP COLUMN next_attempt_at, DROP COLUMN last_error, DROP COLUMN failed_at;
CREATE INDEX email_outbox_unsent ON email_outbox (id) WHERE sent_at IS NULL;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
