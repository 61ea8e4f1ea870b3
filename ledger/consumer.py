"""The ledger consumer (``meterline run ledger``): applies ChargeCheckpoints from ledger.charges.v1 and
runs the outbox relay.

Per fetched batch: decode, cutting each source partition's consecutive checkpoints into merge chunks as they come
(``ledger/lane_chunks.py``: counters a later checkpoint of the chunk lists again are dropped at once, so a chunk's
memory is its distinct keys) → each chunk merged by ``apply_checkpoints`` in one PostgreSQL transaction (partitions
with few counters in hand: several together, ``apply_partitions``) → commit. Kafka offsets are committed only AFTER the
database commit, so a crash in between redelivers checkpoints the ledger has
already applied — which ``apply_checkpoint`` answers with ``stale`` (a no-op). Messages of one partition
are applied strictly in order by one thread; several ledger consumers share the partitions through the
consumer group (a rebalance hands a partition over at a committed offset, and the offset mark in
PostgreSQL makes any overlap harmless).

- One bad checkpoint never stops the pipeline (DESIGN §2 invariant 8): a checkpoint that cannot be applied
  (any error: a database error, a value PostgreSQL refuses such as an integer beyond 64 bits, a bug) HALTS
  its own source partition only (``ledger/halts.py``): it and every later checkpoint of that partition are
  kept in order, nothing is skipped, the other partitions go on. The halt is loud — an error log with the
  reason, a ``partition_halts`` row (``ledger.queries.partition_halts``, shown by the API's health and the
  dashboard), the periodic stats line — and the lane is retried with backoff until it applies, then resumes
  by itself. The charges partition's group offset is held at the lane's first pending message meanwhile,
  so a restart fetches the queue again.
- An undecodable message (not JSON, or not a ChargeCheckpoint) is never skipped either: it halts its
  charges partition the same way (its source partition is unknowable), until a ledger that can read it runs.
- Start-up refuses loudly when topics are missing or ledger migrations are pending.
"""

from __future__ import annotations

import os
import signal
import socket
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
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from ledger import metrics, schema_migrations
from ledger.checkpoints import Key, apply_partitions, posting_key
from ledger.contracts import TOPIC_LEDGER_CHARGES, TOPIC_LEDGER_TRANSACTIONS, ChargeCheckpoint
from ledger.db import make_engine
from ledger.fencing import check_charges_partitions
from ledger.halts import HaltedLane, Halts, Lane, Pending
from ledger.kafka import (
    LagRecorder,
    make_consumer,
    make_producer,
    message_position,
    require_topics,
    topic_name,
)
from ledger.known_wallets import KnownWallets
from ledger.lane_chunks import ChunkCutter, chunks_of
from ledger.outbox import OutboxRelay
from ledger.probes import Check, database_check, start_probe_server
from ledger.runtime import cyclic_gc_paused, freeze_startup_heap, tune_gc_for_batches
from ledger.settings import LedgerSettings, get_settings
from ledger.settle import run_settler, settle_all

__all__ = ["ConsumerStats", "LedgerConsumer", "MigrationsPending", "main", "run"]

log = structlog.get_logger("ledger.consumer")

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_ledger"


#: messages taken from the client's queue at a time while filling a batch (fewer near the byte bound: as many as
#: fit if they are as large as the batch's so far, at least one)
FETCH_CHUNK_MESSAGES = 8
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
    #: lanes that halted / resumed (ledger/halts.py), failed retries of halted lanes
    halts: int = 0
    resumes: int = 0
    halt_retries: int = 0
    #: checkpoints refused because their owner epoch is older than the partition's (fencing, a no-op)
    fenced: int = 0
    #: fetched batches, and the most bytes of messages one of them held (``consumer_batch_bytes_max`` bounds it)
    batches: int = 0
    batch_bytes_max: int = 0


class ApplyFailed(Exception):
    """Applying a lane's checkpoints failed after ``done`` of them were applied (committed)."""

    def __init__(self, done: int, reason: str, error: str) -> None:
        super().__init__(error)
        self.done, self.reason, self.error = done, reason, error


