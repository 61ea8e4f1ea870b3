"""Read-only queries over the ledger (safe for api, streams and analytics to import; nothing here writes).

``partition_snapshot`` is what streams seeds from on assignment (see ledger/README.md, "checkpoint
protocol"): applied_through and the partition's counters are read by ONE SQL statement, hence from one
snapshot, whatever the connection's isolation level — the pair can never be torn by a concurrent apply.
"""

from __future__ import annotations

import base64
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import Connection, text

from ledger.invariant_check import InvariantCheck, latest_invariant_check
from ledger.rows import (
    AllocationRow,
    BalanceView,
    BucketRow,
    HoldRow,
    PartitionSnapshot,
    SnapshotCounter,
    TransactionRow,
    WalletRow,
)
from ledger.source_logs import IDENTITY_SEPARATOR, base_topic

__all__ = [
    "InvariantCheck",
    "TransactionPage",
    "applied_offsets",
    "dedupe_key_sets_in_horizon",
    "dedupe_keys_newest",
    "dedupe_keys_since",
    "expired_of_grant",
    "get_balance",
    "get_hold",
    "get_transaction",
    "get_wallet",
    "latest_invariant_check",
    "list_buckets",
    "list_holds",
    "list_transactions",
    "partition_halts",
    "partition_snapshot",
    "refused_counters",
]


@dataclass(frozen=True, slots=True)
class TransactionPage:
    items: tuple[TransactionRow, ...]
    next_cursor: str | None  # pass back as ``cursor`` for the next (older) page; None = no more


def get_wallet(conn: Connection, wallet_id: str) -> WalletRow | None:
    row = conn.execute(text("SELECT * FROM wallets WHERE id = :id"), {"id": wallet_id}).mappings().one_or_none()
    return WalletRow.from_mapping(row) if row else None


def get_balance(conn: Connection, wallet_id: str) -> BalanceView | None:
    """balance, held, available (= balance − held − floor, ≥ 0), debt (= max(−balance, 0)), blocked."""
    wallet = get_wallet(conn, wallet_id)
    return BalanceView.of(wallet) if wallet else None


def get_transaction(conn: Connection, transaction_id: int) -> TransactionRow | None:
    row = conn.execute(text("SELECT * FROM transactions WHERE id = :id"), {"id": transaction_id}).mappings().one_or_none()
    if row is None:
        return None
    return TransactionRow.from_mapping(row, _allocations(conn, [transaction_id]).get(transaction_id, ()))


def get_hold(conn: Connection, hold_id: str) -> HoldRow | None:
    row = conn.execute(text("SELECT * FROM holds WHERE id = :id"), {"id": hold_id}).mappings().one_or_none()
    return HoldRow.from_mapping(row) if row else None


def list_holds(conn: Connection, wallet_id: str, *, status: str | None = None, limit: int = 50) -> list[HoldRow]:
    """A wallet's holds, newest first (optionally of one status)."""
    rows = conn.execute(text("""
        SELECT * FROM holds WHERE wallet_id = :w AND (CAST(:s AS text) IS NULL OR status = :s)
        ORDER BY created_at DESC, id DESC LIMIT :limit"""), {"w": wallet_id, "s": status, "limit": limit}).mappings()
    return [HoldRow.from_mapping(r) for r in rows]


def list_transactions(conn: Connection, *, wallet_id: str | None = None, project_id: str | None = None,
                      kinds: Sequence[str] | None = None, since: datetime | None = None,
                      until: datetime | None = None, source_ref: str | None = None, cursor: str | None = None,
                      limit: int = 50) -> TransactionPage:
    """Newest first, keyset-paginated by id (stable under concurrent inserts), each with its allocations.
    ``since`` is inclusive and ``until`` exclusive on created_at."""
    if wallet_id is None and project_id is None:
        raise ValueError("list_transactions needs wallet_id or project_id")
    limit = max(1, min(limit, 500))
    where, params = _transaction_filters(wallet_id=wallet_id, project_id=project_id, kinds=kinds, since=since,
                                         until=until, source_ref=source_ref, before_id=_decode_cursor(cursor))
    rows = conn.execute(text(f"SELECT * FROM transactions WHERE {where} ORDER BY id DESC LIMIT :limit"),
                        {**params, "limit": limit + 1}).mappings().all()
    page = rows[:limit]
    allocations = _allocations(conn, [r["id"] for r in page])
    items = tuple(TransactionRow.from_mapping(r, allocations.get(r["id"], ())) for r in page)
    next_cursor = _encode_cursor(items[-1].id) if len(rows) > limit else None
    return TransactionPage(items, next_cursor)


