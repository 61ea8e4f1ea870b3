"""Time-driven postings the scheduler runs: expire reservations and expire credit buckets.

Both lock the affected wallets in id order first (the ledger-wide lock discipline) and work in bounded
batches, so a backlog is worked off over several runs without long transactions."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, text

from ledger.books import load_books, lock_wallets
from ledger.contracts import TransactionKind
from ledger.settle import settle_usage
from ledger.writer import Draft, write

__all__ = ["expire_credits", "expire_holds"]

_DUE_HOLD_WALLETS = text("""
    SELECT DISTINCT wallet_id FROM holds WHERE status = 'active' AND expires_at <= :now ORDER BY wallet_id LIMIT :n
""")

_EXPIRE_HOLDS = text("""
    WITH expired AS (
        UPDATE holds SET status = 'expired', updated_at = now()
        WHERE status = 'active' AND expires_at <= :now AND wallet_id = ANY(CAST(:wallets AS text[]))
        RETURNING wallet_id, amount_minor
    ), totals AS (
        SELECT wallet_id, sum(amount_minor) AS total, count(*) AS n FROM expired GROUP BY wallet_id
    ), released AS (
        UPDATE wallets w SET held_minor = w.held_minor - t.total, updated_at = now()
        FROM totals t WHERE w.id = t.wallet_id
        RETURNING t.n
    )
    SELECT coalesce(sum(n), 0) FROM released
""")

_DUE_BUCKET_WALLETS = text("""
    SELECT DISTINCT wallet_id FROM credit_buckets
    WHERE expired_at IS NULL AND expires_at <= :now ORDER BY wallet_id LIMIT :n
""")

_DUE_BUCKETS = text("""
    SELECT id, wallet_id FROM credit_buckets
    WHERE expired_at IS NULL AND expires_at <= :now AND wallet_id = ANY(CAST(:wallets AS text[]))
    ORDER BY wallet_id, expires_at, id
""")

_MARK_EXPIRED = text("UPDATE credit_buckets SET expired_at = :now WHERE id = ANY(CAST(:ids AS bigint[]))")


def expire_holds(conn: Connection, *, now: datetime, batch_wallets: int = 1_000) -> int:
    """Release active holds whose time is up (status 'expired'); returns how many. One batch per call."""
    wallets = [r[0] for r in conn.execute(_DUE_HOLD_WALLETS, {"now": now, "n": batch_wallets})]
    if not wallets:
        return 0
    locked = list(lock_wallets(conn, wallets))
    return int(conn.execute(_EXPIRE_HOLDS, {"now": now, "wallets": locked}).scalar_one())


def expire_credits(conn: Connection, *, now: datetime, batch_wallets: int = 500) -> int:
    """Post what is left in buckets past their expiry as ``expiry`` (breakage) and mark them expired.

    Only remainders are posted: a bucket burned to 0 is marked expired without a transaction. Returns the
    number of expiry transactions posted. Idempotency key ``expiry:bucket:{id}``: a bucket expires once."""
    wallet_ids = [r[0] for r in conn.execute(_DUE_BUCKET_WALLETS, {"now": now, "n": batch_wallets})]
    if not wallet_ids:
        return 0
    # usage priced but not posted yet (ledger/settle.py) was metered before now: it burns the expiring credit first,
    # as it would have, posted at once. This also locks every wallet (usage_charges rows first: the lock order).
    settle_usage(conn, keys_max=None, wallet_ids=wallet_ids)
    wallets = lock_wallets(conn, wallet_ids)
    due = conn.execute(_DUE_BUCKETS, {"now": now, "wallets": list(wallets)}).all()
    books = load_books(conn, wallets.values(), now=now)
    drafts: list[Draft] = []
    for bucket_id, wallet_id in due:
        posting = books[wallet_id].expire(bucket_id)
        if posting is not None:
            drafts.append(Draft(wallet_id=wallet_id, project_id=wallets[wallet_id].project_id,
                                kind=TransactionKind.EXPIRY, posting=posting,
                                idempotency_key=f"expiry:bucket:{bucket_id}", source_ref=f"bucket:{bucket_id}"))
    if drafts:
        write(conn, {w: b for w, b in books.items() if b.changed}, drafts)
    conn.execute(_MARK_EXPIRED, {"now": now, "ids": [bucket_id for bucket_id, _ in due]})
    return len(drafts)
