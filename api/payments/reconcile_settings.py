"""Settings of the receipts reconciliation (api/payments/reconciliation.py), prefix ``API_``. A class of their
own, like ``DunningSettings``: the scheduler reads them without needing the API's secrets."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ReconcileSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="API_", extra="ignore", populate_by_name=True)

    revenuecat_api_base: str = Field(default="https://api.revenuecat.com",
                                     description="RevenueCat's REST API (v1 paths are appended)")
    lemonsqueezy_api_base: str = Field(default="https://api.lemonsqueezy.com",
                                       description="Lemon Squeezy's API (v1 paths are appended)")
    payments_reconcile_interval_s: float = Field(
        default=3600.0, ge=0, description="how often the scheduler reconciles every configured project; 0 = never")
    payments_reconcile_lookback_s: int = Field(
        default=35 * 24 * 3600, ge=3600, le=400 * 24 * 3600,
        description="purchases older than this are not granted by the job (a webhook older than that would have "
                    "been retried out long ago; an older purchase is a decision for an admin)")
    payments_reconcile_subscribers_max: int = Field(
        default=2_000, ge=1, le=100_000, description="RevenueCat customers looked up per project and run")
    payments_reconcile_pages_max: int = Field(
        default=50, ge=1, le=10_000, description="Lemon Squeezy list pages read per list and run (100 per page)")
    payments_reconcile_timeout_s: float = Field(default=10.0, gt=0, le=120, description="per provider request")
    payments_reconcile_retry_after_max_s: float = Field(
        default=30.0, ge=0, le=600,
        description="a 429 whose Retry-After is at most this is waited out (once per request); a longer one ends "
                    "the provider's run, reported; the next run continues")
