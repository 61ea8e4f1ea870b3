"""The four records of the same usage, read for reconciliation: one small reader per record (all I/O is here;
the comparison is ledger/reconcile_compare.py).

Cuts — every pair is compared at a point both records have reached:

* ``ledger`` is read in ONE REPEATABLE READ snapshot: the applied marks of the usage topic's current life, the
  counters of that life plus the corrections replays wrote, the catalog, and the usage charges.
* ``usage_log`` is metered again from offset 0 up to the ledger's mark per partition (the workers' own core,
  streams/replay_diff.py); on the way its counters are also copied at the ClickHouse cut (below).
* ``clickhouse_usage`` is eventually consistent. Its cut per partition is the sink's committed watermark: the
  highest offset the sink stored for the partition (or its consumer group committed), capped at the ledger's
  mark. Stored rows up to the cut are metered with the same core. Where the cut equals the ledger's mark all
  three usage records are compared together (a majority names the odd one); where the sink lags, ClickHouse is
  compared with the log at the cut only — never against a mark it has not reached. A partition the sink has not
  stored anything of is "not settled" and left out (the report says so).
* ``clickhouse_flow`` is compared with the ledger's usage postings (kind usage, and the corrections' adjustments)
  POSTED BEFORE ``now − settle delay`` (``METERLINE_RECONCILE_SETTLE_S``): the outbox relay and the sink's lag
  must be shorter than the delay, and a lag beyond it is reported as drift — that is the alert's point.

What the ClickHouse usage record cannot know: the Kafka message timestamp (streams' arrival time). Its rows are
metered with the sink's ingestion time as arrival, a little later than the real one; an event within that
gap of the allowed-lateness or future-skew bound is metered differently and shows as clickhouse_usage drift."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import Engine, text

from ledger.checkpoints import merge_units
from ledger.corrections import KeyCharge, StoredCounter
from ledger.reconcile_compare import Key
from streams.catalog_model import CatalogSnapshot
from streams.metering import Counter, Limits, PartitionAggregator
from streams.replay import LogMessage

__all__ = ["Cut", "LedgerState", "clickhouse_life", "clickhouse_watermarks", "ledger_units", "merged",
           "meter_partition", "read_clickhouse_flow", "read_clickhouse_usage", "read_ledger", "read_ledger_flow",
           "read_usage_log"]

#: one partition's counters at a cut: key -> (units, latest_at, aggregation)
Cut = dict[Key, tuple[Decimal, datetime | None, str]]


@dataclass
class LedgerState:
    source_id: str
    marks: dict[int, int]
    life: list[StoredCounter]
    catalog: CatalogSnapshot
    charges: dict[Key, KeyCharge] = field(default_factory=dict)


# -- ledger (PostgreSQL) -----------------------------------------------------------------------------------------

def read_ledger(engine: Engine, topic: str, partitions: int, *, default_policy: Any) -> LedgerState:
    from ledger import corrections, queries
    from ledger.source_logs import current_identity
    from streams import catalog as catalog_db

    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():  # marks, counters, charges and catalog: one instant
            source_id = current_identity(conn, topic)
            marks = queries.applied_offsets(conn, source_id, list(range(partitions)))
            life = corrections.life_counters(conn, source_id)
            _every, charges = corrections.key_state(conn, sorted({c.key for c in life},
                                                                 key=lambda k: (k[0], k[2], k[3], k[4])))
            catalog = catalog_db.load_catalog(conn, default_policy=default_policy)
    return LedgerState(source_id, marks, life, catalog, charges)


def ledger_units(state: LedgerState) -> dict[Key, Decimal]:
    """The ledger's units per key: this life's counters and the corrections, merged as the ledger prices them."""
    rows: dict[Key, list[StoredCounter]] = {}
    for c in state.life:
        rows.setdefault(c.key, []).append(c)
    out: dict[Key, Decimal] = {}
    for key, counters in rows.items():
        charge = state.charges.get(key)
        out[key] = merge_units(charge.aggregation if charge else "sum", ((c.units, c.latest_at) for c in counters))
    return out


_LEDGER_FLOW = text("""
    SELECT wallet_id, project_id, meter_id, period_start, price_version_id, -sum(amount_minor) AS charged
    FROM transactions
    WHERE kind IN ('usage', 'adjustment') AND meter_id IS NOT NULL AND period_start IS NOT NULL
      AND price_version_id IS NOT NULL AND created_at < :cutoff
    GROUP BY wallet_id, project_id, meter_id, period_start, price_version_id
