"""Which life of a Kafka topic the ledger's offset marks belong to.

A Kafka offset names a record only within one life of a topic. The embedded broker keeps its logs in memory,
so every ``meterline up`` creates the topics anew, empty, while PostgreSQL keeps what names offsets of the
previous life: ``applied_offsets``, ``usage_counters``, ``dedupe_key_sets`` and the idempotency keys of usage
transactions (``usage:{topic}:{partition}:{offset}:…``). Reusing the bare topic name would make the new
life's events look applied already (skipped: under-charged) and could make a new charge collide with an old
key (taken for a duplicate: under-charged again). The same happens when an operator deletes and recreates a
topic on a real cluster.

So each life of a topic has its own identity: the bare name for the first, ``name@N`` for the N-th
recreation. Marks, counters and keys are per identity. The ledger merges a key's counters across every
identity and partition before pricing (ledger/checkpoints.py step 4), exactly as it merges partitions, so a
new life starts its counters at zero without charging again for anything an earlier life applied. Dedupe
keys are read across every life of the topic (ledger.queries.dedupe_keys_since), so an event resent after
a recreation is still recognised within the dedupe horizon.

Who calls what: whoever CREATES topics (``meterline up`` / ``meterline topics create --then-migrate``) calls
``record_created`` with the topics it just created, after migrating and before any consumer starts; every
consumer reads ``current_identity`` once at start-up.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, text

__all__ = ["IDENTITY_SEPARATOR", "base_topic", "current_identity", "identity", "record_created"]

#: Never part of a Kafka topic name (legal characters: letters, digits, ``.``, ``_``, ``-``).
IDENTITY_SEPARATOR = "@"


def identity(topic: str, epoch: int) -> str:
    return topic if epoch == 0 else f"{topic}{IDENTITY_SEPARATOR}{epoch}"


def base_topic(source_identity: str) -> str:
    return source_identity.split(IDENTITY_SEPARATOR, 1)[0]


def current_identity(conn: Connection, topic: str) -> str:
    """The identity of the topic's current life (the bare name if it was never recreated)."""
    epoch = conn.execute(text("SELECT epoch FROM source_logs WHERE topic = :t"), {"t": topic}).scalar()
    return identity(topic, int(epoch or 0))


def record_created(conn: Connection, topics: Iterable[str]) -> dict[str, int]:
    """Record that ``topics`` were just created on the broker; returns topic -> epoch of the new life.

    A topic this database has history for (a ``source_logs`` row, or marks under its bare name from before
    this table existed) starts a new epoch; a topic without history starts at epoch 0."""
    epochs: dict[str, int] = {}
    for topic in sorted(set(topics)):
        had_marks = conn.execute(text("SELECT EXISTS (SELECT 1 FROM applied_offsets WHERE source_topic = :t)"),
                                 {"t": topic}).scalar()
        epoch = conn.execute(text("""
            INSERT INTO source_logs (topic, epoch) VALUES (:t, CASE WHEN :had_marks THEN 1 ELSE 0 END)
            ON CONFLICT (topic) DO UPDATE SET epoch = source_logs.epoch + 1, updated_at = now()
            RETURNING epoch
        """), {"t": topic, "had_marks": bool(had_marks)}).scalar_one()
        epochs[topic] = int(epoch)
    return epochs
