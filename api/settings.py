"""API settings (prefix ``API_``), read lazily; secrets as SecretStr, placeholders refused outside local."""

from __future__ import annotations

from functools import lru_cache

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The local-mode signing secret: long enough for HS256 (RFC 7518 §3.2 wants >= 32 bytes), useless elsewhere.
LOCAL_JWT_SECRET = "meterline-local-development-secret-do-not-use"
PLACEHOLDER_SECRETS = {"changethis", "change-me", "dev-secret", "secret", "", LOCAL_JWT_SECRET}
JWT_SECRET_BYTES_MIN = 32
#: the local-mode key of erasure pseudonyms (api/wallets/pseudonyms.py): refused elsewhere
LOCAL_ERASURE_KEY = "meterline-local-erasure-pseudonym-key-do-not-use"


class IdempotencySettings(BaseSettings):
    """The API settings the scheduler reads too (its ``purge_idempotency_records`` job, meterline/scheduler.py):
    a class of their own so that process needs none of the API's secrets."""

    # hide_input_in_errors: a refused setting must not print its value (secrets, URLs with passwords) at start-up
    model_config = SettingsConfigDict(env_prefix="API_", extra="ignore", populate_by_name=True,
                                      hide_input_in_errors=True)

    idempotency_retention_s: int = Field(
        default=3 * 24 * 3600, ge=24 * 3600,
        description="Idempotency-Key records (api/wallets/idempotency.py) older than this are purged by the scheduler. Keep "
                    "it longer than any client's retry window: a retry within it replays the stored response; a "
                    "later one is still never applied twice (the ledger key), but its answer is no longer the "
                    "original one (a debit answers outcome 'duplicate' with today's balance). Default 3 days, at "
                    "least 24 h (Stripe keeps keys 24 h); the SDK retries for at most 2 minutes.")


    webhook_unverified_retention_s: int = Field(
        default=7 * 24 * 3600, ge=3600,
        description="Webhook deliveries that failed verification or repeated a settled event (kept as a digest, "
                    "their size and a short prefix) are purged by the scheduler after this. Default 7 days.")
    env: str = Field(default="local", validation_alias=AliasChoices("METERLINE_ENV", "API_ENV"))
    #: account erasure (docs/erasure.md): the per-deployment key of the pseudonyms (HMAC-SHA256) that replace an
    #: erased subject where records are kept. Keep it secret and stable: a new key gives new pseudonyms (totals per
    #: pseudonym then split across erasures made before and after the change).
    erasure_pseudonym_key: SecretStr = Field(default=SecretStr(LOCAL_ERASURE_KEY), min_length=1)

    @model_validator(mode="after")
    def _refuse_placeholder_erasure_key(self) -> IdempotencySettings:
        if self.env != "local":
            value = self.erasure_pseudonym_key.get_secret_value()
            if value in PLACEHOLDER_SECRETS or value == LOCAL_ERASURE_KEY or len(value.encode()) < 32:
                raise ValueError("API_ERASURE_PSEUDONYM_KEY must be set to a real secret of at least 32 bytes "
                                 "outside local mode (try: openssl rand -hex 32)")
        return self


class ApiSettings(IdempotencySettings):
    model_config = SettingsConfigDict(env_prefix="API_", extra="ignore", populate_by_name=True,
                                      hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = 8080
    database_url: str = Field(default="postgresql+psycopg://postgres@127.0.0.1:5432/meterline",
                              validation_alias=AliasChoices("DATABASE_URL", "API_DATABASE_URL"))
    kafka_bootstrap_servers: str = Field(default="127.0.0.1:9092",
                                         validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS"))
    clickhouse_url: str = Field(default="", validation_alias=AliasChoices("CLICKHOUSE_URL", "API_CLICKHOUSE_URL"))
    topic_prefix: str = Field(default="", validation_alias=AliasChoices("METERLINE_TOPIC_PREFIX"))
    jwt_secret: SecretStr = SecretStr(LOCAL_JWT_SECRET)
    stripe_secret_key: SecretStr = SecretStr("sk_test_placeholder")
    stripe_webhook_secret: SecretStr = SecretStr("whsec_placeholder")
    stripe_api_base: str = "https://api.stripe.com"
    # payments (api/payments): deployment-wide webhook secrets, used when a project has none of its own
    lemonsqueezy_webhook_secret: SecretStr = SecretStr("")
    revenuecat_webhook_authorization: SecretStr = SecretStr("")
    cors_origins: list[str] = Field(default_factory=list)
    request_body_bytes_max: int = 5 * 1024 * 1024
    db_pool_size: int = 10
    # people and tenancy (api/tenancy/auth.py, api/tenancy/invitations.py)
    # at most a day: the session check keeps revocations that long (api/tenancy/sessions.py, the scheduler's purge)
    access_token_ttl_s: int = Field(default=900, le=24 * 3600)
    refresh_token_ttl_s: int = 30 * 24 * 3600
    invitation_ttl_s: int = 7 * 24 * 3600
    public_base_url: str = "http://127.0.0.1:8080"
    # per-principal token buckets (api/middleware.py); 0 disables. Auth endpoints are limited per client IP.
    rate_limit_per_s: float = 1000.0
    rate_limit_burst: int = 2000
    auth_rate_limit_per_s: float = 5.0
    auth_rate_limit_burst: int = 30
    # password logins (api/tenancy/login_guard.py): per account, lockout with backoff, concurrent argon2 checks
    login_account_rate_limit_per_s: float = 0.5
    login_account_rate_limit_burst: int = 10
    login_lockout_after: int = Field(default=5, ge=1, description="consecutive failures before a lockout")
    login_lockout_base_s: float = Field(default=1.0, gt=0, description="first lockout; doubles per failure")
    login_lockout_max_s: float = Field(default=900.0, gt=0)
    password_checks_max: int = Field(default=4, ge=1, description="argon2 checks at once (64 MiB each)")
    password_check_wait_s: float = Field(default=10.0, gt=0, description="wait for a slot, then 503")
    # server-side session check (api/tenancy/sessions.py): how often each process reads new revocations
    session_sync_s: float = Field(default=0.5, gt=0, le=30)
    # webhook endpoints (anonymous: every delivery proves itself): per client address and project
    webhook_rate_limit_per_s: float = 20.0
    webhook_rate_limit_burst: int = 200
    # sign-up bonus (api/wallets/signup_bonus.py): optional MaxMind .mmdb for the end user's country; the key of the
    # device-id hash (empty: derived from API_JWT_SECRET — set it to keep device hashes across JWT key rotations)
    geoip_database_path: str = Field(default="", description="a MaxMind GeoIP2/GeoLite2 Country or City .mmdb")
    device_hash_secret: SecretStr = SecretStr("")
    # account erasure (api/wallets/erasure.py): how long a closed wallet can still be restored before its data is erased
    erasure_grace_s: int = Field(default=30 * 24 * 3600, ge=0, le=366 * 24 * 3600)

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> ApiSettings:
        if self.env != "local":
            for name in ("jwt_secret",):
                value = getattr(self, name).get_secret_value()
                if value in PLACEHOLDER_SECRETS or "placeholder" in value:
                    raise ValueError(f"API_{name.upper()} must be set to a real secret outside local mode")
                if len(value.encode()) < JWT_SECRET_BYTES_MIN:
                    raise ValueError(f"API_{name.upper()} must be at least {JWT_SECRET_BYTES_MIN} bytes "
                                     "(try: openssl rand -hex 32)")
        return self


@lru_cache
def get_settings() -> ApiSettings:
    return ApiSettings()