def _failure(exc: BaseException) -> tuple[str, str]:
    """(stable reason code, one-line error) of an apply failure."""
    if isinstance(exc, DBAPIError):
        return "database_error", str(exc.orig or exc).splitlines()[0]
    return "apply_failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class LedgerConsumer:
    def __init__(self, *, settings: LedgerSettings, engine: Engine, stop: threading.Event,
                 apply_threads: int | None = None) -> None:
        self._settings = settings
        # source partitions are independent: their merged checkpoints are applied concurrently, each on its
        # own connection (lock order applied_offsets → usage_charges → wallets keeps shared keys deadlock-free)
        threads = settings.consumer_apply_threads if apply_threads is None else apply_threads
        self._pool = (ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ledger-apply")
                      if threads > 1 else None)
        self._stats_lock = threading.Lock()
        self._engine = engine
        self._stop = stop
        self.topic = topic_name(TOPIC_LEDGER_CHARGES, settings.topic_prefix)
        self.stats = ConsumerStats()
        self.halts = Halts(backoff_s_max=settings.consumer_retry_backoff_s_max)
        self._known_wallets = KnownWallets()  # step 2 skips wallets seen before (shared by the apply threads)
        self.name = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        #: charges partition -> the next offset fetched (what may be committed when nothing of it is pending)
        self._fetched: dict[int, int] = {}
        self._committed: dict[int, int] = {}
        #: charges partitions whose fetching is paused because a halted lane queued ``halted_pending_max``
        self._paused: set[int] = set()
        self._consumer: Consumer | None = None
        #: seconds per step (in the periodic stats log: where the consumer's time goes)
        self.timings = {"poll_wait": 0.0, "decode": 0.0, "apply": 0.0, "commit": 0.0}
        # readiness (read by the probe thread): the assignment (None until the first one), the loop's last turn,
        # (a lane halted for HALTED_AFTER_S or longer makes it not ready: self.halts)
        self.assigned: set[int] | None = None
        self._lag = LagRecorder(settings.consumer_group)
        self.loop_turned_at = time.monotonic()

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
        halted = {f"{t}[{p}]": round(now - h.halted_at, 1) for h in list(self.halts.lanes())
                  for _, t, p in [h.lane] if now - h.halted_at >= HALTED_AFTER_S}
        return (not halted, f"halted for: {halted}" if halted else "applying")

    def run(self) -> None:
        # the client prefetches up to the batch's byte bound, so that a batch can reach it (librdkafka's default,
        # 64 MiB, is also the bound's default); 2,097,151 KiB is librdkafka's maximum
        prefetch_kib = min(2_097_151, max(1, self._settings.consumer_batch_bytes_max // 1024))
        consumer = make_consumer(self._settings.kafka_bootstrap_servers, self._settings.consumer_group,
                                 session_timeout_ms=self._settings.consumer_session_timeout_ms,
                                 **{"queued.max.messages.kbytes": prefetch_kib})
        consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_revoke)
        self._consumer = consumer
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
                first = consumer.poll(0.5 if not self.halts else 0.1)
                self.timings["poll_wait"] += time.monotonic() - polled
                messages = self._take_fetched(consumer, first) if first is not None else []
                if messages:
                    metrics.QUEUE_CHECKPOINTS.set(len(messages))
                    self._handle_batch(consumer, messages)
                    metrics.QUEUE_CHECKPOINTS.set(0)
                    self._lag.record(consumer)
                    last_lag = time.monotonic()
                if self.halts:
                    self._retry_due(consumer)
                if time.monotonic() - last_report > 10:
                    log.info("ledger_consumer_stats", **self._stats_fields())
                    self._clear_resolved_halts()
                    last_report = time.monotonic()
        finally:
            log.info("ledger_consumer_stopping", **self._stats_fields())
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            consumer.close()  # leaves the group at once, so a peer takes the partitions without waiting

    def _take_fetched(self, consumer: Consumer, first: Message) -> list[Message]:
        """``first`` and what the client has already fetched, without waiting: at most
        ``consumer_batch_messages_max`` messages, and no more once their bytes reach ``consumer_batch_bytes_max``.

        A batch is decoded whole (a checkpoint of 4,000 counters, many wallets, is ~1.4 MB fetched and ~12 MB
        decoded), so its bytes are the consumer's memory under a backlog. librdkafka's prefetch queue bounded it
        too, but softly and by the client's settings; this bound is the consumer's own. What is left stays in the
        client's queue for the next batch."""
        messages = [first]
        size = len(first.value() or b"")
        messages_max, bytes_max = self._settings.consumer_batch_messages_max, self._settings.consumer_batch_bytes_max
        while len(messages) < messages_max and size < bytes_max:
            room = max(1, int((bytes_max - size) / (size / len(messages) or 1)))  # messages like these that fit
            chunk = consumer.consume(min(FETCH_CHUNK_MESSAGES, messages_max - len(messages), room), 0)
            if not chunk:
                break
            messages.extend(chunk)
            size += sum(len(m.value() or b"") for m in chunk)
        with self._stats_lock:
            self.stats.batches += 1
            self.stats.batch_bytes_max = max(self.stats.batch_bytes_max, size)
        return messages

    # -- the group -------------------------------------------------------------------------------------------

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned = (self.assigned or set()) | {p.partition for p in partitions}
        self._lag.assign(partitions)
        log.info("partitions_assigned", partitions=sorted(p.partition for p in partitions))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {p.partition for p in partitions}
        self.assigned = (self.assigned or set()) - revoked
        self._lag.revoke(partitions)
        log.info("partitions_revoked", partitions=sorted(revoked))
        for halted in self.halts.drop_charges_partitions(revoked):
            # the group offset was held at its first pending message: the next owner fetches the queue again
            log.warning("halted_partition_handed_over", scope=halted.lane[0], topic=halted.lane[1],
                        partition=halted.lane[2], pending_checkpoints=len(halted.pending))
        for p in revoked:
            self._fetched.pop(p, None)
            self._committed.pop(p, None)
            self._paused.discard(p)  # a new assignment starts unpaused

    # -- batches ---------------------------------------------------------------------------------------------

    def _handle_batch(self, consumer: Consumer, messages: list[Message]) -> None:
        """Apply what was fetched, then commit each charges partition up to what is done.

        Consecutive checkpoints of one source partition (in arrival order) are applied as ONE merged
        checkpoint in one database transaction (``apply_checkpoints``: the stale rule is still decided per
        checkpoint). While the ledger keeps up a batch holds one checkpoint per partition; when it falls
        behind, the backlog is merged, so its cost per event falls exactly when it is the bottleneck.
        Source partitions are independent, so their order between groups is free; within a group it is
        the arrival order. A group that fails halts its lane (ledger/halts.py); messages of a lane that is
        already halted queue behind it. If the process is stopped mid-batch nothing is committed: the
        redelivered checkpoints that were applied are then stale."""
        started = time.monotonic()
        groups: dict[Lane, list[Pending]] = {}
        with cyclic_gc_paused():
            self._decode_batch(messages, groups)
        decoded = time.monotonic()
        self.timings["decode"] += decoded - started
        if not self._apply_groups(groups):
            return  # stopped: commit nothing
        applied = time.monotonic()
        self.timings["apply"] += applied - decoded
        self._commit(consumer)
        self.timings["commit"] += time.monotonic() - applied

    def _decode_batch(self, messages: list[Message], groups: dict[Lane, list[Pending]]) -> None:
        """Decode ``messages`` in order and route each to its lane's group, cut into merge chunks as it goes
        (ledger/lane_chunks.py: a chunk's memory is its distinct keys), or to a halted lane's queue."""
        cutter = ChunkCutter(counters_max=MERGE_COUNTERS_MAX, dedupe_keys_max=MERGE_DEDUPE_KEYS_MAX)
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("kafka_consume_error", error=str(error))
                continue
            cp, offset = _partition(message), _offset(message)
            size = len(message.value() or b"")
            self._fetched[cp] = offset + 1
            charges_lane: Lane = ("charges", self.topic, cp)
            if charges_lane in self.halts:  # behind an undecodable message of this charges partition
                self.halts.add(charges_lane, Pending(cp, offset, None, message.value(), size))
                self._bound(charges_lane)
                continue
            checkpoint = self._decode(message)
            if checkpoint is None:
                self._halt(charges_lane, [Pending(cp, offset, None, message.value(), size)], "undecodable",
                           "the message is not a ChargeCheckpoint (see undecodable_checkpoint)")
                continue
            lane: Lane = ("source", checkpoint.source_topic, checkpoint.partition)
            if lane in self.halts:
                self._route(groups, Pending(cp, offset, checkpoint, size=size))
            else:
                groups.setdefault(lane, []).append(cutter.add(lane, Pending(cp, offset, checkpoint, message.value(),
                                                                           size)))
        cutter.finish()

    def _route(self, groups: dict[Lane, list[Pending]], pending: Pending) -> None:
        assert pending.checkpoint is not None
        lane: Lane = ("source", pending.checkpoint.source_topic, pending.checkpoint.partition)
        if lane in self.halts:
            self.halts.add(lane, pending)
            self._bound(lane)
        else:
            groups.setdefault(lane, []).append(pending)

    def _apply_groups(self, groups: dict[Lane, list[Pending]]) -> bool:
        """Apply each lane's group; a failing group halts its lane. False only when stopped.

        Lanes whose group is one small merged chunk are applied together, several partitions in one database
        transaction (``apply_partitions``, at most ``COMBINE_COUNTERS_MAX`` counters per transaction, spread over
        ``COMBINE_TRANSACTIONS`` transactions side by side): a statement's fixed cost is then paid once for
        several partitions. If such a transaction fails, its lanes are
        applied one by one as usual, so only the lane that cannot be applied halts (invariant 8)."""
        units: list[list[LaneGroup]] = []
        small: list[tuple[int, LaneGroup]] = []
        for lane, pendings in groups.items():
            chunks = _chunks(pendings)
            size = (sum(len(p.checkpoint.counters) for p in chunks[0] if p.checkpoint is not None) if len(chunks) == 1
                    else COMBINE_COUNTERS_MAX + 1)
            if size > COMBINE_COUNTERS_MAX:
                units.append([(lane, pendings)])
            else:
                small.append((size, (lane, pendings)))
        units.extend(_combine(small, bins=COMBINE_TRANSACTIONS))
        if len(units) <= 1 or self._pool is None:
            done = [self._apply_unit(unit) for unit in units]
        else:
            done = list(self._pool.map(self._apply_unit, units))
        for unit, results in zip(units, done, strict=True):
            for (lane, pendings), result in zip(unit, results, strict=True):
                if isinstance(result, ApplyFailed):
                    self._halt(lane, [_as_fetched(p) for p in pendings[result.done:]], result.reason, result.error)
        return not self._stop.is_set()

    def _apply_unit(self, unit: list[LaneGroup]) -> list[ApplyFailed | None]:
        """Several small lanes in one transaction (each lane's checkpoints merged), else lane by lane."""
        if len(unit) > 1:
            try:
                self._apply([[p.checkpoint for p in pendings if p.checkpoint is not None] for _, pendings in unit])
                return [None] * len(unit)
            except Exception as exc:  # rolled back: apply lane by lane, so that only the failing lane halts
                log.warning("combined_apply_failed", lanes=[f"{t}[{p}]" for (_, t, p), _ in unit], error=repr(exc))
        return [self._apply_lane(pendings) for _, pendings in unit]

    def _apply_lane(self, pendings: list[Pending]) -> ApplyFailed | None:
        """One lane's checkpoints, in order (one thread at a time per lane). Never raises: a failure is
        returned with how many checkpoints were applied (committed) before it."""
        done = 0
        for chunk in _chunks(pendings):
            try:
                self._apply([[p.checkpoint for p in chunk if p.checkpoint is not None]])
            except Exception as exc:  # any failure halts the lane; nothing crashes the process
                if len(chunk) == 1:
                    reason, error = _failure(exc)
                    return ApplyFailed(done, reason, error)
                # a merged chunk failed: apply its checkpoints one by one, as fetched, so the lane halts exactly
                # at the one that cannot be applied and everything before it is charged
                for pending in chunk:
                    checkpoint = _as_fetched(pending).checkpoint
                    assert checkpoint is not None
                    try:
                        self._apply([[checkpoint]])
                    except Exception as single:
                        reason, error = _failure(single)
                        return ApplyFailed(done, reason, error)
                    done += 1
                continue
            done += len(chunk)
        return None

    def _apply(self, partitions: list[list[ChargeCheckpoint]]) -> None:
        """One database transaction: each list is one source partition's consecutive checkpoints (merged)."""
        first_started = time.time()
        for checkpoints in partitions:
            for checkpoint in checkpoints:
                metrics.CHECKPOINT_QUEUE_SECONDS.observe(max(0.0, first_started - checkpoint.emitted_at.timestamp()))
        started = time.monotonic()
        try:
            with self._engine.begin() as conn:
                outcomes = apply_partitions(conn, partitions,
                                            settle_later=self._settings.usage_settle_interval_s > 0,
                                            known_wallets=self._known_wallets)
        except DBAPIError:
            self._known_wallets.clear()  # whatever failed, the retry checks every wallet again
            metrics.DB_RETRIES.inc()
            with self._stats_lock:
                self.stats.db_retries += 1
            raise
        metrics.APPLY_SECONDS.observe(time.monotonic() - started)
        committed_at = time.time()
        for checkpoints in partitions:
            for checkpoint in checkpoints:
                metrics.CHECKPOINT_EMIT_TO_APPLY_SECONDS.observe(
                    max(0.0, committed_at - checkpoint.emitted_at.timestamp()))
        with self._stats_lock:
            self.stats.apply_transactions += 1
        for checkpoints, merged in zip(partitions, outcomes, strict=True):
            metrics.CHECKPOINTS.labels("applied").inc(merged.applied)
            metrics.CHECKPOINTS.labels("stale").inc(merged.stale)
            with self._stats_lock:
                self.stats.applied += merged.applied
                self.stats.stale += merged.stale
                self.stats.fenced += merged.fenced
                self.stats.transactions += merged.outcome.transactions
            if merged.fenced:  # a no-op by design (a previous owner's checkpoints after a handover), not an error
                log.info("checkpoint_fenced", source_topic=checkpoints[0].source_topic,
                         source_partition=checkpoints[0].partition, fenced=merged.fenced,
                         owner_epoch=merged.owner_epoch,
                         epochs=sorted({c.owner_epoch for c in checkpoints if c.owner_epoch < merged.owner_epoch}))

    # -- halts -----------------------------------------------------------------------------------------------

    def _halt(self, lane: Lane, pendings: list[Pending], reason: str, error: str) -> None:
        halted = self.halts.halt(lane, pendings, reason=reason, error=error, now=time.monotonic())
        with self._stats_lock:
            self.stats.halts += 1
        log.error("partition_halted", scope=lane[0], topic=lane[1], partition=lane[2], reason=reason, error=error,
                  as_of=halted.as_of_offset, charges_partition=halted.first.charges_partition,
                  charges_offset=halted.first.charges_offset,
                  retry_in_s=round(halted.next_retry_at - time.monotonic(), 2))
        self._record_halt(halted)

    def _retry_due(self, consumer: Consumer) -> None:
        """Retry every halted lane whose backoff has passed; a lane that applies resumes by itself."""
        progressed = False
        for halted in self.halts.due(time.monotonic()):
            if self._stop.is_set():
                return
            lane = halted.lane
            if lane[0] == "charges":
                progressed |= self._retry_charges_lane(halted)
                continue
            result = self._apply_lane(halted.pending)
            if result is None:
                self._resumed(lane)
                progressed = True
                continue
            if result.done:
                self.halts.applied_through(lane, result.done)
                progressed = True
            self._failed_again(lane, result.reason, result.error)
        if progressed:
            self._unbound()
            self._commit(consumer)

    def _retry_charges_lane(self, halted: HaltedLane) -> bool:
        """Decode the queue of a charges partition again; what decodes is routed to its source lane, up to the
        first message that still does not decode."""
        decoded = 0
        groups: dict[Lane, list[Pending]] = {}
        for pending in halted.pending:
            checkpoint = pending.checkpoint or _decode_bytes(pending.raw)
            if checkpoint is None:
                break
            self._route(groups, Pending(pending.charges_partition, pending.charges_offset, checkpoint,
                                        size=pending.size))
            decoded += 1
        if decoded == len(halted.pending):
            self._resumed(halted.lane)
        else:
            self.halts.applied_through(halted.lane, decoded)
            self._failed_again(halted.lane, "undecodable", halted.error)
        self._apply_groups(groups)
        return decoded > 0

    def _failed_again(self, lane: Lane, reason: str, error: str) -> None:
        halted = self.halts.failed_again(lane, reason=reason, error=error, now=time.monotonic())
        with self._stats_lock:
            self.stats.halt_retries += 1
        log.error("partition_still_halted", scope=lane[0], topic=lane[1], partition=lane[2], reason=reason,
                  error=error, attempts=halted.attempts, as_of=halted.as_of_offset,
                  pending_checkpoints=len(halted.pending), retry_in_s=round(halted.backoff_s, 2))
        self._record_halt(halted)

    def _bound(self, lane: Lane) -> None:
        """Memory bound of a halted lane: once it queues ``consumer_halted_pending_max`` messages or
        ``consumer_halted_pending_bytes_max`` bytes of them, stop fetching its charges partition (librdkafka drops
        what it prefetched and, on resume, fetches again from the last message handed to us). Other lanes of that
        charges partition wait too — only under this pressure."""
        halted = self.halts.get(lane)
        if halted is None or not self._over_bound(halted):
            return
        cp = halted.pending[-1].charges_partition
        if cp in self._paused or self._consumer is None:
            return
        self._consumer.pause([TopicPartition(self.topic, cp)])
        self._paused.add(cp)
        log.warning("charges_partition_paused", charges_partition=cp, scope=lane[0], topic=lane[1],
                    partition=lane[2], pending_checkpoints=len(halted.pending), pending_bytes=halted.pending_bytes)

    def _over_bound(self, halted: HaltedLane) -> bool:
        return (len(halted.pending) >= self._settings.consumer_halted_pending_max
                or halted.pending_bytes >= self._settings.consumer_halted_pending_bytes_max)

    def _unbound(self) -> None:
        """Resume fetching the paused charges partitions no halted lane is over its bound on any more."""
        still = {m.charges_partition for h in self.halts.lanes() if self._over_bound(h) for m in h.pending[-1:]}
        for cp in sorted(self._paused - still):
            if self._consumer is not None:
                self._consumer.resume([TopicPartition(self.topic, cp)])
            self._paused.discard(cp)
            log.info("charges_partition_resumed", charges_partition=cp)

    def _resumed(self, lane: Lane) -> None:
        halted = self.halts.resume(lane)
        self._unbound()
        with self._stats_lock:
            self.stats.resumes += 1
        log.warning("partition_resumed", scope=lane[0], topic=lane[1], partition=lane[2], attempts=halted.attempts,
                    halted_s=round(time.monotonic() - halted.halted_at, 2))
        try:
            with self._engine.begin() as conn:
                conn.execute(_DELETE_HALT, {"scope": lane[0], "topic": lane[1], "partition": lane[2]})
        except Exception as exc:  # the periodic clean-up removes it later
            log.warning("partition_halt_row_not_cleared", error=str(exc).splitlines()[0])

    def _record_halt(self, halted: HaltedLane) -> None:
        """The operator-visible row (best effort: when PostgreSQL itself is down, the log says it)."""
        scope, topic, partition = halted.lane
        try:
            with self._engine.begin() as conn:
                conn.execute(_UPSERT_HALT, {
                    "scope": scope, "topic": topic, "partition": partition, "reason": halted.reason,
                    "error": halted.error[:2000], "as_of": halted.as_of_offset,
                    "cp": halted.first.charges_partition, "co": halted.first.charges_offset,
                    "pending": len(halted.pending), "attempts": halted.attempts, "consumer": self.name})
        except Exception as exc:
            log.error("partition_halt_not_recorded", scope=scope, topic=topic, partition=partition,
                      error=str(exc).splitlines()[0])

    def _clear_resolved_halts(self) -> None:
        """Rows of lanes another consumer (or an earlier life of this one) halted and that have applied since."""
        try:
            with self._engine.begin() as conn:
                conn.execute(_CLEAR_RESOLVED_HALTS, {"consumer": self.name,
                                                     "held": [f"{s}|{t}|{p}" for s, t, p in
                                                              (h.lane for h in self.halts.lanes())]})
        except Exception as exc:
            log.warning("partition_halts_cleanup_failed", error=str(exc).splitlines()[0])

    # -- commits ---------------------------------------------------------------------------------------------

    def _commit(self, consumer: Consumer) -> None:
        """Commit each charges partition's next offset, but never past a halted lane's first pending message."""
        offsets: list[TopicPartition] = []
        for cp, fetched in self._fetched.items():
            floor = self.halts.commit_floor(cp)
            target = fetched if floor is None else min(fetched, floor)
            if self._committed.get(cp, -1) != target:
                offsets.append(TopicPartition(self.topic, cp, target))
        if offsets:
            consumer.commit(offsets=offsets, asynchronous=False)
            for tp in offsets:
                self._committed[tp.partition] = tp.offset

    def _stats_fields(self) -> dict[str, object]:
        return {**vars(self.stats), **{f"{k}_s": round(v, 2) for k, v in self.timings.items()},
                "halted": [f"{s}:{t}:{p}" for s, t, p in (h.lane for h in self.halts.lanes())]}

    def _decode(self, message: Message) -> ChargeCheckpoint | None:
        checkpoint = _decode_bytes(message.value())
        if checkpoint is None:
            self.stats.undecodable += 1
            metrics.CHECKPOINTS.labels("undecodable").inc()
            log.error("undecodable_checkpoint", topic=message.topic(), partition=_partition(message),
                      offset=_offset(message), undecodable_total=self.stats.undecodable,
                      error=_decode_error(message.value()))
        return checkpoint


def _decode_bytes(value: bytes | None) -> ChargeCheckpoint | None:
    """pydantic's own JSON parser: half the time of orjson.loads + model_validate (7.9 vs 16.4 ms for a
    1,000-counter checkpoint), which built every dict and string first. Bad JSON is a ValidationError too."""
    try:
        return ChargeCheckpoint.model_validate_json(value or b"")
    except ValidationError:
        return None


def _decode_error(value: bytes | None) -> str:
    """The first line of what the whole model says (names the counter and field, e.g. ``counters.3.price``)."""
    try:
        ChargeCheckpoint.model_validate(orjson.loads(value or b""))
    except (orjson.JSONDecodeError, ValidationError) as exc:
        return str(exc).splitlines()[0]
    return ""


_UPSERT_HALT = text("""
    INSERT INTO partition_halts (scope, topic, partition, reason, error, as_of_offset, charges_partition,
                                 charges_offset, pending_checkpoints, attempts, consumer)
    VALUES (:scope, :topic, :partition, :reason, :error, :as_of, :cp, :co, :pending, :attempts, :consumer)
    ON CONFLICT (scope, topic, partition) DO UPDATE SET
        reason = EXCLUDED.reason, error = EXCLUDED.error, as_of_offset = EXCLUDED.as_of_offset,
        charges_partition = EXCLUDED.charges_partition, charges_offset = EXCLUDED.charges_offset,
        pending_checkpoints = EXCLUDED.pending_checkpoints, attempts = EXCLUDED.attempts,
        last_attempt_at = now(), consumer = EXCLUDED.consumer,
        halted_at = CASE WHEN partition_halts.consumer = EXCLUDED.consumer AND EXCLUDED.attempts > 1
                         THEN partition_halts.halted_at ELSE now() END
""")

_DELETE_HALT = text("DELETE FROM partition_halts WHERE scope = :scope AND topic = :topic AND partition = :partition")

# A source lane whose applied mark passed the checkpoint it halted on has resumed (here or elsewhere); a lane
# this consumer holds halted is never cleared. Charges lanes are cleared by the consumer that resumes them.
_CLEAR_RESOLVED_HALTS = text("""
    DELETE FROM partition_halts h USING applied_offsets a
    WHERE h.scope = 'source' AND a.source_topic = h.topic AND a.partition = h.partition
      AND a.applied_through >= h.as_of_offset
      AND NOT (h.scope || '|' || h.topic || '|' || h.partition = ANY(CAST(:held AS text[])))
""")


#: a merged application stays a bounded transaction: at most this many DISTINCT keys (the postings it makes)
#: and this many dedupe keys (one per event; stored as one array row per application). Distinct, not summed:
#: with many wallets nearly every counter of a checkpoint is a key no other checkpoint of the run lists, while
#: a backlog of a few wallets repeats the same keys — counting each listing capped a 100,000-wallet backlog's
#: merge at ~1.8 events per posting, though its postings are what the ledger's time goes to.
#: The dedupe bound is 1,000,000 (an 8 MB array row; a statement's cost is per key, so a row that large costs no more
#: per event): at 200,000 it, not the counters, cut a 100,000-wallet backlog's chunks once checkpoints carried their
#: real dedupe keys (~3 per counter): 264,871 postings instead of 209,384 (``bench.ledger_catchup --dedupe-keys``:
#: 50.1–53.1 s at 200,000, 45.3–48.2 s at 1,000,000).
MERGE_COUNTERS_MAX = 16_000
MERGE_DEDUPE_KEYS_MAX = 1_000_000
#: lanes with at most this many counters in hand are applied together, several in one transaction
#: (``bench.ledger_apply``: ~400 µs per posting at 110 keys per transaction, ~230 at 1,000)
COMBINE_COUNTERS_MAX = 1_000
#: ... in this many transactions side by side (two: one's Python overlaps the other's PostgreSQL work)
COMBINE_TRANSACTIONS = 2

LaneGroup = tuple[Lane, list[Pending]]


def _merge_chunks(checkpoints: list[ChargeCheckpoint]) -> list[list[ChargeCheckpoint]]:
    """Consecutive runs of ``checkpoints`` (order kept) within the merge bounds; never an empty run."""
    chunks: list[list[ChargeCheckpoint]] = []
    keys: set[Key] = set()
    dedupe = 0
    for checkpoint in checkpoints:
        new_keys = _posting_keys(checkpoint) - keys
        d = len(checkpoint.dedupe_keys)
        if chunks and (len(keys) + len(new_keys) > MERGE_COUNTERS_MAX or dedupe + d > MERGE_DEDUPE_KEYS_MAX):
            chunks.append([])
            keys, dedupe = set(), 0
            new_keys = _posting_keys(checkpoint)
        if not chunks:
            chunks.append([])
        chunks[-1].append(checkpoint)
        keys |= new_keys
        dedupe += d
    return chunks


def _combine(lanes: list[tuple[int, LaneGroup]], *, bins: int) -> list[list[LaneGroup]]:
    """Small lanes (with their counter counts) packed into at most ``bins`` transactions — one per free apply thread,
    so they still run side by side — each of at most ``COMBINE_COUNTERS_MAX`` counters (more transactions when
    they do not fit). Largest first, each into the lightest transaction it fits in."""
    packed: list[tuple[int, list[LaneGroup]]] = []
    for size, lane in sorted(lanes, key=lambda item: -item[0]):
        fits = [i for i, (total, _) in enumerate(packed) if total + size <= COMBINE_COUNTERS_MAX]
        if len(packed) < bins or not fits:
            packed.append((size, [lane]))
            continue
        i = min(fits, key=lambda j: packed[j][0])
        packed[i] = (packed[i][0] + size, [*packed[i][1], lane])
    return [unit for _, unit in packed]


def _chunks(pendings: list[Pending]) -> list[list[Pending]]:
    """A lane's merge chunks: as cut while decoding (ledger/lane_chunks.py), else (a halted lane's queue, which
    holds checkpoints as fetched) within the merge bounds by ``_merge_chunks``."""
    cut = chunks_of(pendings)
    if cut is not None:
        return cut
    decoded = [_as_fetched(p) for p in pendings if p.checkpoint is not None]  # never merge thinned ones here
    by_checkpoint = {id(p.checkpoint): p for p in decoded}
    return [[by_checkpoint[id(c)] for c in chunk] for chunk in _merge_chunks([p.checkpoint for p in decoded
                                                                              if p.checkpoint is not None])]


def _as_fetched(pending: Pending) -> Pending:
    """``pending`` with its checkpoint as fetched (a cut one lacks the counters its chunk superseded)."""
    if pending.chunk is None:
        return pending
    assert pending.raw is not None
    checkpoint = _decode_bytes(pending.raw)
    assert checkpoint is not None, "it decoded when it was fetched"
    return Pending(pending.charges_partition, pending.charges_offset, checkpoint, size=pending.size)


def _posting_keys(checkpoint: ChargeCheckpoint) -> set[Key]:
    return {posting_key(c) for c in checkpoint.counters}


def _partition(message: Message) -> int:
    return message_position(message)[1]


def _offset(message: Message) -> int:
    return message_position(message)[2]


def check_startup(settings: LedgerSettings) -> None:
    """Loud start-up refusals: pending ledger migrations, missing topics, a re-partitioned charges topic."""
    todo = schema_migrations.pending(settings.database_url, script_location=MIGRATIONS, version_table=VERSION_TABLE)
    if todo:
        raise MigrationsPending(f"ledger migrations are pending ({', '.join(todo)}); run `meterline migrate` first")
    charges = topic_name(TOPIC_LEDGER_CHARGES, settings.topic_prefix)
    found = require_topics(settings.kafka_bootstrap_servers,
                           [charges, topic_name(TOPIC_LEDGER_TRANSACTIONS, settings.topic_prefix)])
    engine = make_engine(settings.database_url, pool_size=1, application_name="meterline-ledger-startup")
    try:
        with engine.begin() as conn:
            check_charges_partitions(conn, charges, found[charges])  # a re-partitioned topic is refused
    finally:
        engine.dispose()


def run(settings: LedgerSettings, stop: threading.Event) -> ConsumerStats:
    """Consumer + outbox relay until ``stop`` is set. Usable from a thread (tests) or ``main``."""
    check_startup(settings)
    engine = make_engine(settings.database_url, pool_size=settings.db_pool_size, application_name="meterline-ledger")
    relay = OutboxRelay(engine=engine, producer=make_producer(settings.kafka_bootstrap_servers),
                        topic_prefix=settings.topic_prefix, batch_rows_max=settings.outbox_batch_rows_max,
                        poll_s=settings.outbox_poll_ms / 1000, delivery_timeout_s=settings.outbox_delivery_timeout_s)
    relay_thread = threading.Thread(target=relay.run, args=(stop,), name="ledger-outbox", daemon=True)
    relay_thread.start()
    # usage left unsettled by an earlier run with a settle interval is posted now: with the interval at 0 nothing
    # else would post it (it would stay counted against the balance, never posted)
    left = settle_all(engine, stop=stop)
    if left.keys:
        log.info("usage_settled_at_start", keys=left.keys, wallets=left.wallets, amount_minor=left.amount_minor)
    threads = {"outbox_relay": relay_thread}
    if settings.usage_settle_interval_s > 0:  # usage is priced by the consumer and posted by this thread
        threads["usage_settle"] = threading.Thread(target=run_settler, args=(engine, stop),
                                                   kwargs={"interval_s": settings.usage_settle_interval_s},
                                                   name="ledger-settle", daemon=True)
        threads["usage_settle"].start()
    consumer = LedgerConsumer(settings=settings, engine=engine, stop=stop)
    probes = None
    if settings.metrics_port >= 0:
        probes = start_probe_server("ledger", host=settings.metrics_host, port=settings.metrics_port, checks={
            "database": database_check(engine), **consumer.readiness_checks(),
            **{name: _alive(thread) for name, thread in threads.items()}})
    log.info("ledger_consumer_started", topic=consumer.topic, group=settings.consumer_group,
             metrics_port=probes.port if probes else None)
    freeze_startup_heap()  # a full GC pass over the import-time heap would stall every apply thread
    tune_gc_for_batches()
    try:
        consumer.run()
    finally:
        if probes is not None:
            probes.stop()
        stop.set()
        for thread in threads.values():
            thread.join(timeout=30)
        engine.dispose()
    return consumer.stats


def _alive(thread: threading.Thread) -> Check:
    """A readiness check: the background thread still runs."""
    return lambda: (thread.is_alive(), "running" if thread.is_alive() else "stopped")


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
        if code in ("ledger.migrations_pending", "kafka.missing_topics", "ledger.charges_topic_repartitioned"):
            log.error("ledger_consumer_refused_to_start", code=code, error=str(exc))
            raise SystemExit(2) from exc
        raise
