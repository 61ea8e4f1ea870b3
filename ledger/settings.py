"""Ledger settings, read lazily from the environment (prefix ``LEDGER_``).

Shared infrastructure (``DATABASE_URL``, ``KAFKA_BOOTSTRAP_SERVERS``) is read without the prefix, so one
environment configures every component the same way."""

from __future__ import annotations

from functools import lru_cache

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class LedgerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LEDGER_", extra="ignore", populate_by_name=True,
                                      hide_input_in_errors=True)

    database_url: str = Field(
        default="postgresql+psycopg://postgres@127.0.0.1:5432/meterline",
        validation_alias=AliasChoices("DATABASE_URL", "LEDGER_DATABASE_URL"),
    )
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "LEDGER_KAFKA_BOOTSTRAP_SERVERS"),
    )
    topic_prefix: str = Field(
        default="",
        validation_alias=AliasChoices("METERLINE_TOPIC_PREFIX", "LEDGER_TOPIC_PREFIX"),
        description="deployment prefix of every topic name (tests use one per run)",
    )
    consumer_group: str = "meterline-ledger"
    consumer_session_timeout_ms: int = 6_000
    consumer_batch_messages_max: int = 500
    # a batch's memory: its bytes (held until applied; the client's prefetch queue is sized to this too) plus its
    # distinct keys decoded (~3 KB each: ledger/lane_chunks.py drops superseded counters while decoding). A larger
    # batch merges a backlog deeper: at 100,000 wallets bench.ledger_catchup --checkpoints 240 took 117 s at 64 MiB
    # (RSS 0.9 GB) and 78 s at 256 MiB (RSS 1.2 GB — what 64 MiB took before the cutting; docs/benchmarks.md)
    consumer_batch_bytes_max: int = Field(default=256 * 1024 * 1024, gt=0,
                                          description="message bytes per fetched batch (at least one message)")
    # 8 = one per usage partition of the default topics; at 100,000 wallets 4 left a third of the machine idle while
    # lanes waited for each other (docs/benchmarks.md "usage settled later": 14,354–16,068 → 18,512–18,589 events/s)
    consumer_apply_threads: int = Field(default=8, ge=1, description="source partitions' checkpoints applied at "
                                        "once, each on its own database connection (1 = one at a time)")
    consumer_retry_backoff_s_max: float = Field(default=5.0, gt=0, description="longest pause between retries of a "
                                                "halted partition (ledger/halts.py; backoff from 0.5 s, doubling)")
    consumer_halted_pending_max: int = Field(default=5_000, gt=0,
                                             description="checkpoints a halted partition queues in memory before its "
                                                         "charges partition stops being fetched until it resumes")
    consumer_halted_pending_bytes_max: int = Field(default=64 * 1024 * 1024, gt=0,
                                                   description="... or this many bytes of them (as fetched; "
                                                               "decoded they take ~8x more; the count alone "
                                                               "allowed 5,000 x ~1.4 MB)")
    # 0: a checkpoint posts its usage transactions in its own database transaction. > 0: it prices usage and adds it
    # to the wallets' unsettled_minor (counted as spent at once), and a settle pass posts one transaction per key
    # every this many seconds (ledger/settle.py) — for many wallets with few events each, where a posting per key
    # per checkpoint is most of the ledger's cost (docs/benchmarks.md "usage settled later")
    usage_settle_interval_s: float = Field(default=0.0, ge=0, description="post usage transactions in a settle "
                                           "pass this often (0 = in each checkpoint's transaction)")
    outbox_batch_rows_max: int = 1_000
    outbox_poll_ms: int = 200
    outbox_delivery_timeout_s: float = Field(default=30.0, gt=0)
    db_pool_size: int = 10
    # probes: /health, /ready and /metrics of the ledger consumer (ledger/probes.py); -1 = off, 0 = any free port
    metrics_host: str = Field(default="127.0.0.1", validation_alias=AliasChoices("LEDGER_METRICS_HOST",
                                                                                 "METERLINE_METRICS_HOST"))
    metrics_port: int = Field(default=9101, ge=-1, le=65535, description="the ledger consumer's probe port")
    scheduler_metrics_port: int = Field(default=9103, ge=-1, le=65535, description="the scheduler's probe port")
    # scheduler (ledger.scheduler)
    scheduler_interval_s: float = Field(default=5.0, gt=0, description="pause between maintenance rounds")
    scheduler_lease_s: float = Field(default=30.0, gt=0, description="a holder that stops renewing loses the lease")
    scheduler_job_budget_s: float = Field(default=2.0, gt=0,
                                          description="a job with a backlog yields to the others after this long "
                                                      "per round and continues in the next")
    dedupe_horizon_s: int = Field(default=7 * 24 * 3600, gt=0, description="dedupe keys older than this are purged")
    outbox_retention_s: int = Field(default=24 * 3600, gt=0, description="published outbox rows kept this long")


@lru_cache
def get_settings() -> LedgerSettings:
    return LedgerSettings()
