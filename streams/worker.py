"""The streams worker (``meterline run streams``): a faust agent that meters ``usage.events.v1`` in
micro-batches and emits one cumulative ChargeCheckpoint per touched source partition per batch.

The protocol (DESIGN §2.2; streams/README.md explains each step and the invariant it protects):

- batch: ``take_events(batch_events_max, within=flush_ms_max)``; every message is metered by the
  aggregator of its partition (streams/metering.py); bad events go to the DLQ.
- end of batch: one checkpoint per touched aggregator → ``ledger.charges.v1`` through an idempotent
  confluent producer, and the batch WAITS for broker acknowledgement of every checkpoint and dead letter
  before it returns. A batch's offsets are committed only after it returns (the confluent batching consumer,
  streams/batch_consumer.py, the default; or faust's ack and commit with ``STREAMS_CONSUMER=faust``), so a
  committed offset is never ahead of an acknowledged checkpoint.
- assignment: every partition of a new assignment is re-seeded (never trusted across a rebalance): its
  gate closes; once this worker's in-flight checkpoints are out, the seeding task waits until the ledger's
  ``applied_through[p]`` reaches both the group's committed offset − 1 and this worker's last emitted
  checkpoint of p, reads applied_through + counters + dedupe keys in ONE repeatable-read snapshot, seeds a
  fresh aggregator and opens the gate. Events of a partition whose gate is closed are deferred to the end
  of the batch (never counted by a stale aggregator); offsets <= applied_through are skipped.
- any failure inside a batch (delivery error, timeout, bug) or a cancellation mid-batch ends the process
  at once (``os._exit``): unwinding would let faust ack — and commit — offsets whose checkpoint was never
  acknowledged. The supervisor restarts the worker; the next owner replays from the committed offset.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import faust
import structlog
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from faust.app.base import BootStrategy
from faust.types import TP
from sqlalchemy import Engine

from ledger import queries as ledger_queries
from ledger.contracts import TOPIC_LEDGER_CHARGES
from ledger.db import make_engine
from ledger.fencing import take_owner_epoch
from ledger.kafka import make_producer, require_topics, topic_name
from ledger.metrics import forget_lag, record_lag
from ledger.probes import Check, database_check, start_probe_server
from ledger.runtime import freeze_startup_heap
from ledger.source_logs import current_identity
from streams import catalog as catalog_db
from streams import faust_transport
from streams import metrics as streams_metrics
from streams.batch_consumer import BatchConsumer, Record
from streams.catalog_model import CatalogSnapshot, ProjectPolicy
from streams.contracts import TOPIC_USAGE_DLQ, TOPIC_USAGE_EVENTS
from streams.dead_letters import dead_letter_message
from streams.dedupe_seed import key_set_chunks
from streams.errors import PendingMigrations
from streams.metering import (
    Checkpoint,
    Limits,
    PartitionAggregator,
    Rejection,
    SeedCounter,
    Stats,
    period_bounds,
)
from streams.settings import StreamsSettings, get_settings

__all__ = ["Runtime", "check_startup", "create_app", "main"]

log = structlog.get_logger("streams.worker")

#: exit code when a batch cannot be completed safely (the supervisor restarts the worker)
EXIT_UNSAFE = 70


def _die(message: str, **fields: Any) -> None:
    """End the process without unwinding (see the module doc: unwinding would ack unprotected offsets)."""
    log.error(message, **fields)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(EXIT_UNSAFE)


def _never_ack(message: Any) -> None:
    """Mark a skipped (unmetered) message as acknowledged already, so faust's ack after the batch is a no-op and
    its offset is never committed by this worker. Without it, a partition revoked mid-batch and assigned back
    to this worker before the batch returned had the skipped offsets acked into its NEW assignment and
    committed: the events were never charged, and the seeding wait (applied ≥ committed − 1) waited forever.
    Unacked, they are fetched again from the committed offset by whoever owns the partition."""
    message.acked = True


class Runtime:
    """The worker's state: per-partition aggregators and gates, the catalog, the producer."""

    def __init__(self, settings: StreamsSettings, *, partitions: int | None = None) -> None:
        self.settings = settings
        prefix = settings.topic_prefix
        self.usage_topic = topic_name(TOPIC_USAGE_EVENTS, prefix)
        # The identity the ledger keeps this topic's marks under: the topic's current life
        # (ledger/source_logs.py). Kafka calls use usage_topic; everything stored in the ledger uses source_id.
        self.source_id = self.usage_topic
        self.dlq_topic = topic_name(TOPIC_USAGE_DLQ, prefix)
        self.charges_topic = topic_name(TOPIC_LEDGER_CHARGES, prefix)
        self.group_id = f"{prefix}{settings.app_id}"
        self.partitions = partitions
        self.limits = Limits(event_bytes_max=settings.event_bytes_max, message_events_max=settings.message_events_max,
                             future_skew_s=settings.future_skew_s, dedupe_horizon_s=settings.dedupe_horizon_s,
                             dedupe_memory_max=settings.dedupe_memory_max,
                             dedupe_filter_bytes=settings.dedupe_filter_mb * 1024 * 1024,
                             dedupe_dir=settings.dedupe_dir or None,
                             checkpoint_counters_max=settings.checkpoint_counters_max,
                             checkpoint_dedupe_keys_max=settings.checkpoint_dedupe_keys_max)
        self.default_policy = ProjectPolicy(settings.unknown_subjects,  # type: ignore[arg-type]
                                            settings.allowed_lateness_s)
        self.aggregators: dict[int, PartitionAggregator] = {}
        self.gates: dict[int, asyncio.Event] = {}
        self.seeding: dict[int, asyncio.Task[None]] = {}
        self.last_emitted: dict[int, int] = {}
        #: the owner epoch this worker took for each partition it seeded (stamped on its checkpoints)
        self.epochs: dict[int, int] = {}
        self.catalog: CatalogSnapshot | None = None
        self.catalog_rev = -1
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="streams-io")
        self._engine: Engine | None = None
        self._producer: Producer | None = None
        self._offsets_reader: Consumer | None = None
        self._delivery_errors: list[str] = []
        #: dead letters produced and not yet acknowledged by the broker (see ``_emit``)
        self._letters_unflushed = 0
        self._not_flushing: asyncio.Event | None = None
        self._lock = threading.Lock()
        self.counts = {"batches": 0, "checkpoints": 0, "dead_letters": 0, "deferred": 0, "unowned": 0,
                       "seeded": 0, "batch_messages": 0}
        #: seconds spent per step (in the periodic stats log: where a worker's time goes)
        self.timings = {"metering": 0.0, "delivery": 0.0, "between_batches": 0.0}
        self._batch_ended = 0.0
        self._batch_started = 0.0
        #: per partition, the aggregator and a copy of its stats when they were last added to the event counters
        self._exported: dict[int, tuple[PartitionAggregator, Stats]] = {}
        # readiness (read by the probe thread): the partitions of the latest assignment (None before the first)
        # and the last turn of the event loop (a timer)
        self.assigned: set[int] | None = None
        self.loop_turned_at = time.monotonic()
        #: the high watermark of a partition from the consumer's latest fetch (set by create_app: faust's consumer)
        self.highwater: Any = None

    # -- resources (created lazily: nothing at import or construction time) -----------------------------

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.settings.database_url, pool_size=4, application_name="meterline-streams")
        return self._engine

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            # a single packed message of thousands of distinct wallets makes a checkpoint larger than 1 MB (it
            # cannot be cut inside a message); lz4 shrinks it ~5x on the wire. Apache Kafka brokers must allow
            # it on ledger.charges.v1 (topic max.message.bytes), Tansu accepts it.
            self._producer = make_producer(self.settings.kafka_bootstrap_servers, **{
                "linger.ms": 2, "message.max.bytes": self.settings.checkpoint_bytes_max})
        return self._producer

    @property
    def not_flushing(self) -> asyncio.Event:
        if self._not_flushing is None:
            self._not_flushing = asyncio.Event()
            self._not_flushing.set()
        return self._not_flushing

    async def io(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # -- catalog -----------------------------------------------------------------------------------------

    def _load_catalog_sync(self, *, force: bool = False) -> bool:
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                revision = catalog_db.catalog_revision(conn)
                if revision == self.catalog_rev and not force and self.catalog is not None:
                    return False
                snapshot = catalog_db.load_catalog(conn, default_policy=self.default_policy)
        self.catalog, self.catalog_rev = snapshot, revision
        return True

    async def refresh_catalog(self) -> bool:
        """Reload the catalog if its revision moved; False when PostgreSQL could not be read."""
        try:
            if await self.io(self._load_catalog_sync):
                assert self.catalog is not None
                log.info("catalog_loaded", revision=self.catalog_rev,
                         meters=sum(len(v) for v in self.catalog.meters_by_type.values()),
                         subject_keys=len(self.catalog.wallets_by_subject))
            return True
        except Exception as exc:  # keep metering with the catalog we have; try again next tick
            log.warning("catalog_refresh_failed", error=str(exc).splitlines()[0])
            return False

    async def refresh_catalog_before_batch(self) -> None:
        """Block the batch until the catalog's revision could be read. Metering with a catalog that may be stale
        dead-letters the events of a meter created a moment ago as unknown_meter: with PostgreSQL restarting,
        that lost accepted usage. Waiting is safe: nothing of this batch is checkpointed or committed yet."""
        delay_s = 0.2
        while not await self.refresh_catalog():
            await asyncio.sleep(delay_s)
            delay_s = min(5.0, delay_s * 2)

    # -- assignment --------------------------------------------------------------------------------------

    def on_assigned(self, assigned: set[Any]) -> None:
        """Re-seed EVERY assigned partition: state is never trusted across a rebalance (this worker may have
        been out of the group while another owner advanced the ledger)."""
        mine = {tp.partition for tp in assigned if tp.topic == self.usage_topic}
        for p in (self.assigned or set()) - mine:
            forget_lag(self.group_id, self.usage_topic, p)
        self.assigned = mine
        for p, task in list(self.seeding.items()):
            task.cancel()
            del self.seeding[p]
        for p in list(self.gates):
            if p not in mine:  # revoked: deferred events of it are skipped, never acked (see _skip)
                self.gates[p].set()
                self.aggregators.pop(p, None)
                self.epochs.pop(p, None)
        for p in sorted(mine):
            self.gates[p] = asyncio.Event()
            self.aggregators.pop(p, None)
            self.seeding[p] = asyncio.ensure_future(self._seed(p))
        log.info("partitions_assigned", partitions=sorted(mine))

    async def _seed(self, p: int) -> None:
        try:
            await self.not_flushing.wait()  # this worker's in-flight checkpoints are out (last_emitted is final)
            if self.partitions is None:
                found = await self.io(lambda: require_topics(self.settings.kafka_bootstrap_servers, [self.usage_topic]))
                self.partitions = found[self.usage_topic]
            if self.catalog is None:
                await self.io(lambda: self._load_catalog_sync(force=True))
            committed = await self.io(self._committed_sync, p)
            target = max(committed - 1, self.last_emitted.get(p, -1))
            started = time.monotonic()
            next_log = started + self.settings.ledger_wait_log_s
            while True:
                applied = await self.io(self._applied_sync, p)
                if applied >= target:
                    break
                if time.monotonic() >= next_log:
                    log.warning("waiting_for_ledger", partition=p, applied_through=applied, needed=target,
                                waited_s=round(time.monotonic() - started, 1))
                    next_log = time.monotonic() + self.settings.ledger_wait_log_s
                await asyncio.sleep(0.05)
            aggregator, epoch = await self.io(self._snapshot_sync, p)
            if self.seeding.get(p) is not asyncio.current_task():
                return  # a newer assignment took over (and takes a newer epoch)
            self.aggregators[p] = aggregator
            self.epochs[p] = epoch
            self.gates[p].set()
            self.seeding.pop(p, None)
            self.counts["seeded"] += 1
            log.info("partition_seeded", partition=p, applied_through=aggregator.processed_through,
                     committed=committed, counters=len(aggregator.counters), dedupe_keys=aggregator.dedupe_size,
                     dedupe_on_disk=aggregator.dedupe_on_disk,
                     waited_s=round(time.monotonic() - started, 2))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _die("partition_seed_failed", partition=p, error=repr(exc))

    def _committed_sync(self, p: int) -> int:
        """The group's committed offset of ``p`` (next offset to read), -1 when none is committed."""
        with self._lock:
            if self._offsets_reader is None:
                # same group id as faust, never subscribes: only reads committed offsets
                self._offsets_reader = Consumer({"bootstrap.servers": self.settings.kafka_bootstrap_servers,
                                                 "group.id": self.group_id, "enable.auto.commit": False})
            for attempt in range(20):
                try:
                    [tp] = self._offsets_reader.committed([TopicPartition(self.usage_topic, p)], timeout=10)
                    return tp.offset if tp.offset >= 0 else -1
                except KafkaException as exc:
                    log.warning("committed_offset_retry", partition=p, attempt=attempt, error=str(exc))
                    time.sleep(0.5)
        raise RuntimeError(f"cannot read the committed offset of {self.usage_topic}[{p}]")

    def _applied_sync(self, p: int) -> int:
        with self.engine.connect() as conn:
            return ledger_queries.applied_offsets(conn, self.source_id, [p])[p]

    def _snapshot_sync(self, p: int) -> tuple[PartitionAggregator, int]:
        # Fencing (ledger/fencing.py): take the owner epoch in its OWN committed transaction BEFORE reading the
        # snapshot. Every checkpoint of an earlier owner either applied before it (so it is in the snapshot and
        # its offsets are skipped) or is refused after it (and its offsets, beyond the snapshot's mark, are
        # metered again here). Never both, never neither — whatever changed in the catalog in between.
        with self.engine.begin() as conn:
            epoch = take_owner_epoch(conn, self.source_id, p)
        now = datetime.now(UTC)
        lookback = max(self.settings.seed_lookback_s, self._max_lateness_s() + 86_400)
        periods_since, _ = period_bounds(now - timedelta(seconds=lookback), "month")
        assert self.partitions is not None
        aggregator = PartitionAggregator(source_topic=self.source_id, partition=p, partitions=self.partitions,
                                         limits=self.limits)
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():  # ONE snapshot: applied mark, counters and dedupe keys cannot be torn apart
                snap = ledger_queries.partition_snapshot(conn, self.source_id, [p], periods_since=periods_since)
                # EVERY key of the horizon in STREAM time (DESIGN §2 invariant 10), streamed oldest first into
                # the partition's dedupe store (RAM tier + disk runs, streams/dedupe_store.py): never all in RAM
                aggregator.seed(
                    applied_through=snap.applied_through[p],
                    counters=[SeedCounter(c.wallet_id, c.project_id, c.meter_id, c.period_start, c.price_version_id,
                                          c.units, c.events, c.late_events, c.latest_at) for c in snap.counters],
                    dedupe_chunks=key_set_chunks(ledger_queries.dedupe_key_sets_in_horizon(
                        conn, source_topic=self.source_id, partition=p, horizon_s=self.settings.dedupe_horizon_s)),
                    periods_since=periods_since,
                )
        log.info("partition_owner_epoch", partition=p, owner_epoch=epoch, applied_through=snap.applied_through[p])
        return aggregator, epoch

    def _max_lateness_s(self) -> int:
        policies = self.catalog.policies.values() if self.catalog else ()
        return max([self.settings.allowed_lateness_s, *(p.allowed_lateness_s for p in policies)])

    # -- observability (read by the probe thread: flags and timestamps only) ------------------------------

    def readiness_checks(self) -> dict[str, Check]:
        return {"database": database_check(self.engine), "partitions": self._partitions_check,
                "event_loop": self._loop_check}

    def _partitions_check(self) -> tuple[bool, str]:
        if self.assigned is None:
            return False, f"no assignment yet in group {self.group_id}"
        seeding = sorted(self.seeding)
        if seeding:
            return False, f"seeding partitions {seeding} (waiting for the ledger's applied marks)"
        return True, (f"{self.usage_topic} partitions {sorted(self.assigned)} seeded" if self.assigned
                      else "standby: the group gave this worker no partitions")

    def _loop_check(self) -> tuple[bool, str]:
        idle_s = time.monotonic() - self.loop_turned_at
        return idle_s < 30.0, f"last turn {idle_s:.1f} s ago"  # a 1 s timer; a large batch holds the loop for seconds

    def record_observations(self) -> None:
        """Lag of each owned, seeded partition and the partition gauge (a 1 s timer and the end of each batch)."""
        self.loop_turned_at = time.monotonic()
        seeding = len(self.seeding)
        streams_metrics.PARTITIONS.labels("seeding").set(seeding)
        streams_metrics.PARTITIONS.labels("seeded").set(len(self.aggregators))
        if self.highwater is None:
            return
        for p, aggregator in list(self.aggregators.items()):
            try:
                high = self.highwater(p)
            except Exception:  # not fetched yet / consumer restarting: keep the last value
                continue
            if high is not None:
                record_lag(self.group_id, self.usage_topic, p, next_offset=aggregator.processed_through + 1,
                           high_watermark=int(high))

    # -- batches -----------------------------------------------------------------------------------------

    async def handle_batch(self, events: Sequence[Any]) -> None:
        """Meter a batch and return only when its checkpoints are acknowledged (or end the process)."""
        try:
            await self._handle_batch(events)
            self.export_outcomes()
            streams_metrics.MESSAGES.inc(len(events))
            streams_metrics.BATCH_SECONDS.observe(time.monotonic() - self._batch_started)
            self.record_observations()
        except asyncio.CancelledError:
            _die("cancelled_mid_batch_exiting_without_commit", events=len(events))
        except BaseException as exc:  # anything here must not unwind into faust's ack
            _die("batch_failed_exiting_without_commit", error=repr(exc), events=len(events))

    async def _handle_batch(self, events: Sequence[Any]) -> None:
        started = self._batch_started = time.monotonic()
        if self._batch_ended:
            self.timings["between_batches"] += started - self._batch_ended
        self.counts["batches"] += 1
        self.counts["batch_messages"] += len(events)
        # A meter, price or subject key committed before these events were produced must apply to them:
        # probe the catalog's revision first (one cheap query; a reload only when it moved). The periodic
        # refresh alone left a window of up to catalog_refresh_ms in which events of a meter created a moment
        # earlier were dead-lettered as unknown_meter.
        await self.refresh_catalog_before_batch()
        deferred: list[Any] = []
        touched: dict[int, PartitionAggregator] = {}
        for ev in events:
            self._meter(ev, touched, deferred)
        metered = time.monotonic()
        self._skip_revoked(events, await self._emit(touched))
        self._batch_ended = time.monotonic()
        self.timings["metering"] += metered - started
        self.timings["delivery"] += self._batch_ended - metered
        while deferred:
            self.counts["deferred"] += len(deferred)
            for p in sorted({ev.message.partition for ev in deferred}):
                await self._wait_gate(p)
            retry: list[Any] = []
            touched = {}
            for ev in deferred:
                self._meter(ev, touched, retry)
            self._skip_revoked(deferred, await self._emit(touched))
            deferred = retry

    async def _wait_gate(self, p: int) -> None:
        """Until partition p's CURRENT gate is open (an assignment may replace the gate while we wait)."""
        started = time.monotonic()
        warned = False
        while True:
            gate = self.gates.get(p)
            if gate is None or gate.is_set():
                return
            try:
                await asyncio.wait_for(gate.wait(), timeout=0.5)
            except TimeoutError:
                if not warned and time.monotonic() - started > 60:
                    log.warning("deferred_events_waiting", partition=p, waited_s=round(time.monotonic() - started))
                    warned = True

    def _meter(self, ev: Any, touched: dict[int, PartitionAggregator], deferred: list[Any]) -> None:
        message = ev.message
        p = message.partition
        gate = self.gates.get(p)
        if gate is None:  # an event before our assignment hook ran: hold it until the hook seeds p
            gate = self.gates[p] = asyncio.Event()
        if not gate.is_set():
            deferred.append(ev)
            return
        aggregator = self.aggregators.get(p)
        if aggregator is None:  # no longer ours: skipped, and never acked
            self.counts["unowned"] += 1
            _never_ack(message)
            return
        assert self.catalog is not None  # gates open only after the catalog is loaded
        arrival = datetime.fromtimestamp(message.timestamp, UTC) if message.timestamp else datetime.now(UTC)
        rejections = aggregator.process(offset=message.offset, value=message.value, arrival=arrival,
                                        catalog=self.catalog)
        touched[id(aggregator)] = aggregator
        for rejection in rejections:
            self._dead_letter(rejection, p, message.offset, message.key)
        if aggregator.checkpoint_full():  # bounded size: cut at this message, the batch goes on
            checkpoint = aggregator.checkpoint()
            if checkpoint is not None:
                if self._letters_unflushed:  # rare (a full checkpoint): block briefly, see _emit
                    self._require_delivered(self.producer.flush(self.settings.delivery_timeout_s))
                self._send_checkpoint(checkpoint)

    def _dead_letter(self, rejection: Rejection, partition: int, offset: int, key: bytes | None) -> None:
        message = dead_letter_message(rejection, source_topic=self.usage_topic, partition=partition,
                                      offset=offset, now=datetime.now(UTC))
        self._produce(self.dlq_topic, key, message.value, headers=list(message.headers))
        self._letters_unflushed += 1
        self.counts["dead_letters"] += 1
        streams_metrics.DEAD_LETTERS.labels(rejection.reason).inc()

    def _produce(self, topic: str, key: bytes | None, value: bytes,
                 headers: list[tuple[str, str | bytes | None]] | None = None) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=headers, on_delivery=self._on_delivery)
                return
            except BufferError:  # local queue full: let deliveries drain
                self.producer.poll(0.05)

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._delivery_errors.append(f"{msg.topic()}: {err}")

    async def _emit(self, touched: dict[int, PartitionAggregator]) -> set[int]:
        """One checkpoint per touched aggregator, then wait for the broker to have all of them (and the dead
        letters of the batch). Keyed by source partition so one partition's checkpoints stay in order.

        A revoked owner never emits after the handover: an aggregator that is no longer the partition's
        current one (revoked, or replaced by a re-seed, while this batch ran) emits nothing; the partitions
        returned are those whose events of this batch must not be acked (``_skip_revoked``)."""
        self.not_flushing.clear()
        revoked: set[int] = set()
        try:
            if self._letters_unflushed:
                # Dead letters first, acknowledged, THEN the checkpoints that cover their offsets. Produced
                # together, a kill -9 after the broker acked a checkpoint but before it acked a letter lost the
                # letter for good: the ledger applied the offset, so no later owner meters it again (found by
                # bench/chaos: one hostile event of 345 missing from the dead-letter topic after 18 kills).
                # Costs one more broker round trip, only in batches that dead-letter something.
                self._require_delivered(await self.io(self.producer.flush, self.settings.delivery_timeout_s))
            for aggregator in touched.values():
                if self.aggregators.get(aggregator.partition) is not aggregator:
                    revoked.add(aggregator.partition)
                    continue
                checkpoint = aggregator.checkpoint()
                if checkpoint is not None:
                    self._send_checkpoint(checkpoint)
            self._require_delivered(await self.io(self.producer.flush, self.settings.delivery_timeout_s))
        finally:
            self.not_flushing.set()
        return revoked

    def _require_delivered(self, remaining: int) -> None:
        """After a flush: everything produced so far is acknowledged, or the process ends (nothing of the batch
        is acked to faust, so a new owner meters it again)."""
        if remaining or self._delivery_errors:
            _die("checkpoint_delivery_failed", undelivered=remaining, errors=self._delivery_errors[:5])
        self._letters_unflushed = 0

    def _skip_revoked(self, events: Sequence[Any], revoked: set[int]) -> None:
        if revoked:
            log.info("revoked_partitions_not_emitted", partitions=sorted(revoked))
            for ev in events:
                if ev.message.partition in revoked:
                    _never_ack(ev.message)

    def _send_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Queue one checkpoint; it counts as emitted for the seeding wait from now on (the batch flushes it
        before returning, or the process ends)."""
        now = datetime.now(UTC)
        self._produce(self.charges_topic, f"{self.usage_topic}:{checkpoint.partition}".encode(),
                      checkpoint.to_json(emitted_at=now, owner_epoch=self.epochs.get(checkpoint.partition, 0)))
        self.counts["checkpoints"] += 1
        streams_metrics.CHECKPOINTS_EMITTED.inc()
        self.last_emitted[checkpoint.partition] = max(self.last_emitted.get(checkpoint.partition, -1),
                                                      checkpoint.as_of_offset)

    def export_outcomes(self) -> None:
        """Add what each current aggregator counted since the last export to the event counters (after a batch
        whose checkpoints were acknowledged). A partition re-seeded or revoked mid-batch has a new or no aggregator:
        what the old one counted is not exported, because its events are read again by the partition's next owner."""
        exported = self._exported
        for p in [p for p, (aggregator, _) in exported.items() if self.aggregators.get(p) is not aggregator]:
            del exported[p]
        for p, aggregator in self.aggregators.items():
            before = exported.get(p)
            streams_metrics.export_outcomes(aggregator.stats, before[1] if before is not None else None)
            exported[p] = (aggregator, dataclasses.replace(aggregator.stats))

    def stats(self) -> dict[str, Any]:
        totals: dict[str, int] = {}
        for aggregator in self.aggregators.values():
            for name, value in vars(aggregator.stats).items():
                totals[name] = totals.get(name, 0) + value
        return {**self.counts, **totals, **{f"{k}_s": round(v, 2) for k, v in self.timings.items()},
                "partitions": sorted(self.aggregators)}

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)
        if self._offsets_reader is not None:
            self._offsets_reader.close()
        if self._engine is not None:
            self._engine.dispose()
        self.pool.shutdown(wait=False)