""")


def read_ledger_flow(engine: Engine, cutoff: datetime) -> dict[Key, int]:
    """The ledger's usage postings per key (Σ −amount: + = charged), posted before ``cutoff``."""
    with engine.connect() as conn:
        return {(r.wallet_id, r.project_id, r.meter_id, r.period_start, r.price_version_id): int(r.charged)
                for r in conn.execute(_LEDGER_FLOW, {"cutoff": cutoff})}


# -- metering (the workers' core), shared by the log and ClickHouse usage ---------------------------------------

def _snapshot(aggregator: PartitionAggregator) -> Cut:
    counters: dict[Any, Counter] = aggregator.counters
    return {key: (c.units, c.latest_at, c.aggregation) for key, c in counters.items() if c.events > 0}


def meter_partition(messages: Iterable[LogMessage], *, source_id: str, partition: int, partitions: int,
                    through: int, cut: int, catalog: CatalogSnapshot, limits: Limits) -> tuple[Cut, Cut, int]:
    """Meter ``messages`` (offset order, from 0) up to ``through``; returns (counters at ``cut`` ≤ through,
    counters at ``through``, the last offset processed)."""
    aggregator = PartitionAggregator(source_topic=source_id, partition=partition, partitions=partitions,
                                     limits=limits)
    aggregator.seed(applied_through=-1, counters=(), dedupe_keys=(), periods_since=None)
    at_cut: Cut | None = {} if cut < 0 else None
    for message in messages:
        if message.offset > through:
            break
        if at_cut is None and message.offset > cut:
            at_cut = _snapshot(aggregator)
        aggregator.process(offset=message.offset, value=message.value, arrival=message.arrival, catalog=catalog)
    at_through = _snapshot(aggregator)
    return (at_through if at_cut is None else at_cut), at_through, aggregator.processed_through


def merged(cuts: Iterable[Cut]) -> dict[Key, Decimal]:
    """Partitions' counters of the same keys merged (sum/count add, max/latest as the ledger merges them)."""
    rows: dict[Key, list[tuple[Decimal, datetime | None, str]]] = {}
    for cut in cuts:
        for key, value in cut.items():
            rows.setdefault(key, []).append(value)
    return {key: merge_units(values[0][2], ((u, at) for u, at, _ in values)) for key, values in rows.items()}


# -- usage log (Kafka) --------------------------------------------------------------------------------------------

def read_usage_log(bootstrap: str, topic: str, state: LedgerState, *, partitions: int, cuts: dict[int, int],
                   limits: Limits, deadline: float) -> tuple[dict[int, Cut], dict[int, Cut], list[int], int]:
    """The log metered per partition: (counters at the ClickHouse cut, at the ledger's mark, partitions whose log
    ended before the mark, messages read)."""
    from meterline.cli_reconcile import _read_partition

    at_cut: dict[int, Cut] = {}
    at_mark: dict[int, Cut] = {}
    incomplete: list[int] = []
    read = 0
    for p in range(partitions):
        through = state.marks.get(p, -1)
        raw = _read_partition(bootstrap, topic, p, through, deadline) if through >= 0 else iter(())

        def counted(stream: Iterator[tuple[int, bytes | None, datetime]]) -> Iterator[LogMessage]:
            nonlocal read
            for offset, value, arrival in stream:
                read += 1
                yield LogMessage(offset, value, arrival)

        at_cut[p], at_mark[p], last = meter_partition(
            counted(raw), source_id=state.source_id, partition=p, partitions=partitions, through=through,
            cut=min(cuts.get(p, -1), through), catalog=state.catalog, limits=limits)
        if last < through:
            incomplete.append(p)
    return at_cut, at_mark, incomplete, read


# -- ClickHouse ---------------------------------------------------------------------------------------------------

def clickhouse_life(bootstrap: str, topic: str) -> str:
    """How the sink names the topic's current life in ClickHouse (``topic@<topic id>``, analytics/sink.py)."""
    from confluent_kafka import TopicCollection
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        topic_id = admin.describe_topics(TopicCollection([topic]))[topic].result(10).topic_id
    except Exception:  # the sink falls back to the bare name the same way
        return topic
    return f"{topic}@{topic_id}" if topic_id is not None else topic


