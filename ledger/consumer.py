"""The ledger consumer (``meterline run ledger``): applies ChargeCheckpoints from ledger.charges.v1 and
runs the outbox relay.

Per fetched batch: decode → per source partition, its consecutive checkpoints merged by
``apply_checkpoints`` in one PostgreSQL transaction → commit. Kafka offsets are committed only AFTER the
database commit, so a crash in between redelivers checkpoints the ledger has
already applied — which ``apply_checkpoint`` answers with ``stale`` (a no-op). Messages of one partition
are applied strictly in order by one thread; several ledger consumers share the partitions through the
consumer group (a rebalance hands a partition over at a committed offset, and the offset mark in
PostgreSQL makes any overlap harmless).

- An undecodable message (not JSON, or not a ChargeCheckpoint) is logged with its offset, counted, and
  skipped: it is the ledger's own contract, so it can only come from a bug, and stalling every later
  checkpoint of its partition would hurt more.
- A database failure is never skipped: the message is retried with backoff until it applies or the
  process is stopped (money is not dropped because PostgreSQL blinked).
- Start-up refuses loudly when topics are missing or ledger migrations are pending.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import orjson
import structlog
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from ledger import metrics, schema_migrations
from ledger.checkpoints import apply_checkpoints
from ledger.contracts import TOPIC_LEDGER_CHARGES, TOPIC_LEDGER_TRANSACTIONS, ChargeCheckpoint
from ledger.db import make_engine
from ledger.kafka import (
    LagRecorder,
    make_consumer,
    make_producer,
    message_position,
    require_topics,
    topic_name,
)
from ledger.outbox import OutboxRelay
from ledger.probes import Check, database_check, start_probe_server
from ledger.runtime import freeze_startup_heap
from ledger.settings import LedgerSettings, get_settings

__all__ = ["ConsumerStats", "LedgerConsumer", "MigrationsPending", "main", "run"]

log = structlog.get_logger("ledger.consumer")

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_ledger"


#: threads applying different source partitions' checkpoints at once (each uses its own connection)
APPLY_THREADS = 4
#: a partition whose checkpoint keeps failing to apply this long makes the process not ready ("halted")
HALTED_AFTER_S = 30.0
#: the poll loop turns every 0.5 s when idle; a batch under a large backlog can hold it for seconds (merged applies),
#: so only this long without a turn means it is stuck (a failing database is the not_halted check, at 30 s)
LOOP_STALE_S = 60.0

class MigrationsPending(RuntimeError):
    code = "ledger.migrations_pending"


@dataclass
class ConsumerStats:
    applied: int = 0
    stale: int = 0
    undecodable: int = 0
    db_retries: int = 0
    transactions: int = 0
    #: database transactions that applied checkpoints (applied / apply_transactions = checkpoints merged per one)
    apply_transactions: int = 0


class LedgerConsumer:
    def __init__(self, *, settings: LedgerSettings, engine: Engine, stop: threading.Event,
                 apply_threads: int = APPLY_THREADS) -> None:
        self._settings = settings
        # source partitions are independent: their merged checkpoints are applied concurrently, each on its
        # own connection (lock order applied_offsets → usage_charges → wallets keeps shared keys deadlock-free)
        self._pool = (ThreadPoolExecutor(max_workers=apply_threads, thread_name_prefix="ledger-apply")
                      if apply_threads > 1 else None)
        self._stats_lock = threading.Lock()
        self._engine = engine
        self._stop = stop
        self.topic = topic_name(TOPIC_LEDGER_CHARGES, settings.topic_prefix)
        self.stats = ConsumerStats()
        #: seconds per step (in the periodic stats log: where the consumer's time goes)
        self.timings = {"poll_wait": 0.0, "decode": 0.0, "apply": 0.0, "commit": 0.0}
        # readiness (read by the probe thread): the assignment (None until the first one), the loop's last turn,
        # and since when each source partition's apply has been failing
        self.assigned: set[int] | None = None
        self._lag = LagRecorder(settings.consumer_group)
        self.loop_turned_at = time.monotonic()
        self.retrying_since: dict[tuple[str, int], float] = {}

    def readiness_checks(self) -> dict[str, Check]:
        return {"consumer_loop": self._loop_check, "partitions": self._assignment_check,
                "not_halted": self._halted_check}

    def _loop_check(self) -> tuple[bool, str]:
        idle_s = time.monotonic() - self.loop_turned_at
        return idle_s < LOOP_STALE_S, f"last turn {idle_s:.1f} s ago"

    def _assignment_check(self) -> tuple[bool, str]:
        assigned = self.assigned
        if assigned is None:
            return False, f"no assignment yet in group {self._settings.consumer_group}"
        return True, (f"{self.topic} partitions {sorted(assigned)}" if assigned
                      else "standby: the group gave this member no partitions")

    def _halted_check(self) -> tuple[bool, str]:
        now = time.monotonic()
        halted = {f"{t}[{p}]": round(now - since, 1) for (t, p), since in list(self.retrying_since.items())
                  if now - since >= HALTED_AFTER_S}
        return (not halted, f"retrying the database for: {halted}" if halted else "applying")

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned = (self.assigned or set()) | {p.partition for p in partitions}
        self._lag.assign(partitions)
        log.info("partitions_assigned", partitions=sorted(p.partition for p in partitions))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {p.partition for p in partitions}
        self.assigned = (self.assigned or set()) - revoked
        self._lag.revoke(partitions)
        log.info("partitions_revoked", partitions=sorted(revoked))

    def run(self) -> None:
        consumer = make_consumer(self._settings.kafka_bootstrap_servers, self._settings.consumer_group,
                                 session_timeout_ms=self._settings.consumer_session_timeout_ms)
        consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_revoke)
        last_report = time.monotonic()
        last_lag = 0.0
        try:
            while not self._stop.is_set():
                self.loop_turned_at = time.monotonic()
                if self.loop_turned_at - last_lag >= 1.0:
                    self._lag.record(consumer)
                    last_lag = self.loop_turned_at
                # consume(n, timeout) blocks for the WHOLE timeout unless n messages arrive (measured: 1
                # message -> 2,001 ms with a 2 s timeout), which added up to 0.5 s to every checkpoint.
                # Wait for the first message only, then take what is already fetched without waiting.
                polled = time.monotonic()
                first = consumer.poll(0.5)
                self.timings["poll_wait"] += time.monotonic() - polled
                messages = ([first, *consumer.consume(self._settings.consumer_batch_messages_max - 1, 0)]
                            if first is not None else [])
                if messages:
                    metrics.QUEUE_CHECKPOINTS.set(len(messages))
                    self._handle_batch(consumer, messages)
                    metrics.QUEUE_CHECKPOINTS.set(0)
                    self._lag.record(consumer)
                    last_lag = time.monotonic()
                if time.monotonic() - last_report > 10:
                    log.info("ledger_consumer_stats", **self._stats_fields())
                    last_report = time.monotonic()
        finally:
            log.info("ledger_consumer_stopping", **self._stats_fields())
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            consumer.close()  # leaves the group at once, so a peer takes the partitions without waiting

    def _handle_batch(self, consumer: Consumer, messages: list[Message]) -> None:
        """Apply what was fetched, then commit each charges partition's next offset.

        Consecutive checkpoints of one source partition (in arrival order) are applied as ONE merged
        checkpoint in one database transaction (``apply_checkpoints``: the stale rule is still decided per
        checkpoint). While the ledger keeps up a batch holds one checkpoint per partition; when it falls
        behind, the backlog is merged, so its cost per event falls exactly when it is the bottleneck.
        Source partitions are independent, so their order between groups is free; within a group it is
        the arrival order. If the process is stopped mid-batch nothing is committed: the redelivered
        checkpoints that were applied are then stale."""
        started = time.monotonic()
        next_offsets: dict[int, int] = {}
        groups: dict[tuple[str, int], list[ChargeCheckpoint]] = {}
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("kafka_consume_error", error=str(error))
                continue
            checkpoint = self._decode(message)
            if checkpoint is not None:
                groups.setdefault((checkpoint.source_topic, checkpoint.partition), []).append(checkpoint)
            next_offsets[_partition(message)] = _offset(message) + 1
        decoded = time.monotonic()
        self.timings["decode"] += decoded - started
        if len(groups) <= 1 or self._pool is None:
            done = all(self._apply_group(checkpoints) for checkpoints in groups.values())
        else:
            done = all(list(self._pool.map(self._apply_group, groups.values())))
        if not done:
            return  # stopped while retrying the database: commit nothing
        applied = time.monotonic()
        self.timings["apply"] += applied - decoded
        if next_offsets:
            consumer.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in next_offsets.items()],
                            asynchronous=False)
        self.timings["commit"] += time.monotonic() - applied

    def _apply_group(self, checkpoints: list[ChargeCheckpoint]) -> bool:
        """One source partition's checkpoints, in order (one thread at a time per partition)."""
        return all(self._apply(chunk) for chunk in _merge_chunks(checkpoints))

    def _apply(self, checkpoints: list[ChargeCheckpoint]) -> bool:
        backoff = 0.05
        source = (checkpoints[0].source_topic, checkpoints[0].partition)
        first_started = time.time()
        for checkpoint in checkpoints:
            metrics.CHECKPOINT_QUEUE_SECONDS.observe(max(0.0, first_started - checkpoint.emitted_at.timestamp()))
        while not self._stop.is_set():
            try:
                started = time.monotonic()
                with self._engine.begin() as conn:
                    merged = apply_checkpoints(conn, checkpoints)
                metrics.APPLY_SECONDS.observe(time.monotonic() - started)
            except DBAPIError as exc:
                self.retrying_since.setdefault(source, time.monotonic())
                metrics.DB_RETRIES.inc()
                with self._stats_lock:
                    self.stats.db_retries += 1
                log.warning("checkpoint_apply_retry", source_topic=checkpoints[0].source_topic,
                            source_partition=checkpoints[0].partition, checkpoints=len(checkpoints),
                            as_of=checkpoints[-1].as_of_offset, error=str(exc.orig or exc).splitlines()[0],
                            backoff_s=backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._settings.consumer_retry_backoff_s_max)
                continue
            self.retrying_since.pop(source, None)
            committed_at = time.time()
            for checkpoint in checkpoints:
                metrics.CHECKPOINT_EMIT_TO_APPLY_SECONDS.observe(
                    max(0.0, committed_at - checkpoint.emitted_at.timestamp()))
            metrics.CHECKPOINTS.labels("applied").inc(merged.applied)
            metrics.CHECKPOINTS.labels("stale").inc(merged.stale)
            with self._stats_lock:
                self.stats.applied += merged.applied
                self.stats.stale += merged.stale
                self.stats.transactions += merged.outcome.transactions
                self.stats.apply_transactions += 1
            return True
        return False

    def _stats_fields(self) -> dict[str, object]:
        return {**vars(self.stats), **{f"{k}_s": round(v, 2) for k, v in self.timings.items()}}

    def _decode(self, message: Message) -> ChargeCheckpoint | None:
        try:
            return ChargeCheckpoint.model_validate(orjson.loads(message.value() or b""))
        except (orjson.JSONDecodeError, ValidationError) as exc:
            self.stats.undecodable += 1
            metrics.CHECKPOINTS.labels("undecodable").inc()
            log.error("undecodable_checkpoint_skipped", topic=message.topic(), partition=_partition(message),
                      offset=_offset(message), undecodable_total=self.stats.undecodable,
                      error=str(exc).splitlines()[0])
            return None