def create_app(settings: StreamsSettings, *, partitions: int | None = None) -> faust.App:
    """A faust app metering ``usage.events.v1``; nothing connects until the app starts."""
    runtime = Runtime(settings, partitions=partitions)
    faust_transport.register()  # aiokafka with a short fetch wait (streams/faust_transport.py)
    # "faust-confluent" (faust's own confluent driver) is kept only to measure it: streams/README.md "Consumer"
    scheme = "confluent" if settings.consumer == "faust-confluent" else faust_transport.SCHEME
    brokers = ";".join(f"{scheme}://{b.strip()}" for b in settings.kafka_bootstrap_servers.split(","))
    app = faust.App(
        runtime.group_id,
        broker=brokers,
        processing_guarantee="at_least_once",  # exactly_once fails on this broker; correctness is ours
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=max(0.5, settings.broker_session_timeout_s / 4),
        broker_commit_interval=1.0,
        consumer_max_fetch_size=settings.consumer_max_fetch_bytes,
        topic_disable_leader=True,
        topic_allow_declare=False,
        web_enabled=settings.web_port > 0,
        web_port=settings.web_port or 6066,
        web_bind="127.0.0.1",
        datadir=tempfile.mkdtemp(prefix="meterline-streams-"),
        stream_wait_empty=False,
    )
    app.meterline = runtime  # type: ignore[attr-defined]
    if settings.consumer == "confluent":
        _consume_in_batches(app, runtime, settings)
    else:
        _consume_with_faust(app, runtime, settings)

    @app.timer(interval=settings.catalog_refresh_ms / 1000)  # type: ignore[untyped-decorator]
    async def refresh_catalog() -> None:
        await runtime.refresh_catalog()

    @app.timer(interval=1.0)  # type: ignore[untyped-decorator]
    async def observe() -> None:
        runtime.record_observations()

    @app.timer(interval=10.0)  # type: ignore[untyped-decorator]
    async def report() -> None:
        log.info("streams_stats", **runtime.stats())

    return app


