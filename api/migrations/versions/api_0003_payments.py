"""API schema: selling credits — the offer catalog (credit packs and plans), per-project payment provider
settings, Stripe checkout sessions, payments, entitlements, and every received webhook.

Revision ID: api_0003
Revises: api_0002
Create Date: 2026-12-01

Invariants the database enforces:
- an offer is a pack (one-off credits) or a plan (credits per interval); prices and credits are integers in
  minor units; an offer never changes after creation except being archived (payments point at it);
- at most one live (not archived) offer per provider product id in a project, so a webhook maps to one offer;
- a payment is recorded once per (project, provider, external id); the credits clawed back for refunds and
  chargebacks never exceed the credits granted;
- one entitlement per (project, provider, external subscription id);
- a webhook event settles at most once: among rows with a settling status (processed, deferred, ignored,
  unmatched) one per (project, provider, event id). Rejected (bad signature), failed (crashed, retried by the
  provider) and duplicate deliveries are extra log rows.
"""

from alembic import op

revision = "api_0003"
down_revision = "api_0002"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE payment_offers (
    id                      text PRIMARY KEY,
    project_id              text NOT NULL REFERENCES projects (id),
    slug                    text NOT NULL CHECK (slug ~ '^[a-z0-9][a-z0-9_.-]{0,63}$'),
    kind                    text NOT NULL CHECK (kind IN ('pack', 'plan')),
    name                    text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    credits_minor           bigint NOT NULL CHECK (credits_minor > 0),
    price_minor             bigint NOT NULL CHECK (price_minor >= 0),
    currency                text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    billing_interval        text CHECK (billing_interval IN ('day', 'week', 'month', 'year')),
    interval_count          integer NOT NULL DEFAULT 1 CHECK (interval_count BETWEEN 1 AND 365),
    stripe_price_id         text,
    revenuecat_product_id   text,
    lemonsqueezy_variant_id text,
    created_at              timestamptz NOT NULL DEFAULT now(),
    archived_at             timestamptz,
    CHECK ((kind = 'plan') = (billing_interval IS NOT NULL)),
    UNIQUE (project_id, slug)
);
CREATE UNIQUE INDEX payment_offers_stripe_price ON payment_offers (project_id, stripe_price_id)
    WHERE stripe_price_id IS NOT NULL AND archived_at IS NULL;
CREATE UNIQUE INDEX payment_offers_revenuecat_product ON payment_offers (project_id, revenuecat_product_id)
    WHERE revenuecat_product_id IS NOT NULL AND archived_at IS NULL;
CREATE UNIQUE INDEX payment_offers_lemonsqueezy_variant ON payment_offers (project_id, lemonsqueezy_variant_id)
    WHERE lemonsqueezy_variant_id IS NOT NULL AND archived_at IS NULL;

-- the secret a provider signs (Stripe, Lemon Squeezy) or sends (RevenueCat) its webhooks with; HMAC needs the
-- secret itself, so it is stored as given and never returned by the API
CREATE TABLE payment_provider_configs (
    project_id      text NOT NULL REFERENCES projects (id),
    provider        text NOT NULL CHECK (provider IN ('stripe', 'revenuecat', 'lemonsqueezy')),
    webhook_secret  text NOT NULL CHECK (length(webhook_secret) BETWEEN 6 AND 500),
    api_key         text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, provider)
);

CREATE TABLE checkout_sessions (
    id                  text PRIMARY KEY,              -- Stripe's cs_...
    project_id          text NOT NULL REFERENCES projects (id),
    wallet_id           text NOT NULL,
    offer_id            text NOT NULL REFERENCES payment_offers (id),
    mode                text NOT NULL CHECK (mode IN ('payment', 'subscription')),
    url                 text,
    stripe_idempotency_key text NOT NULL,
    created_by_user_id  text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    completed_at        timestamptz
);
CREATE INDEX checkout_sessions_project ON checkout_sessions (project_id, created_at);

