"""Halted lanes of the ledger consumer: one bad checkpoint stops only its own source partition (DESIGN §2
invariant 8). Pure bookkeeping (no I/O); ``ledger.consumer`` does the database and Kafka work.

A *lane* is what must be applied in order:
- ``("source", source_topic, p)``: the checkpoints of one source partition;
- ``("charges", charges_topic, cp)``: everything fetched from one charges partition, used only when a message
  there cannot be decoded — its source partition is unknowable, so every later message of that charges
  partition (whatever its source) queues behind it.

When a lane's first checkpoint cannot be applied (a database error, a value the database refuses, a bug),
the lane is *halted*: that checkpoint and every later one of the lane are kept here, in order, and NOTHING of
it is skipped. Other lanes go on. A halted lane is retried with exponential backoff (0.5 s doubling up to the
cap); when the retry applies its queue it resumes. While a lane is halted the consumer never commits the
charges partition past the lane's first pending message (``commit_floor``), so a restart — or another
consumer taking the charges partition — fetches the queue again from Kafka: the queue in memory is a cache,
Kafka is the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ledger.contracts import ChargeCheckpoint

__all__ = ["HaltedLane", "Halts", "Lane", "Pending"]

Scope = Literal["source", "charges"]
Lane = tuple[Scope, str, int]

#: first retry after this long; each failure doubles it up to the consumer's cap
FIRST_RETRY_S = 0.5


@dataclass(frozen=True, slots=True)
class Pending:
    """One fetched message of a halted lane: its charges position and what it decoded to (None: undecodable).
    ``size``: the message's bytes as fetched (what a halted lane's memory bound counts). ``chunk``: the merge chunk
    ledger/lane_chunks.py cut it into while its batch was decoded (its checkpoint then lacks the counters a later
    checkpoint of the chunk lists again, and ``raw`` holds the bytes to decode it again as fetched); None: not cut."""

    charges_partition: int
    charges_offset: int
    checkpoint: ChargeCheckpoint | None
    raw: bytes | None = None
    size: int = 0
    chunk: int | None = None


@dataclass(slots=True)
class HaltedLane:
    lane: Lane
    reason: str
    error: str
    halted_at: float
    next_retry_at: float
    backoff_s: float
    attempts: int = 1
    pending: list[Pending] = field(default_factory=list)
    #: Σ size of ``pending`` (kept by ``Halts``, which is the only writer of ``pending``)
    pending_bytes: int = 0

    @property
    def first(self) -> Pending:
        return self.pending[0]

    @property
    def as_of_offset(self) -> int | None:
        """The source offset of the first checkpoint that could not be applied (None when undecodable)."""
        checkpoint = self.pending[0].checkpoint
        return checkpoint.as_of_offset if checkpoint is not None else None


class Halts:
    """The consumer's halted lanes (one consumer thread mutates it; apply threads never touch it)."""

    def __init__(self, *, backoff_s_max: float) -> None:
        self.backoff_s_max = backoff_s_max
        self._lanes: dict[Lane, HaltedLane] = {}

    def __len__(self) -> int:
        return len(self._lanes)

    def __contains__(self, lane: object) -> bool:
        return lane in self._lanes

    def lanes(self) -> list[HaltedLane]:
        return list(self._lanes.values())

    def get(self, lane: Lane) -> HaltedLane | None:
        return self._lanes.get(lane)

    def halt(self, lane: Lane, pending: list[Pending], *, reason: str, error: str, now: float) -> HaltedLane:
        """Halt ``lane`` with ``pending`` (its first entry is the one that failed) queued in order."""
        assert pending, "a lane halts on a message"
        assert lane not in self._lanes, "a halted lane queues with add(), it does not halt again"
        halted = HaltedLane(lane, reason, error, now, now + FIRST_RETRY_S, FIRST_RETRY_S, pending=list(pending),
                            pending_bytes=sum(p.size for p in pending))
        self._lanes[lane] = halted
        return halted

    def add(self, lane: Lane, pending: Pending) -> None:
        """Queue a later message behind a halted lane (arrival order is kept)."""
        halted = self._lanes[lane]
        halted.pending.append(pending)
        halted.pending_bytes += pending.size

    def due(self, now: float) -> list[HaltedLane]:
        return [h for h in self._lanes.values() if h.next_retry_at <= now]

    def failed_again(self, lane: Lane, *, reason: str, error: str, now: float) -> HaltedLane:
        halted = self._lanes[lane]
        halted.attempts += 1
        halted.reason, halted.error = reason, error
        halted.backoff_s = min(halted.backoff_s * 2, self.backoff_s_max)
        halted.next_retry_at = now + halted.backoff_s
        return halted

    def applied_through(self, lane: Lane, done: int) -> None:
        """The first ``done`` pending messages of ``lane`` were applied by a retry that failed later on."""
        halted = self._lanes[lane]
        halted.pending_bytes -= sum(p.size for p in halted.pending[:done])
        del halted.pending[:done]

    def resume(self, lane: Lane) -> HaltedLane:
        return self._lanes.pop(lane)

    def drop_charges_partitions(self, revoked: set[int]) -> list[HaltedLane]:
        """Forget lanes holding messages of revoked charges partitions: the group offset was held at their first
        pending message, so the next owner of that charges partition fetches them again. A lane is dropped
        whole (its queue is one ordered list; keeping a suffix would apply it before the dropped prefix)."""
        dropped = [h for h in self._lanes.values() if any(m.charges_partition in revoked for m in h.pending)]
        for h in dropped:
            del self._lanes[h.lane]
        return dropped

    def commit_floor(self, charges_partition: int) -> int | None:
        """The lowest charges offset of ``charges_partition`` still pending in any lane (the group offset may not
        pass it), or None."""
        offsets = [m.charges_offset for h in self._lanes.values() for m in h.pending
                   if m.charges_partition == charges_partition]
        return min(offsets) if offsets else None