class _Batch:
    """One channel item: a consumer batch and the future the agent resolves once the batch returned."""

    __slots__ = ("done", "records")

    def __init__(self, records: list[Record], done: asyncio.Future[None]) -> None:
        self.records = records
        self.done = done


def _consume_in_batches(app: faust.App, runtime: Runtime, settings: StreamsSettings) -> None:
    """The agent meters batches of a confluent-kafka consumer, one faust channel item per batch; faust's own Kafka
    consumer and producer are not started (streams/batch_consumer.py: why, and the commit/rebalance semantics)."""
    app.boot_strategy = BootStrategy(app, enable_kafka=False)
    consumer = BatchConsumer(bootstrap=settings.kafka_bootstrap_servers, group_id=runtime.group_id,
                             topic=runtime.usage_topic, session_timeout_s=settings.broker_session_timeout_s,
                             max_fetch_bytes=settings.consumer_max_fetch_bytes, on_assigned=runtime.on_assigned)
    app.meterline_consumer = consumer  # type: ignore[attr-defined]
    batches = app.channel()
    subscribed = asyncio.Event()

    @app.agent(batches, name="meter")
    async def meter(stream: Any) -> None:
        subscribed.set()  # the stream exists: a batch sent to the channel from now on reaches it
        async for batch in stream:
            try:
                await runtime.handle_batch(batch.records)
            finally:  # handle_batch returns, or ends the process (never unwinds into a commit)
                batch.done.set_result(None)

    @app.task  # type: ignore[untyped-decorator]
    async def consume() -> None:
        # faust suspends its channels' queues until its own Kafka consumer resumes them after a rebalance; that
        # consumer is not started here, and rebalances are handled by BatchConsumer between batches
        app.flow_control.resume()
        await subscribed.wait()
        try:
            await consumer.start()
            loop = asyncio.get_running_loop()
            while True:  # serial: consume -> meter and checkpoint (acknowledged) -> commit
                # the window opens when the previous batch is done, as take_events does: one flush — one ledger
                # posting per active wallet — per window + work (opening it when the previous batch was taken
                # doubled the checkpoints at 20k/s for no clear latency gain, docs/benchmarks.md)
                records = await consumer.take(settings.consume_messages_max, settings.flush_ms_max / 1000,
                                              bytes_max=settings.consume_bytes_max)
                if not records:
                    runtime.record_observations()
                    continue
                done: asyncio.Future[None] = loop.create_future()
                await batches.send(value=_Batch(records, done))
                await done
                await consumer.commit(records)
        except asyncio.CancelledError:  # shutdown; a batch in flight ends the process in handle_batch
            raise
        except BaseException as exc:  # a fatal consumer error or a failed assignment hook: restart, commit nothing
            _die("consumer_failed_exiting_without_commit", error=repr(exc))

    runtime.highwater = consumer.high_watermark


