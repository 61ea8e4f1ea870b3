"""The ClickHouse pass of account erasure: the map's ClickHouse entries (api/wallets/erasure_map.py), for every
erasure whose ``analytics_pending`` pairs are still set.

Separate from the PostgreSQL erasure because ClickHouse is another engine (no shared transaction) and may be
down: the PostgreSQL side commits the erasure and queues ``[[subject, pseudonym], …]`` in the request row; this
pass rewrites ClickHouse (every statement idempotent, analytics/erasure.py) and only then clears the pairs, so
a crash or an unreachable ClickHouse means "again next round", never "forgotten". The pairs are the only copy of
the subject left, and only until this pass ran."""

from __future__ import annotations

from typing import Any

from clickhouse_connect.driver.client import Client
from sqlalchemy import Connection, text

from api.tenancy.audit import record_audit
from api.wallets.erasure_map import ANALYTICS_STEPS

BATCH = 10


def erase_analytics_due(conn: Connection, client: Client, *, database: str, limit: int = BATCH) -> int:
    """Rewrite ClickHouse for up to ``limit`` erased accounts; returns how many were completed."""
    rows = conn.execute(text("""
        SELECT id, project_id, wallet_id, analytics_pending FROM wallet_erasures
        WHERE analytics_pending IS NOT NULL ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED
    """), {"limit": limit}).mappings().all()
    for row in rows:
        counts = _erase_one(client, database, row)
        conn.execute(text("""
            UPDATE wallet_erasures SET analytics_pending = NULL, analytics_erased_at = now() WHERE id = :id
        """), {"id": row["id"]})
        record_audit(conn, project_id=row["project_id"], principal=None, action="wallet.erase_analytics",
                     target_kind="wallet", target_id=row["wallet_id"], after={"erasure_id": row["id"], "rows": counts})
    return len(rows)


def _erase_one(client: Client, database: str, row: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in ANALYTICS_STEPS:
        assert entry.analytics is not None
        counts[entry.table] = sum(entry.analytics(client, database, row["project_id"], subject, pseudonym)
                                  for subject, pseudonym in row["analytics_pending"])
    return counts
