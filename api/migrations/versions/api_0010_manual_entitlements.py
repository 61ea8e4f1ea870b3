"""API schema: entitlements granted by an admin (``provider = 'manual'``), for local testing and sales-led customers.

Revision ID: api_0010
Revises: api_0008
Create Date: 2026-12-03

A manual entitlement is created by ``POST /api/v1/projects/{p}/wallets/{w}/entitlements`` (admin, audited) and
ended by ``…/entitlements/{id}/end``; its ``external_subscription_id`` is the admin's reference (a contract
number) or a generated one, so the same reference grants once. Payment webhooks never touch it (they look
entitlements up by their own provider). Access checks read every provider alike.
"""

from alembic import op

revision = "api_0010"
down_revision = "api_0008"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE entitlements DROP CONSTRAINT entitlements_provider_check;
ALTER TABLE entitlements ADD CONSTRAINT entitlements_provider_check
    CHECK (provider IN ('stripe', 'revenuecat', 'lemonsqueezy', 'manual'));
"""

DOWNGRADE = """
DELETE FROM entitlements WHERE provider = 'manual';
ALTER TABLE entitlements DROP CONSTRAINT entitlements_provider_check;
ALTER TABLE entitlements ADD CONSTRAINT entitlements_provider_check
    CHECK (provider IN ('stripe', 'revenuecat', 'lemonsqueezy'));
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