#: a merged application stays a bounded transaction (streams cuts a checkpoint at 4,000 counters / 50,000
#: dedupe keys; a backlog merges up to this much at once)
MERGE_COUNTERS_MAX = 16_000
MERGE_DEDUPE_KEYS_MAX = 200_000


def _merge_chunks(checkpoints: list[ChargeCheckpoint]) -> list[list[ChargeCheckpoint]]:
    """Consecutive runs of ``checkpoints`` (order kept) within the merge bounds; never an empty run."""
    chunks: list[list[ChargeCheckpoint]] = []
    counters = dedupe = 0
    for checkpoint in checkpoints:
        c, d = len(checkpoint.counters), len(checkpoint.dedupe_keys)
        if chunks and (counters + c > MERGE_COUNTERS_MAX or dedupe + d > MERGE_DEDUPE_KEYS_MAX):
            chunks.append([])
            counters = dedupe = 0
        if not chunks:
            chunks.append([])
        chunks[-1].append(checkpoint)
        counters += c
        dedupe += d
    return chunks


def _partition(message: Message) -> int:
    return message_position(message)[1]


def _offset(message: Message) -> int:
    return message_position(message)[2]


def check_startup(settings: LedgerSettings) -> None:
    """Loud start-up refusals: pending ledger migrations, missing topics."""
    todo = schema_migrations.pending(settings.database_url, script_location=MIGRATIONS, version_table=VERSION_TABLE)
    if todo:
        raise MigrationsPending(f"ledger migrations are pending ({', '.join(todo)}); run `meterline migrate` first")
    require_topics(settings.kafka_bootstrap_servers, [topic_name(TOPIC_LEDGER_CHARGES, settings.topic_prefix),
                                                      topic_name(TOPIC_LEDGER_TRANSACTIONS, settings.topic_prefix)])


