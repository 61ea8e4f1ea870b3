"""The analytics sink: usage.events.v1, ledger.transactions.v1, usage.events.dlq.v1 (and access decisions,
when that topic exists) into ClickHouse. Entry point of `meterline run analytics` (``main``).

Exactly-once into ClickHouse without transactions — why a redelivered batch never double-counts:

1. Every row carries its Kafka identity (topic, partition, offset, index-in-message).
2. A batch is bounded in rows (ANALYTICS_BATCH_ROWS_MAX) and age (ANALYTICS_BATCH_AGE_MS_MAX); it is
   inserted, and only AFTER the insert returned are its offsets committed (synchronously).
3. A failed insert is retried with the SAME rows and the same ``insert_deduplication_token`` (derived from the
   topic/partition/offset ranges of the batch). The tables keep a non-replicated deduplication window, so
   parts of that insert that did commit are not written twice. This holds on chDB and on a server alike
   (both run the same MergeTree; a ReplicatedMergeTree deduplicates by token natively).
4. After a restart or rebalance the consumer resumes at the committed offset C, which may be behind what
   was inserted. On assignment the sink reads M = max(kafka_offset) stored for the partition and the
   identities already stored in [C, M]; a redelivered message at offset <= M contributes only the rows not
   yet stored. That also repairs a batch that committed only some of its parts (an insert spanning several
   month partitions writes one part per month). Offsets above M were never stored.
   It relies on one owner per partition at a time (the consumer group) — a stalled former owner that
   inserts after losing its partition could still double-write; session timeouts bound that window.
5. Pre-aggregations are projections (inside the same part as their rows), so 3 and 4 keep them exact too.
6. Producer duplicates — the same (project, source, id) in two messages — are dropped within
   ANALYTICS_DEDUPE_HORIZON_S (seeded from ClickHouse on assignment), as streams does before charging.
7. Ledger transactions: the outbox relay may publish a transaction twice at different offsets. Before each
   insert the sink drops every transaction whose transaction_id is already stored (one indexed lookup per
   batch) or repeated in the batch, so the table holds each transaction once and is read WITHOUT FINAL, and
   its rollup (projection ``flows_by_hour``) counts it once. The relay keys by wallet, so both copies reach the
   same partition and one owner at a time checks and inserts them (the stalled-former-owner window of 4 is the
   residual; the table stays a ReplacingMergeTree, whose merges drop such a copy and rebuild the rollup).
   Access decisions are a ReplacingMergeTree read with FINAL.

Embedded ClickHouse (chDB) allows ONE process per data path: there the api process runs this sink in a
background thread (``SinkThread``) and serves the queries; `meterline run analytics` then idles and says so.
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from clickhouse_connect.driver.client import Client
from confluent_kafka import OFFSET_INVALID, KafkaError, KafkaException, Message, TopicPartition

from analytics import metrics as analytics_metrics
from analytics import rows as R
from analytics.client import connect
from analytics.migrate import migrate
from analytics.settings import AnalyticsSettings, get_settings
from ledger.contracts import TOPIC_LEDGER_TRANSACTIONS
from ledger.kafka import (
    LagRecorder,
    existing_topics,
    make_consumer,
    message_position,
    require_topics,
    topic_name,
)
from ledger.probes import Check, start_probe_server
from streams.contracts import TOPIC_USAGE_DLQ, TOPIC_USAGE_EVENTS

log = structlog.get_logger("analytics.sink")

TP = tuple[str, int]


@dataclass(frozen=True)
class TableSpec:
    table: str
    columns: tuple[str, ...]
    parse: Callable[[Message, R.Origin], R.Parsed]
    dedupe_events: bool = False
    unique_transactions: bool = False  # invariant 7: drop rows whose transaction_id is already stored


@dataclass
class PartitionState:
    """What ClickHouse already holds for a partition at assignment (see invariant 4)."""

    mark: int = -1  # highest offset stored; -1 = nothing stored
    present: dict[int, set[int]] = field(default_factory=dict)  # offset -> indexes stored, for (C, mark]


@dataclass
class PendingBatch:
    first_offset: int
    last_offset: int
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    identities: set[bytes] = field(default_factory=set)


@dataclass
class SinkStats:
    inserted_rows: dict[str, int] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)  # consumed per topic
    rejected: int = 0
    duplicates_dropped: int = 0
    redelivered_rows_skipped: int = 0
    transactions_already_stored: int = 0
    batches: int = 0
    commits_failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"inserted_rows": dict(self.inserted_rows), "messages": dict(self.messages), "rejected": self.rejected,
                "duplicates_dropped": self.duplicates_dropped,
                "redelivered_rows_skipped": self.redelivered_rows_skipped,
                "transactions_already_stored": self.transactions_already_stored, "batches": self.batches,
                "commits_failed": self.commits_failed}


def batch_token(table: str, ranges: list[tuple[str, int, int, int, int]]) -> str:
    """Deterministic for the same rows: table + sorted (topic, partition, first, last, row count)."""
    text = table + "|" + ";".join(f"{t}:{p}:{a}-{b}:{n}" for t, p, a, b, n in sorted(ranges))
    return hashlib.sha256(text.encode()).hexdigest()


class Sink:
    def __init__(self, settings: AnalyticsSettings, *, stop: threading.Event | None = None,
                 group_id: str | None = None) -> None:
        self.settings = settings
        self.stop_event = stop or threading.Event()
        self.group_id = group_id or settings.consumer_group
        self.stats = SinkStats()
        self.db = settings.database
        self._client: Client | None = None
        self._specs: dict[str, TableSpec] = {}
        self._states: dict[TP, PartitionState] = {}
        self._pending: dict[TP, PendingBatch] = {}
        self._pending_since: float | None = None
        self._pending_rows = 0
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # event identity -> monotonic time stored
        # topic -> the identity of its current life, stored as kafka_topic (see _resolve_lives)
        self._lives: dict[str, str] = {}
        self.ready = threading.Event()  # set once subscribed (tests and the api wait on it)
        self._lag = LagRecorder(self.group_id)
        self.loop_turned_at = time.monotonic()  # readiness: the consume loop keeps turning

    # ------------------------------------------------------------------ set-up

    def _table_specs(self) -> dict[str, TableSpec]:
        s = self.settings
        keys = tuple(s.units_keys)

        def usage(msg: Message, origin: R.Origin) -> R.Parsed:
            return R.usage_rows(msg.value(), origin, units_keys=keys)

        specs = {
            topic_name(TOPIC_USAGE_EVENTS, s.topic_prefix): TableSpec("usage_events", R.USAGE_COLUMNS, usage, True),
            topic_name(TOPIC_LEDGER_TRANSACTIONS, s.topic_prefix): TableSpec(
                "ledger_transactions", R.TRANSACTION_COLUMNS, lambda m, o: R.transaction_rows(m.value(), o),
                unique_transactions=True),
            topic_name(TOPIC_USAGE_DLQ, s.topic_prefix): TableSpec(
                "dead_letters", R.DEAD_LETTER_COLUMNS, lambda m, o: R.dead_letter_rows(m.value(), m.headers(), o)),
        }
        require_topics(s.kafka_bootstrap_servers, list(specs))
        decisions = topic_name(s.access_decisions_topic, s.topic_prefix)
        if decisions in existing_topics(s.kafka_bootstrap_servers):
            specs[decisions] = TableSpec("access_decisions", R.DECISION_COLUMNS,
                                         lambda m, o: R.decision_rows(m.value(), o))
        else:
            log.info("access decisions topic absent; the paywall funnel stays empty until it exists",
                     topic=decisions)
        return specs

    def run(self) -> None:
        """Consume until ``stop_event`` is set. Raises on an insert that keeps failing (the caller restarts)."""
        s = self.settings
        self._client = connect(s.clickhouse_url)
        consumer = None
        try:
            migrate(self._client, database=self.db)
            self._specs = self._table_specs()
            consumer = make_consumer(s.kafka_bootstrap_servers, self.group_id,
                                     session_timeout_ms=s.consumer_session_timeout_ms)
            consumer.subscribe(list(self._specs), on_assign=self._on_assign, on_revoke=self._on_revoke,
                               on_lost=self._on_revoke)
            log.info("analytics sink started", topics=list(self._specs), group=self.group_id,
                     clickhouse="embedded" if s.embedded else "server")
            self.ready.set()
            poll_s = s.poll_timeout_ms / 1000
            last_lag = 0.0
            while not self.stop_event.is_set():
                self.loop_turned_at = time.monotonic()
                for msg in consumer.consume(num_messages=min(s.batch_rows_max, 5_000), timeout=poll_s):
                    self._accept(msg)
                if self._due():
                    self._flush(consumer)
                if time.monotonic() - last_lag >= 1.0:
                    self._lag.record(consumer)
                    last_lag = time.monotonic()
            if self._pending:
                self._flush(consumer)
        finally:
            if consumer is not None:
                consumer.close()
            self._client.close()
            self._client = None

    def readiness_checks(self) -> dict[str, Check]:
        def subscribed() -> tuple[bool, str]:
            if not self.ready.is_set():
                return False, "not subscribed yet (connecting to ClickHouse and the broker)"
            idle_s = time.monotonic() - self.loop_turned_at
            if idle_s >= 30.0:
                return False, f"consume loop stuck for {idle_s:.0f} s (an insert retrying?)"
            return True, f"{len(self._lag.assigned)} partitions assigned"
        return {"sink": subscribed}

    # ------------------------------------------------------------------ assignment (invariant 4)

    def _resolve_lives(self, topics: set[str]) -> None:
        """Name each topic's current life ``topic@<topic id>``: offsets, marks and insert tokens are only
        meaningful within one life. The embedded broker recreates its topics empty on every start while
        ClickHouse keeps the rows of the previous life; under the bare name the new life's offsets would sit
        below the old mark and its rows would be skipped as redeliveries (or its inserts dropped as
        duplicate tokens). A broker without topic ids keeps the bare name."""
        from confluent_kafka import TopicCollection
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap_servers})
        for topic, future in admin.describe_topics(TopicCollection(sorted(topics))).items():
            try:
                topic_id = future.result(10).topic_id
            except Exception as exc:  # the bare name still works while the topic keeps its first life
                log.warning("topic id unavailable; using the bare topic name", topic=topic, error=str(exc))
                topic_id = None
            self._lives[topic] = f"{topic}@{topic_id}" if topic_id is not None else topic

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._lag.assign(partitions)
        self._resolve_lives({tp.topic for tp in partitions})
        committed = {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(partitions, timeout=10)}
        for tp in partitions:
            key = (tp.topic, tp.partition)
            start = committed.get(key, OFFSET_INVALID)
            self._states[key] = self._load_state(key, start if start >= 0 else 0)
            if self._specs[tp.topic].dedupe_events:
                self._seed_seen(key)
        log.info("partitions assigned", partitions=[f"{t.topic}[{t.partition}]" for t in partitions],
                 marks={f"{t}[{p}]": st.mark for (t, p), st in self._states.items()})

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._lag.revoke(partitions)
        # Uninserted rows of a revoked partition are dropped: their offsets were not committed, so the next
        # owner reads them again. Their identities leave the pending sets with them.
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._pending.pop(key, None)
            self._states.pop(key, None)
        self._pending_rows = sum(len(b.rows) for b in self._pending.values())
        if not self._pending:
            self._pending_since = None

    def _load_state(self, key: TP, committed: int) -> PartitionState:
        assert self._client is not None
        table = f"`{self.db}`.{self._specs[key[0]].table}"
        params = {"t": self._lives.get(key[0], key[0]), "p": key[1]}
        mark_rows = self._client.query(
            f"SELECT max(kafka_offset), count() FROM {table} WHERE kafka_topic = {{t:String}} "
            "AND kafka_partition = {p:UInt32}", parameters=params).result_rows
        mark = int(mark_rows[0][0]) if mark_rows and mark_rows[0][1] else -1
        state = PartitionState(mark=mark)
        if mark >= committed:
            for offset, index in self._client.query(
                    f"SELECT kafka_offset, kafka_index FROM {table} WHERE kafka_topic = {{t:String}} "
                    "AND kafka_partition = {p:UInt32} AND kafka_offset >= {c:UInt64}",
                    parameters={**params, "c": committed}).result_rows:
                state.present.setdefault(int(offset), set()).add(int(index))
        return state

    def _seed_seen(self, key: TP) -> None:
        s = self.settings
        if not s.dedupe_horizon_s or not s.dedupe_keys_max:
            return
        assert self._client is not None
        now = time.monotonic()
        for project, source, event_id in self._client.query(
                f"SELECT project_id, source, event_id FROM `{self.db}`.usage_events "
                "WHERE (kafka_topic = {t:String} OR startsWith(kafka_topic, {t_life:String})) "
                "AND kafka_partition = {p:UInt32} "
                "AND ingested_at >= now64(3) - toIntervalSecond({h:UInt32}) LIMIT {n:UInt64}",
                parameters={"t": key[0], "t_life": f"{key[0]}@", "p": key[1], "h": s.dedupe_horizon_s,
                            "n": s.dedupe_keys_max}
        ).result_rows:
            self._seen[R.event_identity(project, source, event_id)] = now
        self._trim_seen(now)

    def _trim_seen(self, now: float) -> None:
        horizon = self.settings.dedupe_horizon_s
        while self._seen and (len(self._seen) > self.settings.dedupe_keys_max
                              or next(iter(self._seen.values())) < now - horizon):
            self._seen.popitem(last=False)

    # ------------------------------------------------------------------ messages

    def _accept(self, msg: Message) -> None:
        error = msg.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error", error=str(error))
            return
        topic, partition, offset = message_position(msg)
        key = (topic, partition)
        spec = self._specs[topic]
        kind, ts_ms = msg.timestamp()
        origin = R.Origin(self._lives.get(topic, topic), partition, offset, datetime.now(UTC),
                          datetime.fromtimestamp(ts_ms / 1000, tz=UTC) if kind and ts_ms > 0 else None)
        parsed = spec.parse(msg, origin)
        self.stats.rejected += parsed.rejected
        if parsed.rejected:
            analytics_metrics.ROWS_REJECTED.inc(parsed.rejected)
        rows = parsed.rows
        identities = parsed.identities
        state = self._states.setdefault(key, PartitionState())
        if offset <= state.mark:
            stored = state.present.get(offset, set())
            keep = [i for i, row in enumerate(rows) if row[-1] not in stored]
            self.stats.redelivered_rows_skipped += len(rows) - len(keep)
            rows = [rows[i] for i in keep]
            identities = [identities[i] for i in keep] if identities is not None else None
        batch = self._pending.get(key)
        if batch is None:
            batch = self._pending[key] = PendingBatch(first_offset=offset, last_offset=offset)
        batch.last_offset = offset
        if spec.dedupe_events and identities is not None:
            rows = self._drop_duplicates(rows, identities, batch)
        batch.rows.extend(rows)
        self._pending_rows += len(rows)
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        self.stats.messages[topic] = self.stats.messages.get(topic, 0) + 1  # last: tests read it

    def _drop_duplicates(self, rows: list[tuple[Any, ...]], identities: list[bytes],
                         batch: PendingBatch) -> list[tuple[Any, ...]]:
        kept = []
        for row, identity in zip(rows, identities, strict=True):
            if identity in self._seen or any(identity in b.identities for b in self._pending.values()):
                self.stats.duplicates_dropped += 1
                continue
            batch.identities.add(identity)
            kept.append(row)
        return kept

    def _due(self) -> bool:
        if self._pending_since is None:
            return False
        s = self.settings
        return (self._pending_rows >= s.batch_rows_max
                or (time.monotonic() - self._pending_since) * 1000 >= s.batch_age_ms_max)

    # ------------------------------------------------------------------ flush (invariants 2 and 3)

    def _flush(self, consumer: Any) -> None:
        by_table: dict[str, list[tuple[TP, PendingBatch]]] = {}
        for key, batch in self._pending.items():
            by_table.setdefault(self._specs[key[0]].table, []).append((key, batch))
        for table, batches in by_table.items():
            rows = [row for _, b in batches for row in b.rows]
            spec = self._specs[batches[0][0][0]]
            if rows and spec.unique_transactions:
                rows = self._drop_stored_transactions(rows)
            if not rows:
                continue
            token = batch_token(table, [(self._lives.get(t, t), p, b.first_offset, b.last_offset, len(b.rows))
                                        for (t, p), b in batches])
            started = time.monotonic()
            self._insert(table, self._specs[batches[0][0][0]].columns, rows, token)
            analytics_metrics.INSERT_SECONDS.labels(table).observe(time.monotonic() - started)
            analytics_metrics.ROWS_INSERTED.labels(table).inc(len(rows))
            self.stats.inserted_rows[table] = self.stats.inserted_rows.get(table, 0) + len(rows)
        offsets = [TopicPartition(t, p, b.last_offset + 1) for (t, p), b in self._pending.items()]
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # Safe: the rows are stored; whoever reads these offsets again skips them (invariant 4).
            self.stats.commits_failed += 1
            log.warning("offset commit failed after insert; redelivery will be skipped", error=str(exc))
        now = time.monotonic()
        for batch in self._pending.values():
            for identity in batch.identities:
                self._seen[identity] = now
        self._trim_seen(now)
        self.stats.batches += 1
        self._pending.clear()
        self._pending_rows = 0
        self._pending_since = None

    def _drop_stored_transactions(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Invariant 7: keep the first row of each transaction_id that ClickHouse does not hold yet. A copy has
        the same project and created_at, so the lookup reads only the granules of the batch's time span."""
        assert self._client is not None
        col = {name: i for i, name in enumerate(R.TRANSACTION_COLUMNS)}
        tx_i, project_i, created_i = col["transaction_id"], col["project_id"], col["created_at"]
        stored = {int(v) for (v,) in self._client.query(
            f"SELECT DISTINCT transaction_id FROM `{self.db}`.ledger_transactions "
            "WHERE project_id IN {projects:Array(String)} AND created_at >= {lo:DateTime64(6, 'UTC')} "
            "AND created_at <= {hi:DateTime64(6, 'UTC')} AND transaction_id IN {ids:Array(Int64)}",
            parameters={"projects": sorted({r[project_i] for r in rows}), "lo": min(r[created_i] for r in rows),
                        "hi": max(r[created_i] for r in rows), "ids": sorted({r[tx_i] for r in rows})}).result_rows}
        kept = []
        for row in rows:
            if row[tx_i] in stored:
                self.stats.transactions_already_stored += 1
                continue
            stored.add(row[tx_i])
            kept.append(row)
        return kept

    def _insert(self, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]], token: str) -> None:
        assert self._client is not None
        s = self.settings
        for attempt in range(1, s.insert_attempts_max + 1):
            try:
                self._client.insert(f"`{self.db}`.{table}", rows, column_names=list(columns),
                                    settings={"insert_deduplication_token": token})
                return
            except Exception as exc:
                if attempt == s.insert_attempts_max:
                    raise
                log.warning("insert failed; retrying the same batch with the same token", table=table,
                            attempt=attempt, error=str(exc))
                time.sleep(s.insert_retry_backoff_ms / 1000 * attempt)


