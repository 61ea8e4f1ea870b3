"""Ledger settings, read lazily from the environment (prefix ``LEDGER_``).

Shared infrastructure (``DATABASE_URL``, ``KAFKA_BOOTSTRAP_SERVERS``) is read without the prefix, so one
environment configures every component the same way."""

from __future__ import annotations

from functools import lru_cache

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class LedgerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LEDGER_", extra="ignore")

    database_url: str = Field(
        default="postgresql+psycopg://postgres@127.0.0.1:5432/meterline",
        validation_alias=AliasChoices("DATABASE_URL", "LEDGER_DATABASE_URL"),
    )
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "LEDGER_KAFKA_BOOTSTRAP_SERVERS"),
    )
    consumer_group: str = "meterline-ledger"
    consumer_session_timeout_ms: int = 6_000
    consumer_batch_messages_max: int = 500
    outbox_batch_rows_max: int = 1_000
    outbox_poll_ms: int = 200
    db_pool_size: int = 10


@lru_cache
def get_settings() -> LedgerSettings:
    return LedgerSettings()