def run(settings: LedgerSettings, stop: threading.Event) -> ConsumerStats:
    """Consumer + outbox relay until ``stop`` is set. Usable from a thread (tests) or ``main``."""
    check_startup(settings)
    engine = make_engine(settings.database_url, pool_size=settings.db_pool_size, application_name="meterline-ledger")
    relay = OutboxRelay(engine=engine, producer=make_producer(settings.kafka_bootstrap_servers),
                        topic_prefix=settings.topic_prefix, batch_rows_max=settings.outbox_batch_rows_max,
                        poll_s=settings.outbox_poll_ms / 1000, delivery_timeout_s=settings.outbox_delivery_timeout_s)
    relay_thread = threading.Thread(target=relay.run, args=(stop,), name="ledger-outbox", daemon=True)
    relay_thread.start()
    consumer = LedgerConsumer(settings=settings, engine=engine, stop=stop)
    probes = None
    if settings.metrics_port >= 0:
        probes = start_probe_server("ledger", host=settings.metrics_host, port=settings.metrics_port, checks={
            "database": database_check(engine), **consumer.readiness_checks(),
            "outbox_relay": lambda: (relay_thread.is_alive(), "running" if relay_thread.is_alive() else "stopped")})
    log.info("ledger_consumer_started", topic=consumer.topic, group=settings.consumer_group,
             metrics_port=probes.port if probes else None)
    freeze_startup_heap()  # a full GC pass over the import-time heap would stall every apply thread
    try:
        consumer.run()
    finally:
        if probes is not None:
            probes.stop()
        stop.set()
        relay_thread.join(timeout=30)
        engine.dispose()
    return consumer.stats


def main() -> None:
    settings = get_settings()
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("ledger_consumer_signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        run(settings, stop)
    except Exception as exc:
        code = getattr(exc, "code", None)
        if code in ("ledger.migrations_pending", "kafka.missing_topics"):
            log.error("ledger_consumer_refused_to_start", code=code, error=str(exc))
            raise SystemExit(2) from exc
        raise