def _transaction_filters(*, wallet_id: str | None, project_id: str | None, kinds: Sequence[str] | None,
                         since: datetime | None, until: datetime | None, source_ref: str | None,
                         before_id: int | None) -> tuple[str, dict[str, object]]:
    clauses: list[str] = []
    params: dict[str, object] = {}
    for column, value in (("wallet_id", wallet_id), ("project_id", project_id), ("source_ref", source_ref)):
        if value is not None:
            clauses.append(f"{column} = :{column}")
            params[column] = value
    if kinds:
        clauses.append("kind = ANY(CAST(:kinds AS text[]))")
        params["kinds"] = list(kinds)
    if since is not None:
        clauses.append("created_at >= :since")
        params["since"] = since
    if until is not None:
        clauses.append("created_at < :until")
        params["until"] = until
    if before_id is not None:
        clauses.append("id < :before_id")
        params["before_id"] = before_id
    return " AND ".join(clauses), params


def _encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"tx:{last_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> int | None:
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, value = raw.split(":", 1)
        if prefix != "tx":
            raise ValueError(prefix)
        return int(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"invalid cursor {cursor!r}") from exc


def _allocations(conn: Connection, transaction_ids: list[int]) -> dict[int, tuple[AllocationRow, ...]]:
    if not transaction_ids:
        return {}
    rows = conn.execute(text("""
        SELECT a.transaction_id, a.bucket_id, a.amount_minor, b.source
        FROM transaction_allocations a LEFT JOIN credit_buckets b ON b.id = a.bucket_id
        WHERE a.transaction_id = ANY(CAST(:ids AS bigint[]))
        ORDER BY a.transaction_id, a.seq  -- as written: the order the buckets were burned (ledger_0012)
    """), {"ids": transaction_ids})
    out: dict[int, list[AllocationRow]] = defaultdict(list)
    for r in rows:
        out[r.transaction_id].append(AllocationRow(r.bucket_id, r.amount_minor, r.source))
    return {k: tuple(v) for k, v in out.items()}


def expired_of_grant(conn: Connection, transaction_id: int) -> int:
    """How much of the bucket a credit transaction created has been posted as ``expiry`` (breakage), >= 0."""
    value = conn.execute(text("""
        SELECT coalesce(-sum(e.amount_minor), 0)
        FROM transaction_allocations g
        JOIN transaction_allocations e ON e.bucket_id = g.bucket_id
        JOIN transactions t ON t.id = e.transaction_id AND t.kind = 'expiry'
        WHERE g.transaction_id = :id AND g.amount_minor > 0 AND g.bucket_id IS NOT NULL
    """), {"id": transaction_id}).scalar_one()
    return int(value)


def list_buckets(conn: Connection, wallet_id: str, *, include_empty: bool = False) -> list[BucketRow]:
    """A wallet's buckets in burn order (the order debits consume them)."""
    condition = "" if include_empty else "AND live"  # live: remaining_minor > 0 (ledger_0017)
    rows = conn.execute(text(f"""
        SELECT * FROM credit_buckets WHERE wallet_id = :w {condition}
        ORDER BY priority, expires_at ASC NULLS LAST, created_at, id
    """), {"w": wallet_id}).mappings().all()
    return [BucketRow.from_mapping(r) for r in rows]


def applied_offsets(conn: Connection, source_topic: str, partitions: Sequence[int]) -> dict[int, int]:
    """partition -> applied_through (-1 when nothing was applied yet). Cheap: streams polls it while it waits
    for the ledger to catch up before seeding."""
    rows = conn.execute(text("""
        SELECT partition, applied_through FROM applied_offsets
        WHERE source_topic = :t AND partition = ANY(CAST(:p AS int[]))
    """), {"t": source_topic, "p": list(partitions)})
    found = {int(r.partition): int(r.applied_through) for r in rows}
    return {p: found.get(p, -1) for p in partitions}