def run_forever(settings: AnalyticsSettings, stop: threading.Event, *, backoff_s_max: float = 10.0,
                on_sink: Callable[[Sink], None] | None = None) -> None:
    """Run the sink; after a failure (ClickHouse or broker unreachable) start again with backoff."""
    backoff = 0.5
    while not stop.is_set():
        try:
            sink = Sink(settings, stop=stop)
            if on_sink is not None:
                on_sink(sink)
            sink.run()
            return
        except Exception:
            analytics_metrics.SINK_RESTARTS.inc()
            log.exception("analytics sink failed; restarting", backoff_s=backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, backoff_s_max)


class SinkThread:
    """The sink inside the api process (embedded ClickHouse: the api owns the chDB path)."""

    def __init__(self, settings: AnalyticsSettings) -> None:
        self.stop_event = threading.Event()
        self.sink: Sink | None = None  # the current attempt (its stats are read by tests and health)
        self._thread = threading.Thread(target=run_forever, args=(settings, self.stop_event),
                                        kwargs={"on_sink": self._attach}, name="analytics-sink", daemon=True)

    def _attach(self, sink: Sink) -> None:
        self.sink = sink

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, timeout_s: float = 15.0) -> None:
        self.stop_event.set()
        self._thread.join(timeout_s)


def sink_runs_in_api(settings: AnalyticsSettings) -> bool:
    return settings.embedded and settings.embedded_sink_owner == "auto"


