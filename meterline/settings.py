"""Settings of the composition root (prefix ``METERLINE_``), read lazily."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class StackSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METERLINE_", extra="ignore", populate_by_name=True)

    env: str = Field(default="local", description="local | production; production refuses placeholder secrets")
    home: Path = Field(default=Path(".meterline"), description="where the embedded stack keeps its data and logs")
    kafka_port: int = 9092
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    usage_partitions: int = Field(default=8, ge=1, description="fixed at topic creation (DESIGN §3)")
    charges_partitions: int = 4
    transactions_partitions: int = 4
    streams_workers: int = Field(default=2, ge=1, description="one faust worker per core")
    topic_prefix: str = ""
    restart_backoff_s_max: float = 10.0
    reconcile_interval_s: float = Field(default=3_600.0, ge=0, description="how often the scheduler replays the "
                                        "usage log against the ledger (meterline/reconcile_job.py); 0 = never")


@lru_cache
def get_settings() -> StackSettings:
    return StackSettings()
