"""Fencing: one owner per source partition (DESIGN §2 invariant 11), and a charges topic that is never
re-partitioned under the ledger.

Owner epochs. A streams worker that is about to seed source partition p calls ``take_owner_epoch`` — one
``UPDATE applied_offsets SET owner_epoch = owner_epoch + 1 … RETURNING`` in its own committed transaction —
BEFORE it reads the snapshot it seeds from, and stamps every checkpoint of p with that epoch. The ledger
(ledger/checkpoints.py step 1) locks the same row and refuses (``fenced``, a no-op) any checkpoint with an
older epoch. Why it is enough:

- the increment and every apply lock the same row, so they are totally ordered: a previous owner's
  checkpoint applied BEFORE the increment is in the snapshot the new owner reads after it (and its offsets
  are skipped as applied); one arriving AFTER it is refused, and its offsets — beyond the snapshot's
  applied_through — are metered again by the new owner, from the group's committed offset, which the seeding
  wait kept at or below applied_through + 1. Either way each offset is charged by exactly one owner, under
  the catalog that owner saw; before fencing a late checkpoint of the old owner applied on top of the new
  owner's seed and both charged the same offsets (issue 13, item 7: 300 units on each of two wallets).
- epochs only grow (the row is never deleted), so an owner from two handovers ago is refused too.

The charges topic. A checkpoint is keyed by its source partition, so all checkpoints of one source partition
share one charges partition and are applied in order. Adding partitions to ``ledger.charges.v1`` moves keys to
other partitions, where they could be applied before older checkpoints still queued in the old one (a stale
no-op then, but the newer one skipped the dedupe keys and counters of the older: lost usage). So the count is
recorded at first use and a consumer (or worker) refuses to start when it differs.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from ledger.source_logs import current_identity

__all__ = ["ChargesTopicRepartitioned", "check_charges_partitions", "take_owner_epoch"]


class ChargesTopicRepartitioned(RuntimeError):
    code = "ledger.charges_topic_repartitioned"


_TAKE_EPOCH = text("""
    INSERT INTO applied_offsets (source_topic, partition, owner_epoch) VALUES (:topic, :partition, 1)
    ON CONFLICT (source_topic, partition) DO UPDATE SET owner_epoch = applied_offsets.owner_epoch + 1,
                                                      updated_at = now()
    RETURNING owner_epoch
""")


def take_owner_epoch(conn: Connection, source_topic: str, partition: int) -> int:
    """The new owner epoch of (source_topic, partition). The caller commits it BEFORE reading the seed
    snapshot (see the module doc); it waits for the row lock of an apply in progress."""
    return int(conn.execute(_TAKE_EPOCH, {"topic": source_topic, "partition": partition}).scalar_one())


def check_charges_partitions(conn: Connection, topic: str, partitions: int) -> int:
    """Record the charges topic's partition count at first use; raise ``ChargesTopicRepartitioned`` when the
    topic now has another count. Returns the recorded count.

    Per life of the topic (ledger/source_logs.py): a topic recreated by ``meterline up`` / ``topics create`` is new
    and empty — nothing queued in it can be reordered — so its count is recorded afresh."""
    topic = current_identity(conn, topic)
    params = {"t": topic, "n": partitions}
    found = conn.execute(text("""
        WITH ins AS (INSERT INTO topic_partitions (topic, partitions) VALUES (:t, :n)
                     ON CONFLICT (topic) DO NOTHING RETURNING partitions)
        SELECT partitions FROM ins UNION ALL SELECT partitions FROM topic_partitions WHERE topic = :t
    """), params).scalars().first()
    if found is None:
        # Two first starts at once: the other consumer's INSERT committed while this statement waited on it, so
        # the conflict skipped ours, yet the statement's snapshot predates that row. A new statement sees it.
        found = conn.execute(text("SELECT partitions FROM topic_partitions WHERE topic = :t"), params).scalar_one()
    recorded = int(found)
    if recorded != partitions:
        raise ChargesTopicRepartitioned(
            f"{topic} has {partitions} partitions but was created with {recorded}: re-partitioning it would "
            "reorder a source partition's checkpoints. Recreate it with the recorded count (or drain it, then "
            f"DELETE FROM topic_partitions WHERE topic = '{topic}' to record the new count)")
    return recorded
