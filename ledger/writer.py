"""Persist planned postings with a handful of set-based statements, whatever their number.

Callers hold the row locks of every wallet involved and pass the ``WalletBook`` of each. ``write``:

1. allocates transaction and bucket ids up front (so no RETURNING-order assumptions are needed),
2. inserts the buckets the plans created, updates the buckets they burned,
3. inserts the transactions (``ON CONFLICT (idempotency_key) DO NOTHING``: a key already taken means the
   caller's own checks were bypassed by a concurrent writer — the whole transaction is refused),
4. inserts the allocations, sets each wallet's balance to its book's final balance (and takes what a settle pass
   posts off its ``unsettled_minor`` in the same row update: one new row version per wallet, not two),
5. writes one outbox row (TransactionPosted) per transaction, published after commit by the relay.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, text

from ledger.contracts import TOPIC_LEDGER_TRANSACTIONS, TransactionKind, TransactionPosted
from ledger.errors import IdempotencyConflict
from ledger.postings import Posting, WalletBook
from ledger.rows import AllocationRow, TransactionRow
from ledger.sqlrows import rows_json

__all__ = ["Draft", "transaction_event", "transaction_event_json", "transaction_row", "write"]


@dataclass(frozen=True, slots=True)
class Draft:
    """One transaction to write: a planned posting plus what describes it."""

    wallet_id: str
    project_id: str
    kind: TransactionKind
    posting: Posting
    idempotency_key: str
    request_fingerprint: str | None = None
    source_ref: str | None = None
    related_transaction_id: int | None = None
    hold_id: str | None = None
    meter_id: str | None = None
    period_start: datetime | None = None
    price_version_id: str | None = None
    reason: str | None = None
    metadata: dict[str, Any] | None = field(default=None)


_ALLOCATE_IDS = text("""
    SELECT now() AS now,
           (SELECT coalesce(array_agg(nextval('transactions_id_seq')), '{}') FROM generate_series(1, :tx)) AS tx_ids,
           (SELECT coalesce(array_agg(nextval('credit_buckets_id_seq')), '{}') FROM generate_series(1, :b)) AS bucket_ids
""")

_INSERT_BUCKETS = text("""
    INSERT INTO credit_buckets (id, wallet_id, project_id, source, priority, granted_minor, remaining_minor,
                                expires_at, created_at, source_ref)
    SELECT b.id, b.wallet_id, b.project_id, b.source, b.priority, b.granted, b.remaining, b.expires_at, :now, b.ref
    FROM json_to_recordset(CAST(:rows AS json)) AS b(id bigint, wallet_id text, project_id text, source text,
         priority int, granted bigint, remaining bigint, expires_at timestamptz, ref text)
""")

_UPDATE_BUCKETS = text("""
    UPDATE credit_buckets c SET remaining_minor = u.remaining
    FROM json_to_recordset(CAST(:rows AS json)) AS u(id bigint, remaining bigint)
    WHERE c.id = u.id
""")

_INSERT_TRANSACTIONS = text("""
    INSERT INTO transactions (id, project_id, wallet_id, kind, amount_minor, balance_before_minor,
        balance_after_minor, idempotency_key, request_fingerprint, source_ref, related_transaction_id, hold_id,
        meter_id, period_start, price_version_id, reason, metadata, created_at)
    SELECT t.id, t.project_id, t.wallet_id, t.kind, t.amount, t.before, t.after, t.key, t.fingerprint, t.ref,
           t.related, t.hold_id, t.meter_id, t.period_start, t.price_version_id, t.reason, t.metadata, :now
    FROM json_to_recordset(CAST(:rows AS json)) AS t(id bigint, project_id text, wallet_id text, kind text,
         amount bigint, before bigint, after bigint, key text, fingerprint text, ref text, related bigint,
         hold_id text, meter_id text, period_start timestamptz, price_version_id text, reason text, metadata jsonb)
    ORDER BY t.id
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id
""")

_INSERT_ALLOCATIONS = text("""
    INSERT INTO transaction_allocations (transaction_id, bucket_id, amount_minor)
    SELECT a.tx, a.bucket, a.amount FROM json_to_recordset(CAST(:rows AS json)) AS a(tx bigint, bucket bigint, amount bigint)
""")

_UPDATE_WALLETS = text("""
    UPDATE wallets w SET balance_minor = u.balance, unsettled_minor = w.unsettled_minor - u.settled, updated_at = :now
    FROM json_to_recordset(CAST(:rows AS json)) AS u(id text, balance bigint, settled bigint)
    WHERE w.id = u.id
