"""Per-project payment provider settings: the webhook secret each provider signs or sends with (and, for
Stripe, an optional secret API key of the project's own Stripe account).

A project's own row wins; without one the deployment-wide default from the settings is used
(``API_STRIPE_WEBHOOK_SECRET``, ``API_LEMONSQUEEZY_WEBHOOK_SECRET``, ``API_REVENUECAT_WEBHOOK_AUTHORIZATION``;
``API_STRIPE_SECRET_KEY`` for checkout). A placeholder or empty default counts as "not configured": every
webhook is then refused with 400. Secrets are never returned by the API (only whether one is set and its last
four characters).

``api_key``: Stripe's secret key (checkout); RevenueCat's secret API key and Lemon Squeezy's API key, which the
receipts reconciliation (api/payments/reconciliation.py) reads the provider's API with; ``store_id``: the Lemon
Squeezy store it lists. Without an API key a provider is not reconciled for the project.

``accept_sandbox`` (RevenueCat, Lemon Squeezy): whether sandbox / test-mode purchases (RevenueCat
``environment: SANDBOX``, Lemon Squeezy ``test_mode: true``) grant credits. Off by default — and for a project
without its own row — such events are stored and answered ``ignored`` with how to accept them. Stripe keeps
test and live apart by keys (a test event only verifies with the test endpoint secret), so it has no flag."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from api.settings import ApiSettings

PROVIDERS = ("stripe", "revenuecat", "lemonsqueezy")


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    project_id: str
    provider: str
    webhook_secret: str
    api_key: str | None
    accept_sandbox: bool
    store_id: str | None
    created_at: datetime
    updated_at: datetime

    def public(self) -> dict[str, Any]:
        return {"provider": self.provider, "webhook_secret_set": True,
                "webhook_secret_last4": self.webhook_secret[-4:], "api_key_set": self.api_key is not None,
                "store_id": self.store_id, "accept_sandbox": self.accept_sandbox, "updated_at": self.updated_at.isoformat()}


def _usable(value: str) -> str | None:
    return None if not value or "placeholder" in value else value


def default_secret(settings: ApiSettings, provider: str) -> str | None:
    value = {"stripe": settings.stripe_webhook_secret,
             "revenuecat": getattr(settings, "revenuecat_webhook_authorization", None),
             "lemonsqueezy": getattr(settings, "lemonsqueezy_webhook_secret", None)}[provider]
    return _usable(value.get_secret_value()) if value is not None else None


def get_config(conn: Connection, *, project_id: str, provider: str) -> ProviderConfig | None:
    row = conn.execute(text("""
        SELECT project_id, provider, webhook_secret, api_key, accept_sandbox, store_id, created_at, updated_at
        FROM payment_provider_configs WHERE project_id = :p AND provider = :v"""),
                       {"p": project_id, "v": provider}).mappings().first()
    return ProviderConfig(**row) if row else None


def webhook_secret(conn: Connection, settings: ApiSettings, *, project_id: str, provider: str) -> str | None:
    config = get_config(conn, project_id=project_id, provider=provider)
    return config.webhook_secret if config else default_secret(settings, provider)


def accepts_sandbox(conn: Connection, *, project_id: str, provider: str) -> bool:
    config = get_config(conn, project_id=project_id, provider=provider)
    return bool(config and config.accept_sandbox)


def stripe_api_key(conn: Connection, settings: ApiSettings, *, project_id: str) -> str | None:
    config = get_config(conn, project_id=project_id, provider="stripe")
    if config and config.api_key:
        return config.api_key
    return _usable(settings.stripe_secret_key.get_secret_value())


def put_config(conn: Connection, *, project_id: str, provider: str, webhook_secret: str | None,
               api_key: str | None, accept_sandbox: bool | None = None,
               store_id: str | None = None) -> tuple[ProviderConfig | None, ProviderConfig]:
    """Create or replace the project's row. ``webhook_secret=None`` keeps the stored secret and api key (the
    caller checked there is a row); ``accept_sandbox=None`` keeps the stored flag (off for a new row);
    ``store_id=None`` keeps the stored Lemon Squeezy store id."""
    before = get_config(conn, project_id=project_id, provider=provider)
    if webhook_secret is None:
        assert before is not None
        webhook_secret, api_key = before.webhook_secret, before.api_key
    sandbox = accept_sandbox if accept_sandbox is not None else (before.accept_sandbox if before else False)
    store = store_id if store_id is not None else (before.store_id if before else None)
    row = conn.execute(text("""
        INSERT INTO payment_provider_configs (project_id, provider, webhook_secret, api_key, accept_sandbox,
                                              store_id)
        VALUES (:p, :v, :s, :k, :sb, :st)
        ON CONFLICT (project_id, provider) DO UPDATE
            SET webhook_secret = excluded.webhook_secret, api_key = excluded.api_key,
                accept_sandbox = excluded.accept_sandbox, store_id = excluded.store_id, updated_at = now()
        RETURNING project_id, provider, webhook_secret, api_key, accept_sandbox, store_id, created_at,
                  updated_at"""),
                       {"p": project_id, "v": provider, "s": webhook_secret, "k": api_key,
                        "sb": sandbox, "st": store}).mappings().one()
    return before, ProviderConfig(**row)