def _configure_logging() -> None:
    """JSON lines on stderr, like every Meterline process (analytics may not import the meterline root)."""
    import logging
    import os
    import sys

    level = logging.getLevelName(os.environ.get("METERLINE_LOG_LEVEL", "INFO").upper())
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    structlog.contextvars.bind_contextvars(component="analytics")


def main() -> None:
    """`meterline run analytics`."""
    _configure_logging()
    settings = get_settings()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if not settings.clickhouse_url:
        log.error("CLICKHOUSE_URL is not set; nothing to sink into")
        raise SystemExit(2)
    current: list[Sink] = []
    idle = settings.embedded and settings.embedded_sink_owner != "process"

    def sink_check() -> tuple[bool, str]:
        if idle:
            return True, "idle: embedded ClickHouse, the api process runs the sink (see the api's /ready)"
        if not current:
            return False, "sink not started yet"
        return current[-1].readiness_checks()["sink"]()

    probes = None
    if settings.metrics_port >= 0:
        probes = start_probe_server("analytics", host=settings.metrics_host, port=settings.metrics_port,
                                    checks={"sink": sink_check})
    try:
        if idle:
            # chDB allows one process per data path; the api process owns it (sink thread + queries). Idle rather
            # than exit so the supervisor does not treat this as a crash loop.
            log.info("embedded ClickHouse: the api process owns analytics (sink and queries); this process idles",
                     clickhouse_url=settings.clickhouse_url, owner_setting=settings.embedded_sink_owner)
            stop.wait()
            return

        def attach(sink: Sink) -> None:  # each restart builds a new Sink: readiness follows the current one
            current[:] = [sink]

        run_forever(settings, stop, on_sink=attach)
    finally:
        if probes is not None:
            probes.stop()