""")

_INSERT_OUTBOX = text("""
    INSERT INTO outbox (topic, key, payload, created_at)
    SELECT :topic, o.key, convert_to(o.payload, 'UTF8'), :now
    FROM json_to_recordset(CAST(:rows AS json)) AS o(key text, payload text)
""")


def write(conn: Connection, books: Mapping[str, WalletBook], drafts: Sequence[Draft], *,
          settled: Mapping[str, int] | None = None) -> list[TransactionRow]:
    """Write ``drafts`` (in order) and the bucket/balance changes of ``books``; return the rows written.
    ``settled``: per wallet, the unsettled usage these drafts post (ledger/settle.py), taken off ``unsettled_minor``."""
    settled = settled or {}
    created = [(wallet_id, temp_id, spec, granted) for wallet_id, book in books.items()
               for temp_id, (spec, granted) in book.created.items()]
    ids = conn.execute(_ALLOCATE_IDS, {"tx": len(drafts), "b": len(created)}).one()
    now: datetime = ids.now
    tx_ids = sorted(ids.tx_ids)  # ascending: a wallet's postings read in id order chain their balances
    real_bucket = {(w, temp): real for (w, temp, _, _), real in zip(created, sorted(ids.bucket_ids), strict=True)}
    sources = {(w, b.id): b.source for w, book in books.items() for b in book.buckets}
    _insert_buckets(conn, books, created, real_bucket, now)
    _update_buckets(conn, books)
    _insert_transactions(conn, drafts, tx_ids, now)
    rows = [transaction_row(d, tx_id, now, real_bucket, sources) for d, tx_id in zip(drafts, tx_ids, strict=True)]
    _insert_allocations(conn, rows)
    conn.execute(_UPDATE_WALLETS, {"rows": rows_json({"id": w, "balance": b.balance_minor, "settled": settled.get(w, 0)}
                                                     for w, b in books.items()), "now": now})
    _insert_outbox(conn, rows, drafts)
    return rows


def _insert_buckets(conn: Connection, books: Mapping[str, WalletBook], created: list[Any],
                    real_bucket: dict[tuple[str, int], int], now: datetime) -> None:
    if not created:
        return
    conn.execute(_INSERT_BUCKETS, {"now": now, "rows": rows_json(
        {"id": real_bucket[(w, temp)], "wallet_id": w, "project_id": _project_of(books[w]), "source": spec.source,
         "priority": spec.priority, "granted": granted,
         # a bucket created by this plan may already be partly burned by a later posting of the same plan
         "remaining": books[w].changed.get(temp, granted), "expires_at": spec.expires_at, "ref": spec.source_ref}
        for w, temp, spec, granted in created)})


def _project_of(book: WalletBook) -> str:
    assert book.project_id is not None, "a book that creates buckets must know its project"
    return book.project_id


def _update_buckets(conn: Connection, books: Mapping[str, WalletBook]) -> None:
    changed = [(bucket_id, remaining) for book in books.values() for bucket_id, remaining in book.changed.items()
               if bucket_id > 0]
    if changed:
        conn.execute(_UPDATE_BUCKETS, {"rows": rows_json({"id": i, "remaining": r} for i, r in changed)})


def _insert_transactions(conn: Connection, drafts: Sequence[Draft], tx_ids: list[int], now: datetime) -> None:
    if not drafts:
        return
    inserted = conn.execute(_INSERT_TRANSACTIONS, {"now": now, "rows": rows_json(
        {"id": tx_id, "project_id": d.project_id, "wallet_id": d.wallet_id, "kind": d.kind.value,
         "amount": d.posting.amount_minor, "before": d.posting.balance_before_minor,
         "after": d.posting.balance_after_minor, "key": d.idempotency_key, "fingerprint": d.request_fingerprint,
         "ref": d.source_ref, "related": d.related_transaction_id, "hold_id": d.hold_id, "meter_id": d.meter_id,
         "period_start": d.period_start, "price_version_id": d.price_version_id, "reason": d.reason,
         "metadata": d.metadata}
        for d, tx_id in zip(drafts, tx_ids, strict=True))}).all()
    if len(inserted) != len(drafts):
        taken = sorted({d.idempotency_key for d in drafts} - _keys_of(drafts, tx_ids, {r.id for r in inserted}))
        raise IdempotencyConflict(f"idempotency keys already used by a concurrent request: {', '.join(taken)}",
                                  idempotency_keys=taken)


def _keys_of(drafts: Sequence[Draft], tx_ids: list[int], inserted: set[int]) -> set[str]:
    return {d.idempotency_key for d, tx_id in zip(drafts, tx_ids, strict=True) if tx_id in inserted}


def transaction_row(draft: Draft, tx_id: int, now: datetime, real_bucket: dict[tuple[str, int], int],
                    sources: dict[tuple[str, int], str]) -> TransactionRow:
    """The row ``draft`` becomes as transaction ``tx_id`` (bucket ids of new buckets mapped to real ones)."""
    allocations = tuple(
        AllocationRow(
            real_bucket.get((draft.wallet_id, a.bucket_id), a.bucket_id) if a.bucket_id is not None else None,
            a.amount_minor,
            sources.get((draft.wallet_id, a.bucket_id)) if a.bucket_id is not None else None,
        )
        for a in draft.posting.allocations
    )
    return TransactionRow(
        id=tx_id, project_id=draft.project_id, wallet_id=draft.wallet_id, kind=draft.kind.value,
        amount_minor=draft.posting.amount_minor, balance_before_minor=draft.posting.balance_before_minor,
        balance_after_minor=draft.posting.balance_after_minor, idempotency_key=draft.idempotency_key,
        source_ref=draft.source_ref, related_transaction_id=draft.related_transaction_id, hold_id=draft.hold_id,
        meter_id=draft.meter_id, period_start=draft.period_start, price_version_id=draft.price_version_id,
        reason=draft.reason, metadata=draft.metadata, created_at=now, allocations=allocations,
    )


def _insert_allocations(conn: Connection, rows: list[TransactionRow]) -> None:
    flat = [(row.id, a.bucket_id, a.amount_minor) for row in rows for a in row.allocations]
    if flat:
        conn.execute(_INSERT_ALLOCATIONS, {"rows": rows_json({"tx": t, "bucket": b, "amount": a} for t, b, a in flat)})


def _insert_outbox(conn: Connection, rows: list[TransactionRow], drafts: Sequence[Draft]) -> None:
    if not rows:
        return
    payloads = [transaction_event_json(row, draft) for row, draft in zip(rows, drafts, strict=True)]
    conn.execute(_INSERT_OUTBOX, {"topic": TOPIC_LEDGER_TRANSACTIONS, "now": rows[0].created_at, "rows": rows_json(
        {"key": r.wallet_id, "payload": p} for r, p in zip(rows, payloads, strict=True))})


def transaction_event(row: TransactionRow, draft: Draft) -> TransactionPosted:
    """The TransactionPosted outbox payload of a written row."""
    credited = _credited(row)
    return TransactionPosted(
        transaction_id=row.id, project_id=row.project_id, wallet_id=row.wallet_id, kind=draft.kind,
        amount_minor=row.amount_minor, balance_before_minor=row.balance_before_minor,
        balance_after_minor=row.balance_after_minor, idempotency_key=row.idempotency_key,
        source_ref=row.source_ref, meter_id=row.meter_id, bucket_source=credited[0] if credited else None,
        created_at=row.created_at, related_transaction_id=row.related_transaction_id,
        period_start=row.period_start, price_version_id=row.price_version_id, reason=row.reason,
        debt_settled_minor=draft.posting.debt_settled_minor,
    )


def transaction_event_json(row: TransactionRow, draft: Draft) -> str:
    """``transaction_event(row, draft).model_dump_json()``, byte for byte, without building the model: one per
    posting on the checkpoint path and the hot debit path, where validating and dumping the pydantic model was
    ~20 µs of a ~270 µs posting (py-spy over ``bench.ledger_apply``). The members are in the model's field order;
    tests/unit/ledger/test_outbox_payload.py holds the two equal over generated rows."""
    credited = _credited(row)
    return orjson.dumps({
        "transaction_id": row.id, "project_id": row.project_id, "wallet_id": row.wallet_id,
        "kind": draft.kind.value, "amount_minor": row.amount_minor, "balance_before_minor": row.balance_before_minor,
        "balance_after_minor": row.balance_after_minor, "idempotency_key": row.idempotency_key,
        "source_ref": row.source_ref, "meter_id": row.meter_id, "bucket_source": credited[0] if credited else None,
        "created_at": row.created_at, "related_transaction_id": row.related_transaction_id,
        "period_start": row.period_start, "price_version_id": row.price_version_id, "reason": row.reason,
        "debt_settled_minor": draft.posting.debt_settled_minor,
    }, option=orjson.OPT_UTC_Z).decode()


def _credited(row: TransactionRow) -> list[str]:
    """The sources of the buckets a posting credited (the first is the event's ``bucket_source``)."""
    return [a.bucket_source for a in row.allocations if a.amount_minor > 0 and a.bucket_source]
