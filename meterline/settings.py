"""Settings of the composition root (prefix ``METERLINE_``), read lazily."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from meterline.ports import DEFAULT_API_HOST, DEFAULT_API_PORT, DEFAULT_KAFKA_PORT, DEFAULT_STORE_PORT


class StackSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METERLINE_", extra="ignore", populate_by_name=True,
                                      hide_input_in_errors=True)

    env: str = Field(default="local", description="local | production; production refuses placeholder secrets")
    home: Path = Field(default=Path(".meterline"), description="where the embedded stack keeps its data and logs")
    kafka_port: int = DEFAULT_KAFKA_PORT
    broker_storage: Literal["disk", "memory"] = Field(
        default="disk", description="disk: topics survive a broker crash and `down`/`up` (invariant 12); "
                                    "memory: lost on every broker exit (throwaway runs only)")
    store_port: int = Field(default=DEFAULT_STORE_PORT, description="the embedded broker's disk store (S3 API, 127.0.0.1 only)")
    topic_retention_ms: int = Field(default=7 * 24 * 3600 * 1000, ge=60_000,
                                    description="how long topics keep events (replay, reconcile); default 7 days")
    broker_merge_after_s: float = Field(
        default=10.0, ge=0, description="the disk store merges record batches older than this into objects of up to "
                                        "1 MiB (the broker lists every object on each fetch); 0 = never")
    broker_merge_big_after_s: float = Field(
        default=600.0, ge=0, description="... and merges those, and big producer batches, again into objects of up to "
                                         "16 MiB once older than this; 0 = never")
    drain_timeout_s: float = Field(default=300.0, ge=0, description="how long `down` waits for accepted events")
    api_host: str = DEFAULT_API_HOST
    api_port: int = DEFAULT_API_PORT
    usage_partitions: int = Field(default=8, ge=1, description="fixed at topic creation (DESIGN §3)")
    charges_partitions: int = 4
    transactions_partitions: int = 4
    streams_workers: int = Field(default=2, ge=1, description="one faust worker per core")
    topic_prefix: str = ""
    restart_backoff_s_max: float = 10.0
    reconcile_interval_s: float = Field(default=3_600.0, ge=0, description="how often the four usage "
                                        "records are reconciled (meterline/reconcile_job.py: by the scheduler, or by the api when it owns "
                                        "an embedded ClickHouse); 0 = never")
    reconcile_settle_s: float = Field(default=600.0, ge=0, description="ClickHouse credit flow is compared with the "
                                      "ledger's postings older than this (the outbox relay + analytics sink lag); "
                                      "ClickHouse usage up to the sink's committed watermark")


@lru_cache
def get_settings() -> StackSettings:
    return StackSettings()