def _consume_with_faust(app: faust.App, runtime: Runtime, settings: StreamsSettings) -> None:
    """faust's aiokafka consumer and ``take_events`` (one faust Event per Kafka message)."""
    topic = app.topic(runtime.usage_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                      value_serializer="raw", allow_empty=True)

    @app.agent(topic, name="meter")
    async def meter(stream: Any) -> None:  # a faust Stream (take_events is not on StreamT)
        async for events in stream.take_events(settings.batch_events_max, within=settings.flush_ms_max / 1000):
            await runtime.handle_batch(events)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(app: faust.App, assigned: set[Any], **_: Any) -> None:
        runtime.on_assigned(assigned)

    def highwater(p: int) -> Any:
        return app.consumer.highwater(TP(runtime.usage_topic, p))

    runtime.highwater = highwater


def check_startup(settings: StreamsSettings) -> int:
    """Loud refusals before faust starts: pending migrations, missing topics. Returns the usage partitions."""
    from pathlib import Path

    from ledger.schema_migrations import pending

    for component in ("ledger", "streams"):
        location = Path(__file__).resolve().parent.parent / component / "migrations"
        todo = pending(settings.database_url, script_location=location, version_table=f"alembic_version_{component}")
        if todo:
            raise PendingMigrations(f"{component} migrations are pending ({', '.join(todo)}); "
                                    "run `meterline migrate` first")
    prefix = settings.topic_prefix
    found = require_topics(settings.kafka_bootstrap_servers, [topic_name(TOPIC_USAGE_EVENTS, prefix),
                                                              topic_name(TOPIC_USAGE_DLQ, prefix),
                                                              topic_name(TOPIC_LEDGER_CHARGES, prefix)])
    return found[topic_name(TOPIC_USAGE_EVENTS, prefix)]


