"""`meterline down` drains: every accepted event applied to the ledger and the outbox relayed before it stops.

What "accepted" means here: every record in ``usage.events.v1`` up to the partition's log end. The broker's
ListOffsets answer is wrong on the embedded broker (DESIGN §5), so the end is read from the broker's own
watermark object in its disk store (meterline/diskstore.py); on an external Kafka the broker's high watermark is
right. "Applied" is the ledger's ``applied_through`` mark of the topic's current life: the streams workers emit a
checkpoint for every consumed offset, dead-lettered and duplicate events included, so the mark reaches the
end of the log once everything before it is charged.

The pure core is ``backlog``; the rest is I/O at the edge.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("meterline.drain")


@dataclass(frozen=True)
class DrainProgress:
    events_behind: int  # records in the usage topic the ledger has not applied yet
    outbox_backlog: int  # ledger outbox rows not yet relayed to Kafka
    ends_known: bool  # False on the embedded memory broker: its log ends cannot be read exactly

    @property
    def remaining(self) -> int:
        return self.events_behind + self.outbox_backlog

    @property
    def done(self) -> bool:
        return self.remaining == 0


def backlog(log_ends: Mapping[int, int], applied_through: Mapping[int, int]) -> int:
    """Records not yet applied: per partition, the log end (next offset) minus one past the applied mark."""
    return sum(max(0, end - 1 - applied_through.get(partition, -1)) for partition, end in log_ends.items())


class DrainProbe:
    """Reads the progress of a running stack (its state file gives the engines' URLs and the disk store)."""

    def __init__(self, *, database_url: str, bootstrap: str, topic: str, broker_data: Path | None,
                 ends_exact: bool = True) -> None:
        from ledger.db import make_engine

        self.engine = make_engine(database_url, pool_size=1, application_name="meterline-drain")
        self.bootstrap = bootstrap
        self.topic = topic
        self.broker_data = broker_data
        self.ends_exact = ends_exact  # False for the embedded memory broker (its high watermark is short)
        self._partitions: list[int] | None = None

    def partitions(self) -> list[int]:
        if self._partitions is None:
            from ledger.kafka import existing_topics

            self._partitions = list(range(existing_topics(self.bootstrap).get(self.topic, 0)))
        return self._partitions

    def log_ends(self) -> tuple[dict[int, int], bool]:
        if self.broker_data is not None:
            from meterline.diskstore import partition_log_end

            ends = {p: partition_log_end(self.broker_data, self.topic, p) or 0 for p in self.partitions()}
            return ends, True
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "meterline-drain",
                             "enable.auto.commit": False})
        try:
            ends = {p: int(consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=5)[1])
                    for p in self.partitions()}
        finally:
            consumer.close()
        return ends, self.ends_exact

    def progress(self) -> DrainProgress:
        from sqlalchemy import text

        from ledger.source_logs import current_identity

        ends, known = self.log_ends()
        with self.engine.connect() as conn:
            source = current_identity(conn, self.topic)
            applied = {int(p): int(o) for p, o in conn.execute(
                text("SELECT partition, applied_through FROM applied_offsets WHERE source_topic = :t"),
                {"t": source})}
            outbox = int(conn.execute(text("SELECT count(*) FROM outbox WHERE published_at IS NULL")).scalar_one())
        return DrainProgress(backlog(ends, applied), outbox, known)

    def close(self) -> None:
        self.engine.dispose()


def wait_drained(probe: DrainProbe, *, timeout_s: float, on_progress: Callable[[DrainProgress], None],
                 poll_s: float = 0.25) -> DrainProgress:
    """Poll until nothing remains or the time is up; returns the last progress read."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            progress = probe.progress()
        except Exception as exc: # an engine restarting: keep waiting within the deadline
            log.warning("drain progress unreadable; retrying", error=str(exc))
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)
            continue
        on_progress(progress)
        if progress.done or time.monotonic() >= deadline:
            return progress
        time.sleep(poll_s)
