"""Analytics settings (prefix ``ANALYTICS_``), read lazily; shared infrastructure without the prefix.

Units are in the names: rows, milliseconds, seconds. ``CLICKHOUSE_URL`` decides the deployment shape:
``chdb:///abs/path`` (embedded, ONE process owns the path: the api) or ``http(s)://`` (a server; the sink
is its own process and any number of api processes query)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class AnalyticsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ANALYTICS_", extra="ignore", populate_by_name=True,
                                      hide_input_in_errors=True)

    clickhouse_url: str = Field(default="", validation_alias=AliasChoices("CLICKHOUSE_URL",
                                                                          "ANALYTICS_CLICKHOUSE_URL"))
    database: str = Field(default="meterline", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$",
                          description="ClickHouse database holding every analytics table")
    kafka_bootstrap_servers: str = Field(default="127.0.0.1:9092",
                                         validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS",
                                                                       "ANALYTICS_KAFKA_BOOTSTRAP_SERVERS"))
    topic_prefix: str = Field(default="", validation_alias=AliasChoices("METERLINE_TOPIC_PREFIX",
                                                                        "ANALYTICS_TOPIC_PREFIX"))
    consumer_group: str = "meterline-analytics"
    consumer_session_timeout_ms: int = Field(default=6_000, ge=1_000)
    #: A batch is inserted when it holds this many rows or its oldest row waited this long, whichever first.
    batch_rows_max: int = Field(default=20_000, ge=1)
    batch_age_ms_max: int = Field(default=1_000, ge=10)
    poll_timeout_ms: int = Field(default=100, ge=1)
    insert_attempts_max: int = Field(default=5, ge=1)
    insert_retry_backoff_ms: int = Field(default=200, ge=0)
    #: Where an event's units are read from: the first numeric value under one of these keys of ``data``
    #: (an event without any counts 1). Queries may also sum any other key at query time (value_key).
    units_keys: list[str] = Field(default_factory=lambda: ["units", "value", "quantity", "tokens"])
    #: Producer duplicates (same project/source/id in two messages) are dropped within this horizon.
    dedupe_horizon_s: int = Field(default=3_600, ge=0)
    dedupe_keys_max: int = Field(default=500_000, ge=0)
    #: Topic of access decisions (paywall telemetry). Consumed only if it exists when the sink starts.
    access_decisions_topic: str = "access.decisions.v1"
    #: Where the sink runs when ClickHouse is embedded: "auto" = inside the api process (chDB allows one
    #: process per data path); "process" = in `meterline run analytics` (then the api cannot query).
    embedded_sink_owner: str = Field(default="auto", pattern=r"^(auto|process|none)$")
    # probes: /health, /ready and /metrics of `meterline run analytics` (ledger/probes.py); -1 = off, 0 = any port
    metrics_host: str = Field(default="127.0.0.1", validation_alias=AliasChoices("ANALYTICS_METRICS_HOST",
                                                                                 "METERLINE_METRICS_HOST"))
    metrics_port: int = Field(default=9104, ge=-1, le=65535, description="the analytics process's probe port")
    query_clients_max: int = Field(default=4, ge=1, description="pooled ClickHouse clients for queries")
    query_timeout_s: int = Field(default=20, ge=1)
    query_memory_bytes_max: int = Field(default=2 * 1024**3, ge=64 * 1024**2)
    buckets_max: int = Field(default=5_000, ge=1, description="time buckets one series may return")
    #: Usage by meter reads whole hours from the hourly rollup (analytics/meter_rollup.py); off = raw rows only.
    meter_rollup: bool = True
    #: Hours that ended less than this long ago are read raw (still receiving events; no fill churn).
    meter_rollup_settle_s: int = Field(default=3_600, ge=0)
    #: Above this many whole hours of one meter version in a window, that version is read raw.
    meter_rollup_hours_max: int = Field(default=24 * 400, ge=0)

    @field_validator("clickhouse_url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if value and not value.startswith(("chdb://", "http://", "https://")):
            raise ValueError("CLICKHOUSE_URL must be chdb:///abs/path, http://... or https://...")
        return value

    @property
    def embedded(self) -> bool:
        return self.clickhouse_url.startswith("chdb://")


@lru_cache
def get_settings() -> AnalyticsSettings:
    return AnalyticsSettings()
