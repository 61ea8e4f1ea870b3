"""Backfill sessions, the ledger's part: post a session's usage exactly once, priced against today's counters.

A backfill (api/ingest/backfills.py) holds usage that arrives from another system or after an outage; it is
metered with the workers' own core (streams/backfill.py) into ONE checkpoint of a virtual source, exactly like a
replay correction (ledger/corrections.py):

- source ``backfill:{session id}``, partition 0, ``as_of_offset`` 0, one counter per (wallet, meter, ORIGINAL
  period, price version) holding the session's units;
- ``apply_checkpoints(kind=USAGE)`` merges it with EVERY counter row of the key (live partitions, replays,
  earlier backfills) and prices the period as a whole: allowance and tier position carry over, and price
  versions continue the period (ledger_0006 ``usage_charge_groups``); it posts ``price(merged) − charged`` now
  (``created_at`` = now) in the key's original period (``period_start``), keyed
  ``usage:backfill:{session id}:0:0:{wallet}:{meter}:{period}:{version}``; ``metadata`` names the session, the
  original period and whether it was already closed;
- exactly once: the virtual source's applied mark makes a second application ``stale`` (a close that crashed
  after commit and is retried posts nothing), and the idempotency keys are unique per session and key.

``dry_run`` applies the same checkpoint in the caller's transaction, reads what it posted, and the caller rolls
back: the dry-run IS the close's own computation against the ledger's state of that instant, so the figures a
reviewer sees are the figures the close posts (while the ledger does not move in between).

``already_charged`` answers "was this event identity charged live?" from the dedupe keys the ledger keeps with
the money (``dedupe_key_sets``, the workers' dedupe horizon; see streams/README "Backfill sessions")."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from ledger.checkpoints import Key, apply_checkpoints
from ledger.contracts import ChargeCheckpoint, TransactionKind
from ledger.rows import CheckpointOutcome

__all__ = ["BACKFILL_PREFIX", "Posted", "already_charged", "apply_backfill", "backfill_source", "posted"]

#: Source topics of backfill counters start with this (never a Kafka topic: ``:`` is not a legal character).
BACKFILL_PREFIX = "backfill:"

#: (wallet_id, meter_id, period_start, price_version_id) -> extra transaction metadata
KeyNotes = Callable[[Key], Mapping[str, Any]]


def backfill_source(session_id: str) -> str:
    return f"{BACKFILL_PREFIX}{session_id}"


def apply_backfill(conn: Connection, checkpoint: ChargeCheckpoint, *, session_id: str,
                   notes: KeyNotes | None = None) -> CheckpointOutcome:
    """Post a session's checkpoint inside the caller's transaction (the caller commits, or rolls back for a
    dry-run). ``stale`` when this session was posted before: nothing is written twice."""
    if checkpoint.source_topic != backfill_source(session_id) or checkpoint.partition != 0 \
            or checkpoint.as_of_offset != 0:
        raise ValueError("a backfill posts one checkpoint of its own virtual source (partition 0, offset 0)")
    return apply_checkpoints(conn, [checkpoint], kind=TransactionKind.USAGE,
                             reason=f"backfill {session_id}", metadata=notes).outcome


@dataclass(frozen=True, slots=True)
class Posted:
    """One transaction a backfill posted (or, in a dry-run, would post)."""

    transaction_id: int
    wallet_id: str
    meter_id: str
    period_start: datetime
    price_version_id: str
    amount_minor: int  # negative: a charge; positive: a credit back (a cheaper volume tier, a falling gauge)
    created_at: datetime
    metadata: dict[str, Any]


_POSTED = text("""
    SELECT id, wallet_id, meter_id, period_start, price_version_id, amount_minor, created_at, metadata
    FROM transactions WHERE source_ref = :ref ORDER BY id
""")


def posted(conn: Connection, session_id: str) -> list[Posted]:
    """The transactions of a session's checkpoint (source_ref ``backfill:{id}:0:0``, what ``apply_checkpoints``
    writes), visible in the caller's transaction — so a dry-run reads its own uncommitted rows."""
    return [Posted(int(r.id), r.wallet_id, r.meter_id, r.period_start, r.price_version_id, int(r.amount_minor),
                   r.created_at, dict(r.metadata or {}))
            for r in conn.execute(_POSTED, {"ref": f"{backfill_source(session_id)}:0:0"})]


# The array overlap (&&) discards most rows before the unnest; sets older than the dedupe horizon are pruned.
_CHARGED_LIVE = text("""
    SELECT DISTINCT h
    FROM dedupe_key_sets d CROSS JOIN LATERAL unnest(d.key_hashes) AS h
    WHERE d.key_hashes && CAST(:hashes AS bigint[]) AND h = ANY(CAST(:hashes AS bigint[]))
      AND NOT starts_with(d.source_topic, :backfills)
""")


def already_charged(conn: Connection, hashes: Iterable[int]) -> set[int]:
    """The event-identity hashes (``streams.metering.dedupe_hash``) among ``hashes`` that a live worker accepted
    and the ledger still remembers (within the dedupe horizon)."""
    wanted: Sequence[int] = sorted(set(hashes))
    if not wanted:
        return set()
    literal = "{" + ",".join(map(str, wanted)) + "}"
    return {int(r.h) for r in conn.execute(_CHARGED_LIVE, {"hashes": literal, "backfills": BACKFILL_PREFIX})}
