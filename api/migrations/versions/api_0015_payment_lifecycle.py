"""API schema: payment lifecycle — every payment of an invoice linked, $0 invoices recorded, held webhooks.

Revision ID: api_0015
Revises: api_0012
Create Date: 2026-12-03

- ``payment_refs``: every handle refunds and disputes of a payment's money arrive with (Stripe: each payment
  intent / charge that paid a part of an invoice), with the provider's CUMULATIVE refunded / disputed figures per
  handle. A payment's ``refunded_minor`` / ``disputed_minor`` are the sums over its handles, so refunds of two
  payments of one invoice add up instead of overwriting each other. Backfilled from the payments that already
  had refunds or disputes (under ``coalesce(payment_ref, external_id)``, the handle reverse_payment uses).
- ``payments.credits_minor`` may be 0 and ``grant_transaction_id`` NULL: a $0 invoice (a trial) is recorded as a
  payment that granted nothing, so its links and refunds resolve ("nothing to claw back") instead of waiting.
- ``webhook_events.status`` gains ``held`` (a purchase for a wallet closed by an account erasure request: kept,
  answered 200, replayable after the erasure is cancelled) and ``dismissed`` (an admin closed a held event, e.g.
  after refunding it in the provider's dashboard). Both settle the event (a redelivery is a duplicate).
- Dunning (api/payments/dunning.py): ``entitlements.past_due_since`` (when it entered past_due), the status
  ``expired`` (past_due longer than the grace period; not final, unlike ``ended``), and ``entitlement_events``:
  one row per status change (from, to, why, when), append-only by use.
"""

from alembic import op

revision = "api_0015"
down_revision = "api_0009"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE payment_refs (
    payment_id      text NOT NULL REFERENCES payments (id),
    project_id      text NOT NULL,
    provider        text NOT NULL,
    ref             text NOT NULL,
    refunded_minor  bigint NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0),
    disputed_minor  bigint NOT NULL DEFAULT 0 CHECK (disputed_minor >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (payment_id, ref)
);
CREATE INDEX payment_refs_ref ON payment_refs (project_id, provider, ref);
INSERT INTO payment_refs (payment_id, project_id, provider, ref, refunded_minor, disputed_minor)
SELECT id, project_id, provider, coalesce(payment_ref, external_id), refunded_minor, disputed_minor
FROM payments WHERE refunded_minor > 0 OR disputed_minor > 0 OR payment_ref IS NOT NULL;

ALTER TABLE payments DROP CONSTRAINT payments_credits_minor_check;
ALTER TABLE payments ADD CONSTRAINT payments_credits_minor_check CHECK (credits_minor >= 0);
ALTER TABLE payments ALTER COLUMN grant_transaction_id DROP NOT NULL;
ALTER TABLE payments ADD CONSTRAINT payments_grant_when_credits
    CHECK (grant_transaction_id IS NOT NULL OR credits_minor = 0);

ALTER TABLE webhook_events DROP CONSTRAINT webhook_events_status_check;
ALTER TABLE webhook_events ADD CONSTRAINT webhook_events_status_check
    CHECK (status IN ('processed', 'deferred', 'ignored', 'unmatched', 'duplicate', 'rejected', 'failed',
                      'held', 'dismissed'));
DROP INDEX webhook_events_once;
CREATE UNIQUE INDEX webhook_events_once ON webhook_events (project_id, provider, event_id)
    WHERE status IN ('processed', 'deferred', 'ignored', 'unmatched', 'held', 'dismissed');

ALTER TABLE entitlements ADD COLUMN past_due_since timestamptz;
UPDATE entitlements SET past_due_since = state_at WHERE status = 'past_due';
ALTER TABLE entitlements DROP CONSTRAINT entitlements_status_check;
ALTER TABLE entitlements ADD CONSTRAINT entitlements_status_check
    CHECK (status IN ('trialing', 'active', 'past_due', 'paused', 'cancelled', 'ended', 'expired'));
CREATE INDEX entitlements_past_due ON entitlements (past_due_since) WHERE status = 'past_due';
CREATE TABLE entitlement_events (
    id              bigserial PRIMARY KEY,
    project_id      text NOT NULL,
    entitlement_id  text NOT NULL REFERENCES entitlements (id),
    from_status     text,
    to_status       text NOT NULL,
    reason          text NOT NULL,
    at              timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX entitlement_events_project ON entitlement_events (project_id, id);
"""

DOWNGRADE = """
DROP TABLE entitlement_events;
DROP INDEX entitlements_past_due;
UPDATE entitlements SET status = 'ended' WHERE status = 'expired';
ALTER TABLE entitlements DROP CONSTRAINT entitlements_status_check;
ALTER TABLE entitlements ADD CONSTRAINT entitlements_status_check
    CHECK (status IN ('trialing', 'active', 'past_due', 'paused', 'cancelled', 'ended'));
ALTER TABLE entitlements DROP COLUMN past_due_since;
DROP INDEX webhook_events_once;
CREATE UNIQUE INDEX webhook_events_once ON webhook_events (project_id, provider, event_id)
    WHERE status IN ('processed', 'deferred', 'ignored', 'unmatched');
ALTER TABLE webhook_events DROP CONSTRAINT webhook_events_status_check;
ALTER TABLE webhook_events ADD CONSTRAINT webhook_events_status_check
    CHECK (status IN ('processed', 'deferred', 'ignored', 'unmatched', 'duplicate', 'rejected', 'failed'));
ALTER TABLE payments DROP CONSTRAINT payments_grant_when_credits;
ALTER TABLE payments ALTER COLUMN grant_transaction_id SET NOT NULL;
ALTER TABLE payments DROP CONSTRAINT payments_credits_minor_check;
ALTER TABLE payments ADD CONSTRAINT payments_credits_minor_check CHECK (credits_minor > 0);
DROP TABLE payment_refs;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
