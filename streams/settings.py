"""Streams settings (prefix ``STREAMS_``), read lazily — never at import time.

Shared infrastructure is read without the prefix (``DATABASE_URL``, ``KAFKA_BOOTSTRAP_SERVERS``,
``METERLINE_TOPIC_PREFIX``), so one environment configures every component the same way."""

from __future__ import annotations

from functools import lru_cache

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class StreamsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STREAMS_", extra="ignore", hide_input_in_errors=True)

    database_url: str = Field(
        default="postgresql+psycopg://postgres@127.0.0.1:5432/meterline",
        validation_alias=AliasChoices("DATABASE_URL", "STREAMS_DATABASE_URL"),
    )
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "STREAMS_KAFKA_BOOTSTRAP_SERVERS"),
    )
    topic_prefix: str = Field(default="", validation_alias=AliasChoices("METERLINE_TOPIC_PREFIX"))

    # the faust worker
    app_id: str = Field(default="meterline-streams", description="faust app id = consumer group (prefixed)")
    worker_index: int = Field(default=0, ge=0, description="which of the supervised workers this is")
    worker_count: int = Field(default=2, ge=1, description="how many workers the supervisor runs (docs/ops)")
    web_port: int = Field(default=0, ge=0, description="faust web server port; 0 = disabled")
    # probes: /health, /ready and /metrics of this worker (ledger/probes.py); -1 = off, 0 = any free port.
    # Two workers on one host need two ports (`meterline up` gives each its own).
    metrics_host: str = Field(default="127.0.0.1", validation_alias=AliasChoices("STREAMS_METRICS_HOST",
                                                                                 "METERLINE_METRICS_HOST"))
    metrics_port: int = Field(default=9102, ge=-1, le=65535, description="this worker's probe port")
    broker_session_timeout_s: float = Field(default=6.0, gt=0, description="group join takes half of it here")
    consumer_max_fetch_bytes: int = Field(default=8 * 1024 * 1024, gt=0)

    # micro-batches and checkpoints (DESIGN §2.2)
    # 250 ms (the largest default the contract allows), not less: each flush posts ~one usage transaction per active wallet, so at
    # 20k events/s 100 ms flushes kept the ledger 69% busy and queueing set the latency (p50/p99 577/1019 ms);
    # 250 ms: ledger 51%, p50/p99 383/604 ms, same throughput (docs/benchmarks.md)
    flush_ms_max: int = Field(default=250, ge=1,
                              description="a batch (and its checkpoint) closes after this")
    batch_events_max: int = Field(default=2_000, ge=1, description="Kafka messages per take_events batch (faust)")
    # how usage.events.v1 is consumed (streams/batch_consumer.py; streams/README.md "Consumer" has the figures):
    # "confluent" = a confluent-kafka consumer taken in batches, one faust channel item per batch; "faust" =
    # faust's own aiokafka consumer and take_events (one faust Event per Kafka message: 8–14x slower at one
    # event per message)
    consumer: str = Field(default="confluent", pattern="^(confluent|faust|faust-confluent)$")
    consume_messages_max: int = Field(default=20_000, ge=1,
                                      description="Kafka messages per batch of the confluent consumer")
    consume_bytes_max: int = Field(default=64 * 1024 * 1024, ge=1,
                                   description="message bytes per batch of the confluent consumer (packed messages: "
                                               "64 MiB ≈ 1,600 of 200 events, about faust's 2,000-message batches)")
    checkpoint_counters_max: int = Field(default=4_000, ge=1, description="counters per checkpoint message")
    checkpoint_dedupe_keys_max: int = Field(default=50_000, ge=1, description="dedupe keys per checkpoint message")
    checkpoint_bytes_max: int = Field(default=64 * 1024 * 1024, ge=1_000_000,
                                      description="largest checkpoint message the producer accepts (uncompressed)")
    delivery_timeout_s: float = Field(default=30.0, gt=0, description="a checkpoint not acked by then = crash")

    # validation
    event_bytes_max: int = Field(default=64 * 1024, ge=256, description="one event's JSON size limit")
    message_events_max: int = Field(default=10_000, ge=1, description="events in one packed message")
    future_skew_s: int = Field(default=3_600, ge=0, description="event time may be this far past arrival")

    # dedupe by (project, source, id)
    dedupe_horizon_s: int = Field(default=86_400, ge=0, description="duplicates are caught within this window")
    # kept for old environments: seeding now streams EVERY key of the horizon into the disk-backed store
    dedupe_seed_rows_max: int = Field(default=2_000_000, ge=0, description="unused (seeding is exact, streamed)")
    # streams/dedupe_store.py: RAM per partition ≈ 80 B x dedupe_memory_max + dedupe_filter_mb + transients,
    # whatever the rate; every key of the horizon is kept (older ones on local disk, 12 B each)
    dedupe_memory_max: int = Field(default=500_000, ge=1_000, description="dedupe keys in RAM per partition")
    dedupe_filter_mb: int = Field(default=256, ge=1, description="Bloom filter in front of the disk runs, per partition")
    dedupe_dir: str = Field(default="", description="directory of the disk runs (anonymous files); '' = system temp")

    # lateness and catalog
    allowed_lateness_s: int = Field(default=3_600, ge=0, description="default when a project sets none")
    unknown_subjects: str = Field(default="auto_provision", pattern="^(auto_provision|dead_letter)$",
                                  description="default when a project sets none")
    catalog_refresh_ms: int = Field(default=2_000, ge=50, description="catalog re-read period")

    # assignment
    seed_lookback_s: int = Field(default=40 * 86_400, ge=86_400,
                                 description="counters of periods starting within this are seeded")
    ledger_wait_log_s: float = Field(default=10.0, gt=0, description="log while waiting for the ledger")


@lru_cache
def get_settings() -> StreamsSettings:
    return StreamsSettings()