CREATE TABLE entitlements (
    id                       text PRIMARY KEY,
    project_id               text NOT NULL REFERENCES projects (id),
    wallet_id                text NOT NULL,
    offer_id                 text NOT NULL REFERENCES payment_offers (id),
    provider                 text NOT NULL CHECK (provider IN ('stripe', 'revenuecat', 'lemonsqueezy')),
    external_subscription_id text NOT NULL,
    external_customer_id     text,
    status                   text NOT NULL
                             CHECK (status IN ('trialing', 'active', 'past_due', 'paused', 'cancelled', 'ended')),
    will_renew               boolean NOT NULL DEFAULT true,
    current_period_start     timestamptz,
    current_period_end       timestamptz,
    ended_at                 timestamptz,
    state_at                 timestamptz NOT NULL,   -- provider time of the state shown; older events never win
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, provider, external_subscription_id)
);
CREATE INDEX entitlements_wallet ON entitlements (project_id, wallet_id);

CREATE TABLE payments (
    id                   text PRIMARY KEY,
    project_id           text NOT NULL REFERENCES projects (id),
    provider             text NOT NULL CHECK (provider IN ('stripe', 'revenuecat', 'lemonsqueezy')),
    external_id          text NOT NULL,              -- checkout session / invoice / store transaction / order
    payment_ref          text,                       -- a second handle refunds arrive with (payment intent)
    wallet_id            text NOT NULL,
    offer_id             text NOT NULL REFERENCES payment_offers (id),
    entitlement_id       text REFERENCES entitlements (id),
    amount_minor         bigint NOT NULL CHECK (amount_minor >= 0),
    currency             text NOT NULL,
    credits_minor        bigint NOT NULL CHECK (credits_minor > 0),
    grant_transaction_id bigint NOT NULL,
    refunded_minor       bigint NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0),
    disputed_minor       bigint NOT NULL DEFAULT 0 CHECK (disputed_minor >= 0),
    clawed_back_minor    bigint NOT NULL DEFAULT 0,
    status               text NOT NULL DEFAULT 'paid'
                         CHECK (status IN ('paid', 'partially_refunded', 'refunded', 'disputed')),
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CHECK (clawed_back_minor BETWEEN 0 AND credits_minor),
    UNIQUE (project_id, provider, external_id)
);
CREATE INDEX payments_ref ON payments (project_id, provider, payment_ref) WHERE payment_ref IS NOT NULL;
CREATE INDEX payments_wallet ON payments (project_id, wallet_id, created_at);

CREATE TABLE webhook_events (
    id                bigserial PRIMARY KEY,
    project_id        text NOT NULL,
    provider          text NOT NULL CHECK (provider IN ('stripe', 'revenuecat', 'lemonsqueezy')),
    event_id          text,
    event_type        text,
    status            text NOT NULL
                      CHECK (status IN ('processed', 'deferred', 'ignored', 'unmatched', 'duplicate', 'rejected',
                                        'failed')),
    error             text,
    defer_ref         text,
    transaction_ids   bigint[] NOT NULL DEFAULT '{}',
    body              bytea NOT NULL,
    body_sha256       text NOT NULL,
    signature         text,
    received_at       timestamptz NOT NULL DEFAULT now(),
    processed_at      timestamptz
);
CREATE UNIQUE INDEX webhook_events_once ON webhook_events (project_id, provider, event_id)
    WHERE status IN ('processed', 'deferred', 'ignored', 'unmatched');
CREATE INDEX webhook_events_deferred ON webhook_events (project_id, provider, defer_ref) WHERE status = 'deferred';
CREATE INDEX webhook_events_project ON webhook_events (project_id, id);
"""

DOWNGRADE = """
DROP TABLE webhook_events;
DROP TABLE payments;
DROP TABLE entitlements;
DROP TABLE checkout_sessions;
DROP TABLE payment_provider_configs;
DROP TABLE payment_offers;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
