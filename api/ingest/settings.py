"""Ingestion settings (prefix ``API_INGEST_``), read lazily; tests may put an instance on app.state."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class IngestSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="API_INGEST_", extra="ignore", hide_input_in_errors=True)

    #: how long a request waits for the broker to acknowledge its events before answering 503
    ack_timeout_s: float = Field(default=10.0, gt=0)
    #: Retry-After on 503 when the broker did not acknowledge in time / the producer queue is full
    broker_retry_after_s: int = Field(default=5, ge=1)
    overload_retry_after_s: int = Field(default=1, ge=1)
    batch_events_max: int = Field(default=10_000, ge=1)
    #: one event, serialized, including data (the broker limit is per message; packs are split below it)
    event_bytes_max: int = Field(default=64 * 1024, ge=1024)
    field_chars_max: int = Field(default=256, ge=1)
    #: a packed message stays under this (the broker's default message.max.bytes is 1 MiB)
    message_bytes_max: int = Field(default=900_000, ge=64 * 1024)
    #: librdkafka queue bound; beyond it produce() raises BufferError and we answer 503 + Retry-After
    queue_messages_max: int = Field(default=100_000, ge=100)
    linger_ms: int = Field(default=2, ge=0)
    #: how long an authenticated API key is trusted without a database round trip (0: every request checks).
    #: A revocation through another API process takes effect here within this time; in-process at once.
    auth_cache_s: float = Field(default=5.0, ge=0)
    #: what goes into the ingested_events log: every event, only rejected ones, or nothing
    log_mode: Literal["all", "rejected", "off"] = "all"
    log_queue_rows_max: int = Field(default=200_000, ge=1)
    log_retention_hours: float = Field(default=72.0, gt=0)
    log_rows_max: int = Field(default=2_000_000, ge=1000)
    log_prune_interval_s: float = Field(default=60.0, gt=0)


@lru_cache
def get_settings() -> IngestSettings:
    return IngestSettings()