_SNAPSHOT = text("""
    SELECT 'offset' AS what, a.partition, a.applied_through, NULL AS wallet_id, NULL AS project_id,
           NULL AS meter_id, NULL::timestamptz AS period_start, NULL AS price_version_id, NULL::numeric AS units,
           NULL::timestamptz AS latest_at, NULL::bigint AS events, NULL::bigint AS late_events,
           NULL::bigint AS charged_minor
    FROM applied_offsets a WHERE a.source_topic = :t AND a.partition = ANY(CAST(:p AS int[]))
    UNION ALL
    SELECT 'counter', c.partition, NULL, c.wallet_id, c.project_id, c.meter_id, c.period_start, c.price_version_id,
           c.units, c.latest_at, c.events, c.late_events, coalesce(ch.charged_minor, 0)
    FROM usage_counters c
    LEFT JOIN usage_charges ch ON ch.wallet_id = c.wallet_id AND ch.meter_id = c.meter_id
         AND ch.period_start = c.period_start AND ch.price_version_id = c.price_version_id
    WHERE c.source_topic = :t AND c.partition = ANY(CAST(:p AS int[]))
      AND (CAST(:since AS timestamptz) IS NULL OR c.period_start >= CAST(:since AS timestamptz))
""")


def partition_snapshot(conn: Connection, source_topic: str, partitions: Sequence[int], *,
                       periods_since: datetime | None = None) -> PartitionSnapshot:
    """applied_through of each partition and its stored counters, from ONE snapshot (one statement).

    ``periods_since`` limits counters to periods starting at or after it (older periods are closed)."""
    applied = {p: -1 for p in partitions}
    counters: list[SnapshotCounter] = []
    for r in conn.execute(_SNAPSHOT, {"t": source_topic, "p": list(partitions), "since": periods_since}):
        if r.what == "offset":
            applied[int(r.partition)] = int(r.applied_through)
        else:
            counters.append(SnapshotCounter(r.wallet_id, r.project_id, r.meter_id, r.period_start,
                                            r.price_version_id, int(r.partition), r.units, r.latest_at,
                                            int(r.events), int(r.late_events), int(r.charged_minor)))
    return PartitionSnapshot(source_topic, applied, tuple(counters))


def dedupe_keys_since(conn: Connection, *, source_topic: str, partitions: Sequence[int],
                      since: datetime) -> dict[int, set[int]]:
    """partition -> the (signed 64-bit) dedupe hashes recorded at or after ``since`` (the dedupe horizon),
    across every life of the topic (ledger/source_logs.py): an event resent after the topic was recreated is
    still a duplicate."""
    out: dict[int, set[int]] = {p: set() for p in partitions}
    topic = base_topic(source_topic)
    rows = conn.execute(text("""
        SELECT partition, key_hashes FROM dedupe_key_sets
        WHERE (source_topic = :t OR starts_with(source_topic, :t_life))
          AND partition = ANY(CAST(:p AS int[])) AND seen_at >= :since
    """), {"t": topic, "t_life": topic + IDENTITY_SEPARATOR, "p": list(partitions), "since": since})
    for r in rows:
        out[int(r.partition)].update(r.key_hashes)
    return out


_NEWEST_DEDUPE_KEYS = text("""
    WITH sets AS (
        SELECT coalesce(arrived_at, seen_at) AS at, as_of_offset, key_hashes FROM dedupe_key_sets
        WHERE (source_topic = :t OR starts_with(source_topic, :t_life)) AND partition = :p
    ), newest AS (
        SELECT max(at) AS at FROM sets
    ), picked AS (
        SELECT s.at, s.as_of_offset, s.key_hashes,
               sum(cardinality(s.key_hashes)) OVER (ORDER BY s.at DESC, s.as_of_offset DESC) AS running
        FROM sets s, newest n
        WHERE s.at >= n.at - make_interval(secs => :horizon_s)
    )
    SELECT h AS key_hash, p.at FROM picked p, unnest(p.key_hashes) AS h
    WHERE p.running - cardinality(p.key_hashes) < :limit
    ORDER BY p.at DESC, p.as_of_offset DESC
    LIMIT :limit
""")


def dedupe_keys_newest(conn: Connection, *, source_topic: str, partition: int, horizon_s: float,
                       limit: int) -> list[tuple[int, datetime]]:
    """The newest ``limit`` dedupe hashes of one partition within the horizon, newest first, each with its
    stream time (the checkpoint's ``stream_time``; ``seen_at`` for rows written before ledger_0006).

    The horizon is measured in STREAM time, against the newest arrival stored for the partition — never the wall
    clock, so a backlog or a replay cannot shrink it (DESIGN §2 invariant 10). The bound is applied in SQL: the
    rows are walked newest first with a running count of their keys and only rows starting below ``limit`` are
    unnested, so a long horizon at a high rate never ships every key to the worker. Across every life of the
    topic, like ``dedupe_keys_since``."""
    topic = base_topic(source_topic)
    rows = conn.execute(_NEWEST_DEDUPE_KEYS, {"t": topic, "t_life": topic + IDENTITY_SEPARATOR, "p": partition,
                                              "horizon_s": horizon_s, "limit": limit})
    return [(int(r.key_hash), r.at) for r in rows]


