"""The outbox relay: publishes committed TransactionPosted rows to ledger.transactions.v1 (key = wallet).

At-least-once: a row is marked published only after the broker acknowledged it; a crash in between
republishes it, and consumers dedupe by ``transaction_id``. One relay publishes at a time per database
(a transaction-scoped advisory lock), so several ledger processes can all run a relay safely and rows
go out in id order."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import structlog
from confluent_kafka import KafkaError, Message, Producer
from sqlalchemy import Engine, text

from ledger import metrics
from ledger.kafka import topic_name

__all__ = ["OUTBOX_LOCK_KEY", "OutboxRelay"]

log = structlog.get_logger("ledger.outbox")

#: pg advisory lock key held (transaction-scoped) by the relay that is publishing.
OUTBOX_LOCK_KEY = 0x6D6C_6F62  # "mlob"

_CLAIM = text("""
    SELECT id, topic, key, payload FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT :n
""")
_MARK = text("UPDATE outbox SET published_at = now() WHERE id = ANY(CAST(:ids AS bigint[]))")
#: the backlog through the partial index of unpublished rows, capped so a huge backlog costs a bounded scan
_BACKLOG = text("SELECT count(*) FROM (SELECT 1 FROM outbox WHERE published_at IS NULL LIMIT 1000000) AS b")
#: how often the relay recounts its backlog for the metric
BACKLOG_EVERY_S = 2.0


class OutboxRelay:
    def __init__(self, *, engine: Engine, producer: Producer, topic_prefix: str = "", batch_rows_max: int = 1_000,
                 poll_s: float = 0.2, delivery_timeout_s: float = 30.0) -> None:
        self._engine = engine
        self._producer = producer
        self._prefix = topic_prefix
        self._batch = batch_rows_max
        self._poll_s = poll_s
        self._delivery_timeout_s = delivery_timeout_s
        self.published = 0

    def publish_once(self) -> int:
        """Publish one batch; return how many rows were marked published (0 if another relay holds the lock)."""
        with self._engine.begin() as conn:
            if not conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": OUTBOX_LOCK_KEY}).scalar_one():
                return 0
            rows = conn.execute(_CLAIM, {"n": self._batch}).all()
            if not rows:
                return 0
            delivered = self._deliver(rows)
            if delivered:
                conn.execute(_MARK, {"ids": delivered})
        self.published += len(delivered)
        metrics.OUTBOX_PUBLISHED.inc(len(delivered))
        return len(delivered)

    def count_backlog(self) -> int:
        """Unpublished rows (at most 1M), also set as ``meterline_outbox_backlog_rows``."""
        with self._engine.connect() as conn:
            backlog = int(conn.execute(_BACKLOG).scalar_one())
        metrics.OUTBOX_BACKLOG.set(backlog)
        return backlog

    def _deliver(self, rows: Sequence[Any]) -> list[int]:
        acked: list[int] = []
        failed: list[str] = []

        def on_delivery(row_id: int) -> Any:
            def callback(err: KafkaError | None, _msg: Message) -> None:
                if err is None:
                    acked.append(row_id)
                else:
                    failed.append(str(err))
            return callback

        for row in rows:
            self._produce(topic_name(row.topic, self._prefix), row.key, bytes(row.payload), on_delivery(row.id))
        remaining = self._producer.flush(self._delivery_timeout_s)
        if failed or remaining:
            log.warning("outbox_delivery_incomplete", acked=len(acked), failed=len(failed), unsent=remaining,
                        first_error=failed[0] if failed else None)
        return acked

    def _produce(self, topic: str, key: str, value: bytes, callback: Any) -> None:
        while True:
            try:
                self._producer.produce(topic, key=key.encode(), value=value, on_delivery=callback)
                return
            except BufferError:  # local queue full: let deliveries drain, then retry
                self._producer.poll(0.1)

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop``: publish while there is work, otherwise wait ``poll_s``. Errors are logged
        and retried (nothing is marked published unless delivered)."""
        backoff = self._poll_s
        counted_at = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() - counted_at >= BACKLOG_EVERY_S:
                    counted_at = time.monotonic()
                    self.count_backlog()
                n = self.publish_once()
                backoff = self._poll_s
            except Exception:
                log.exception("outbox_relay_error")
                n = 0
                backoff = min(backoff * 2, 5.0)
            if n < self._batch:
                stop.wait(backoff)
        self._producer.flush(5)

    def drain(self, *, timeout_s: float) -> int:
        """Publish until nothing is left or ``timeout_s`` passes (tests and shutdown)."""
        deadline = time.monotonic() + timeout_s
        total = 0
        while time.monotonic() < deadline:
            n = self.publish_once()
            total += n
            if n == 0:
                break
        return total
