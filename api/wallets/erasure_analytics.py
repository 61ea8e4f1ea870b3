"""The ClickHouse pass of account erasure: the map's ClickHouse entries (api/wallets/erasure_map.py), for every
erasure whose ``analytics_pending`` pairs are still set.

Separate from the PostgreSQL erasure because ClickHouse is another engine (no shared transaction) and may be
down: the PostgreSQL side commits the erasure and queues ``[[subject, pseudonym], …]`` in the request row; this
pass rewrites ClickHouse (every statement idempotent, analytics/erasure.py) and only then clears the pairs, so
a crash or an unreachable ClickHouse means "again next round", never "forgotten". The pairs are the only copy of
the subject left, and only until this pass ran."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import structlog
from clickhouse_connect.driver.client import Client
from sqlalchemy import Connection, Engine, text

from api.tenancy.audit import record_audit
from api.wallets.erasure_map import ANALYTICS_STEPS

log = structlog.get_logger("api.erasure_analytics")

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


class EmbeddedErasurePass:
    """The ClickHouse pass inside the process that owns an embedded chDB path (the api, whose analytics sink runs
    in-process): no other process may open that path, so the scheduler cannot run ``erase_analytics`` there.

    Every ``every_s`` it asks ``clients`` for a client lease and the analytics database (None while analytics is not
    up in this process, or another process owns ClickHouse: nothing to do) and runs ``erase_analytics_due`` until
    nothing is queued. A failure is logged and retried next round;
    the queued pairs are cleared only by a completed pass, so nothing is forgotten."""

    def __init__(self, engine: Engine, clients: Callable[[], tuple[AbstractContextManager[Client], str] | None], *,
                 every_s: float = 30.0) -> None:
        self._engine, self._clients, self._every_s = engine, clients, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="analytics-erasure", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def run_once(self) -> int:
        """Erase every queued account now; returns how many were completed (0 when analytics is not up)."""
        found = self._clients()
        if found is None:
            return 0
        lease, database = found
        done = 0
        with lease as client:
            while not self._stop.is_set():
                with self._engine.begin() as conn:
                    n = erase_analytics_due(conn, client, database=database)
                done += n
                if n < BATCH:
                    return done
        return done

    def _loop(self) -> None:
        while not self._stop.wait(self._every_s):
            try:
                if done := self.run_once():
                    log.info("analytics_erasure_pass", accounts=done)
            except Exception as exc:  # ClickHouse or PostgreSQL away: the pairs stay queued, next round retries
                log.error("analytics_erasure_failed", error=str(exc))