_DEDUPE_KEY_SETS_IN_HORIZON = text("""
    WITH sets AS (
        SELECT coalesce(arrived_at, seen_at) AS at, as_of_offset, key_hashes FROM dedupe_key_sets
        WHERE (source_topic = :t OR starts_with(source_topic, :t_life)) AND partition = :p
    ), newest AS (
        SELECT max(at) AS at FROM sets
    )
    SELECT s.at, array_send(s.key_hashes) AS packed FROM sets s, newest n
    WHERE s.at >= n.at - make_interval(secs => :horizon_s)
    ORDER BY s.at, s.as_of_offset
""")


def dedupe_key_sets_in_horizon(conn: Connection, *, source_topic: str, partition: int, horizon_s: float,
                               rows_per_fetch: int = 16) -> Iterator[tuple[datetime, bytes]]:
    """EVERY dedupe key set of one partition within the horizon (stream time, measured back from the newest
    stored arrival, like ``dedupe_keys_newest``), OLDEST first, streamed through a server-side cursor
    ``rows_per_fetch`` rows (≤ 50,000 keys each) at a time, so a caller can rebuild the whole horizon without
    holding it. Each row: its stream time and the hashes as PostgreSQL's binary array (``array_send``: a 20-byte
    header, then per key a 4-byte length and the big-endian int64) — decoding millions of keys as Python ints
    would cost more than the query. Run it inside the caller's (repeatable-read) transaction."""
    topic = base_topic(source_topic)
    result = conn.execution_options(stream_results=True, max_row_buffer=rows_per_fetch).execute(
        _DEDUPE_KEY_SETS_IN_HORIZON,
        {"t": topic, "t_life": topic + IDENTITY_SEPARATOR, "p": partition, "horizon_s": horizon_s})
    try:
        for row in result:
            yield row.at, bytes(row.packed)
    finally:
        result.close()


@dataclass(frozen=True, slots=True)
class PartitionHalt:
    """A halted lane of the ledger consumer (ledger/halts.py): a source partition whose next checkpoint cannot
    be applied, or a charges partition holding an undecodable message. It resumes by itself once the cause is
    fixed; ``attempts`` counts the retries so far."""

    scope: str
    topic: str
    partition: int
    reason: str
    error: str
    as_of_offset: int | None
    charges_partition: int
    charges_offset: int
    pending_checkpoints: int
    attempts: int
    halted_at: datetime
    last_attempt_at: datetime
    consumer: str


def partition_halts(conn: Connection) -> list[PartitionHalt]:
    """Every halted lane, oldest first (empty when the pipeline is healthy). The API's health and the
    dashboard show it; an operator reads ``reason`` and ``error`` to fix the cause."""
    rows = conn.execute(text("""
        SELECT scope, topic, partition, reason, error, as_of_offset, charges_partition, charges_offset,
               pending_checkpoints, attempts, halted_at, last_attempt_at, consumer
        FROM partition_halts ORDER BY halted_at, scope, topic, partition
    """)).mappings()
    return [PartitionHalt(**r) for r in rows]


@dataclass(frozen=True, slots=True)
class RefusedCounter:
    """A counter the ledger dead-lettered instead of posting (reason ``wallet_in_other_project``)."""

    id: int
    source_topic: str
    partition: int
    as_of_offset: int
    reason: str
    project_id: str
    wallet_id: str
    wallet_project_id: str
    meter_id: str
    period_start: datetime
    price_version_id: str
    units: Decimal
    events: int
    refused_at: datetime


def refused_counters(conn: Connection, *, project_id: str | None = None, limit: int = 100) -> list[RefusedCounter]:
    """Newest first; of one project (the counter's) when given."""
    rows = conn.execute(text("""
        SELECT id, source_topic, partition, as_of_offset, reason, project_id, wallet_id, wallet_project_id,
               meter_id, period_start, price_version_id, units, events, refused_at
        FROM refused_counters WHERE CAST(:p AS text) IS NULL OR project_id = :p
        ORDER BY id DESC LIMIT :limit
    """), {"p": project_id, "limit": max(1, min(limit, 1000))}).mappings()
    return [RefusedCounter(**r) for r in rows]
