"""ledger/halts.py, pure: what a halted lane holds, when it is retried, and how far the group offset may go."""

from __future__ import annotations

from datetime import UTC, datetime

from ledger.contracts import ChargeCheckpoint
from ledger.halts import FIRST_RETRY_S, Halts, Pending


def _pending(cp: int, offset: int, as_of: int) -> Pending:
    checkpoint = ChargeCheckpoint(source_topic="u", partition=0, as_of_offset=as_of, counters=[],
                                  emitted_at=datetime.now(UTC))
    return Pending(cp, offset, checkpoint)


def test_the_commit_floor_is_the_first_pending_message_of_each_charges_partition() -> None:
    halts = Halts(backoff_s_max=4)
    assert halts.commit_floor(0) is None
    halts.halt(("source", "u", 0), [_pending(0, 7, 100)], reason="apply_failed", error="x", now=0)
    halts.add(("source", "u", 0), _pending(0, 9, 110))
    halts.halt(("charges", "c", 1), [Pending(1, 3, None, b"{")], reason="undecodable", error="y", now=0)
    assert (halts.commit_floor(0), halts.commit_floor(1), halts.commit_floor(2)) == (7, 3, None)
    halts.applied_through(("source", "u", 0), 1)  # a retry applied the first one, then failed again
    assert halts.commit_floor(0) == 9
    assert halts.get(("source", "u", 0)).as_of_offset == 110  # type: ignore[union-attr]


def test_retries_back_off_to_the_cap_and_a_resumed_lane_is_forgotten() -> None:
    halts = Halts(backoff_s_max=2)
    lane = ("source", "u", 0)
    halts.halt(lane, [_pending(0, 1, 1)], reason="database_error", error="down", now=10)
    assert halts.due(10) == [] and [h.lane for h in halts.due(10 + FIRST_RETRY_S)] == [lane]
    waits = [halts.failed_again(lane, reason="database_error", error="down", now=0).backoff_s for _ in range(4)]
    assert waits == [1.0, 2, 2, 2]
    halts.resume(lane)
    assert len(halts) == 0 and halts.commit_floor(0) is None


def test_a_revoked_charges_partition_drops_its_lanes_whole() -> None:
    halts = Halts(backoff_s_max=2)
    halts.halt(("source", "u", 0), [_pending(0, 1, 1)], reason="apply_failed", error="x", now=0)
    halts.halt(("source", "u", 1), [_pending(1, 1, 1)], reason="apply_failed", error="x", now=0)
    dropped = halts.drop_charges_partitions({1})
    assert [h.lane for h in dropped] == [("source", "u", 1)]
    assert [h.lane for h in halts.lanes()] == [("source", "u", 0)]


def test_a_halted_lane_counts_the_bytes_it_holds() -> None:
    """What the consumer's byte bound on a halted lane reads (``consumer_halted_pending_bytes_max``)."""
    halts = Halts(backoff_s_max=2)
    lane = ("source", "u", 0)
    sized = [Pending(0, offset, _pending(0, offset, offset).checkpoint, size=size)
             for offset, size in ((1, 100), (2, 250), (3, 40))]
    halts.halt(lane, sized[:1], reason="apply_failed", error="x", now=0)
    halts.add(lane, sized[1])
    halts.add(lane, sized[2])
    assert halts.get(lane).pending_bytes == 390  # type: ignore[union-attr]
    halts.applied_through(lane, 2)
    assert halts.get(lane).pending_bytes == 40  # type: ignore[union-attr]
