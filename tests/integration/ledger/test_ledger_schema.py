"""The database itself keeps the ledger append-only and its arithmetic honest (DESIGN §2.3)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from ledger import queries, service
from ledger.db import make_engine

pytestmark = pytest.mark.integration


@pytest.fixture
def conn(database_url: str) -> Iterator[Connection]:
    engine = make_engine(database_url, pool_size=1)
    with engine.connect() as connection:
        yield connection
    engine.dispose()


def _seed(conn: Connection) -> int:
    conn.execute(text("INSERT INTO wallets (id, project_id, owner_kind, owner_ref) VALUES ('w1','p1','user','u1')"))
    tx_id = conn.execute(text(
        "INSERT INTO transactions (project_id, wallet_id, kind, amount_minor, balance_before_minor,"
        " balance_after_minor, idempotency_key) VALUES ('p1','w1','top_up',100,0,100,'k1') RETURNING id"
    )).scalar_one()
    conn.execute(text("INSERT INTO transaction_allocations (transaction_id, bucket_id, amount_minor)"
                      " VALUES (:t, NULL, 100)"), {"t": tx_id})
    conn.commit()
    return int(tx_id)


@pytest.mark.parametrize("statement", [
    "UPDATE transactions SET amount_minor = 1 WHERE id = :t",
    "DELETE FROM transactions WHERE id = :t",
    "UPDATE transaction_allocations SET amount_minor = 1 WHERE transaction_id = :t",
    "DELETE FROM transaction_allocations WHERE transaction_id = :t",
])
def test_posted_rows_cannot_be_changed_or_deleted(conn: Connection, statement: str) -> None:
    tx_id = _seed(conn)
    with pytest.raises(DBAPIError, match="append-only"):
        conn.execute(text(statement), {"t": tx_id})
    conn.rollback()
    assert conn.execute(text("SELECT amount_minor FROM transactions WHERE id = :t"), {"t": tx_id}).scalar_one() == 100


def test_truncate_is_refused(conn: Connection) -> None:
    _seed(conn)
    with pytest.raises(DBAPIError, match="append-only"):
        conn.execute(text("TRUNCATE transactions CASCADE"))
    conn.rollback()


def test_balance_arithmetic_and_unique_keys_are_enforced(conn: Connection) -> None:
    _seed(conn)
    with pytest.raises(IntegrityError, match="balance_arithmetic"):
        conn.execute(text(
            "INSERT INTO transactions (project_id, wallet_id, kind, amount_minor, balance_before_minor,"
            " balance_after_minor, idempotency_key) VALUES ('p1','w1','top_up',5,100,106,'k2')"))
    conn.rollback()
    with pytest.raises(IntegrityError, match="idempotency_key"):
        conn.execute(text(
            "INSERT INTO transactions (project_id, wallet_id, kind, amount_minor, balance_before_minor,"
            " balance_after_minor, idempotency_key) VALUES ('p1','w1','top_up',5,100,105,'k1')"))
    conn.rollback()


def test_burning_credit_updates_the_bucket_in_place_until_it_runs_empty(conn: Connection) -> None:
    """ledger_0017: the burn-order index is partial on the generated ``live`` flag, not on ``remaining_minor``, so a
    debit that leaves credit in a bucket is a HOT update (no index entry written); the debit that empties it flips
    the flag, and the bucket leaves the burn order."""
    service.ensure_wallet(conn, project_id="p1", owner_kind="user", owner_ref="u1", wallet_id="w1")
    service.grant_credits(conn, wallet_id="w1", amount_minor=30, idempotency_key="g1")
    conn.commit()
    for n in range(3):
        service.debit(conn, wallet_id="w1", amount_minor=10, idempotency_key=f"d{n}")
        live = conn.execute(text("SELECT live FROM credit_buckets WHERE wallet_id = 'w1'")).scalar_one()
        assert live is (n < 2)
    updated, hot = conn.execute(text(
        "SELECT pg_stat_get_xact_tuples_updated(t), pg_stat_get_xact_tuples_hot_updated(t) "
        "FROM CAST('credit_buckets' AS regclass) t")).one()
    assert (updated, hot) == (3, 2)  # the emptying debit rewrites the index entries: the flag moved
    assert queries.list_buckets(conn, "w1") == []
    assert [b.remaining_minor for b in queries.list_buckets(conn, "w1", include_empty=True)] == [0]
    conn.commit()
