"""API schema: the sign-up bonus — a project's bonus config and one decision row per end-user wallet.

Revision ID: api_0006
Revises: api_0005
Create Date: 2026-12-01

Invariants the database enforces (api/wallets/signup_bonus.py documents the rest):
- one config per project; amounts are integers in minor units, >= 0; country keys are ISO 3166-1 alpha-2
  (checked by the API, which owns the error message);
- one decision per (project, wallet) — granted or refused — so a retried wallet creation answers the recorded
  decision and never grants twice (the ledger key ``signup_bonus:{project}:{wallet}`` is the second guard);
- at most one GRANTED bonus per (project, device hash): partial unique index. Only a keyed hash of the device id
  is stored, never the id; ``ip_network`` is the /24 (IPv4) or /64 (IPv6) network, never the address.
"""

from alembic import op

revision = "api_0006"
down_revision = "api_0005"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE signup_bonus_configs (
    project_id             text PRIMARY KEY REFERENCES projects (id),
    enabled                boolean NOT NULL DEFAULT true,
    default_amount_minor   bigint NOT NULL DEFAULT 0 CHECK (default_amount_minor BETWEEN 0 AND 1000000000000000),
    country_amounts        jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(country_amounts) = 'object'),
    expires_after_s        integer CHECK (expires_after_s > 0),
    ip_network_daily_limit integer CHECK (ip_network_daily_limit >= 0),
    require_device_id      boolean NOT NULL DEFAULT false,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE signup_bonus_grants (
    project_id      text NOT NULL REFERENCES projects (id),
    wallet_id       text NOT NULL,
    granted_minor   bigint NOT NULL CHECK (granted_minor >= 0),
    reason          text NOT NULL CHECK (reason IN ('granted', 'not_configured', 'disabled', 'country_zero',
                                                    'no_amount', 'device_seen', 'device_id_required',
                                                    'ip_network_limit')),
    country         text CHECK (country ~ '^[A-Z]{2}$'),
    country_source  text NOT NULL CHECK (country_source IN ('explicit', 'geoip', 'none')),
    device_hash     text,
    ip_network      text,
    expires_at      timestamptz,
    transaction_id  bigint,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, wallet_id),
    CHECK ((reason = 'granted') = (granted_minor > 0)),
    CHECK ((granted_minor > 0) = (transaction_id IS NOT NULL))
);
CREATE UNIQUE INDEX signup_bonus_grants_one_per_device ON signup_bonus_grants (project_id, device_hash)
    WHERE granted_minor > 0 AND device_hash IS NOT NULL;
CREATE INDEX signup_bonus_grants_network ON signup_bonus_grants (project_id, ip_network, created_at)
    WHERE granted_minor > 0 AND ip_network IS NOT NULL;
"""

DOWNGRADE = """
DROP TABLE signup_bonus_grants;
DROP TABLE signup_bonus_configs;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