def main() -> None:
    import sys

    settings = get_settings()
    try:
        partitions = check_startup(settings)
    except Exception as exc:
        if getattr(exc, "code", None):
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    app = create_app(settings, partitions=partitions)
    runtime: Runtime = app.meterline  # type: ignore[attr-defined]
    runtime._load_catalog_sync(force=True)
    with runtime.engine.connect() as conn:
        runtime.source_id = current_identity(conn, runtime.usage_topic)
    log.info("streams_worker_starting", group=runtime.group_id, topic=runtime.usage_topic,
             source_id=runtime.source_id, partitions=partitions,
             worker_index=settings.worker_index, flush_ms_max=settings.flush_ms_max, consumer=settings.consumer)
    probes = None
    if settings.metrics_port >= 0:
        probes = start_probe_server(f"streams-{settings.worker_index}", host=settings.metrics_host,
                                    port=settings.metrics_port, checks=runtime.readiness_checks())
    freeze_startup_heap()  # a full GC pass over faust's import-time heap would stall the event loop
    worker = faust.Worker(app, loglevel=logging.getLevelName(logging.getLogger().level), override_logging=False,
                          quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        if probes is not None:
            probes.stop()
        consumer = getattr(app, "meterline_consumer", None)
        if consumer is not None:
            consumer.close_sync()
        runtime.close()
