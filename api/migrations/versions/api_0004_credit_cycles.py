"""API schema: subscription credits that end with their billing cycle, and sandbox purchases kept apart.

Revision ID: api_0004
Revises: api_0003
Create Date: 2026-12-01

- ``payment_offers.credits_expire``: ``period_end`` (a plan's credits for a period expire when the period ends,
  plus ``credits_grace_s``) or ``never`` (they roll over). Existing offers keep rolling over, as they did
  before this revision; new plans default to ``period_end`` in the API. A pack's credits never expire with a
  period: a pack row is always ``never`` with no grace (CHECK).
- ``payments.credits_expire_at``: when the credits a payment granted expire (the paid period's end + grace), or
  NULL when they roll over; the bucket the grant created carries the same ``expires_at`` and the ledger's
  expiry job posts its unspent remainder as ``expiry`` (breakage).
- ``payment_provider_configs.accept_sandbox``: whether sandbox / test-mode purchases grant credits. Off: such
  events are stored and answered ``ignored`` with the reason, so nothing is lost and nothing is granted.
"""

from alembic import op

revision = "api_0004"
down_revision = "api_0003"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE payment_offers
    ADD COLUMN credits_expire  text NOT NULL DEFAULT 'never' CHECK (credits_expire IN ('period_end', 'never')),
    ADD COLUMN credits_grace_s integer NOT NULL DEFAULT 0 CHECK (credits_grace_s BETWEEN 0 AND 31536000),
    ADD CONSTRAINT payment_offers_pack_credits_never_expire
        CHECK (kind = 'plan' OR (credits_expire = 'never' AND credits_grace_s = 0));
ALTER TABLE payments
    ADD COLUMN credits_expire_at timestamptz;
ALTER TABLE payment_provider_configs
    ADD COLUMN accept_sandbox boolean NOT NULL DEFAULT false;
"""

DOWNGRADE = """
ALTER TABLE payment_provider_configs DROP COLUMN accept_sandbox;
ALTER TABLE payments DROP COLUMN credits_expire_at;
ALTER TABLE payment_offers DROP CONSTRAINT payment_offers_pack_credits_never_expire,
    DROP COLUMN credits_grace_s, DROP COLUMN credits_expire;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