def clickhouse_watermarks(client: Any, database: str, life: str, *, bootstrap: str, topic: str,
                          group: str | None, partitions: int) -> dict[int, int]:
    """Per partition, the highest offset the sink has certainly handled: the highest stored offset, or the sink
    group's committed offset − 1 (a message that stored no row, all its events invalid, still moves it)."""
    marks = {p: -1 for p in range(partitions)}
    for p, offset in client.query(
            f"SELECT kafka_partition, max(kafka_offset) FROM {database}.usage_events WHERE kafka_topic = "
            "{life:String} GROUP BY kafka_partition", parameters={"life": life}).result_rows:
        if int(p) in marks:
            marks[int(p)] = int(offset)
    if group:
        from confluent_kafka import TopicPartition

        from ledger.kafka import make_consumer

        consumer = make_consumer(bootstrap, group, **{"enable.auto.commit": False})
        try:
            for tp in consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10):
                if tp.offset >= 0 and tp.partition in marks:
                    marks[tp.partition] = max(marks[tp.partition], tp.offset - 1)
        except Exception:  # the stored offsets alone are a sound (lower) watermark
            pass
        finally:
            consumer.close()
    return marks


def _utc(moment: datetime) -> datetime:
    """ClickHouse hands DateTime64(…, 'UTC') back naive (chDB) or aware (server); both mean UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _clickhouse_messages(client: Any, database: str, life: str, partition: int, through: int) -> Iterator[LogMessage]:
    """The stored rows of one partition up to ``through``, rebuilt into the messages they came from (one
    CloudEvent array per offset, in index order; the sink's ingestion time stands in for the arrival)."""
    rows = client.query(
        f"SELECT kafka_offset, kafka_index, project_id, event_type, subject, wallet_id, time, event_id, source, "
        f"data, ingested_at FROM {database}.usage_events WHERE kafka_topic = {{life:String}} AND "
        f"kafka_partition = {{p:UInt32}} AND kafka_offset <= {{through:Int64}} ORDER BY kafka_offset, kafka_index",
        parameters={"life": life, "p": partition, "through": through}).result_rows
    batch: list[dict[str, Any]] = []
    offset, arrival = -1, None
    for r in rows:
        if int(r[0]) != offset and batch:
            yield LogMessage(offset, orjson.dumps(batch), arrival)  # type: ignore[arg-type]
            batch = []
        offset, arrival = int(r[0]), _utc(r[10])
        event: dict[str, Any] = {"specversion": "1.0", "id": r[7], "source": r[8], "type": r[3], "subject": r[4],
                                 "time": _utc(r[6]).isoformat(), "project": r[2], "data": orjson.loads(r[9])}
        if r[5]:
            event["wallet_id"] = r[5]
        batch.append(event)
    if batch:
        yield LogMessage(offset, orjson.dumps(batch), arrival)  # type: ignore[arg-type]


def read_clickhouse_usage(client: Any, database: str, life: str, state: LedgerState, *, partitions: int,
                          cuts: dict[int, int], limits: Limits) -> dict[int, Cut]:
    """ClickHouse usage metered per partition up to its cut (partitions with cut < 0 are not read)."""
    out: dict[int, Cut] = {}
    for p in range(partitions):
        cut = min(cuts.get(p, -1), state.marks.get(p, -1))
        if cut < 0:
            continue
        _, out[p], _ = meter_partition(_clickhouse_messages(client, database, life, p, cut),
                                       source_id=state.source_id, partition=p, partitions=partitions, through=cut,
                                       cut=cut, catalog=state.catalog, limits=limits)
    return out


#: ``…:{period, ISO UTC}:{price version}`` at the end of a usage / correction idempotency key
#: (ledger/checkpoints.py usage_idempotency_key); ClickHouse keeps the key, not the period and version
_PERIOD_RE = r":(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?\+00:00):[^:]+$"
_VERSION_RE = r":([^:]+)$"


def read_clickhouse_flow(client: Any, database: str, cutoff: datetime) -> dict[Key, int]:
    """ClickHouse's usage postings per key (Σ −amount), posted before ``cutoff``; grouped in ClickHouse."""
    rows = client.query(
        "SELECT wallet_id, project_id, meter_id, extract(idempotency_key, {period_re:String}) AS period, "
        "extract(idempotency_key, {version_re:String}) AS version, -sum(amount_minor) "
        f"FROM {database}.ledger_transactions WHERE kind IN ('usage', 'adjustment') AND meter_id != '' "
        "AND created_at < {cutoff:DateTime64(6, 'UTC')} GROUP BY wallet_id, project_id, meter_id, period, version "
        "HAVING period != ''",  # an adjustment with a meter but no period (a manual one) is not usage
        parameters={"period_re": _PERIOD_RE, "version_re": _VERSION_RE, "cutoff": cutoff}).result_rows
    return {(wallet, project, meter, datetime.fromisoformat(period), version): int(charged)
            for wallet, project, meter, period, version, charged in rows}
