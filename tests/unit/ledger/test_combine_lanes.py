"""How the ledger packs small lanes (one source partition's merged checkpoints each) into shared transactions:
every lane exactly once, no transaction over ``COMBINE_COUNTERS_MAX`` counters, and spread over the requested
number of transactions so the apply threads still work side by side."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ledger.consumer import COMBINE_COUNTERS_MAX, _combine


def _lanes(sizes: list[int]) -> list[tuple[int, tuple[tuple[str, str, int], list[object]]]]:
    return [(size, (("source", "usage", p), [])) for p, size in enumerate(sizes)]


def _partitions(units: list[list[tuple[tuple[str, str, int], list[object]]]]) -> list[list[int]]:
    return [sorted(lane[2] for lane, _ in unit) for unit in units]


def test_small_lanes_fill_the_requested_transactions_evenly() -> None:
    units = _combine(_lanes([10, 40, 30, 20]), bins=2)  # type: ignore[arg-type]
    # largest first, each into the lighter transaction: 40 | 30, then 20 → the 30, 10 → the 40
    assert _partitions(units) == [[0, 1], [2, 3]]


def test_lanes_that_do_not_fit_open_more_transactions() -> None:
    big = COMBINE_COUNTERS_MAX - 100
    units = _combine(_lanes([big, big, big, 50]), bins=2)  # type: ignore[arg-type]
    assert len(units) == 3
    assert sorted(len(u) for u in units) == [1, 1, 2]


def test_fewer_lanes_than_transactions_each_alone() -> None:
    assert _partitions(_combine(_lanes([5]), bins=2)) == [[0]]  # type: ignore[arg-type]
    assert _combine([], bins=2) == []


@given(st.lists(st.integers(min_value=0, max_value=COMBINE_COUNTERS_MAX), max_size=40), st.integers(1, 6))
def test_every_lane_once_and_no_transaction_over_the_bound(sizes: list[int], bins: int) -> None:
    lanes = _lanes(sizes)
    units = _combine(lanes, bins=bins)  # type: ignore[arg-type]
    placed = [p for unit in _partitions(units) for p in unit]  # type: ignore[arg-type]
    assert sorted(placed) == list(range(len(sizes)))
    for unit in units:
        assert unit
        assert sum(sizes[lane[2]] for lane, _ in unit) <= COMBINE_COUNTERS_MAX
    assert len(units) >= min(bins, len(sizes))  # never fewer transactions than threads when there is work
    if sum(sizes) <= COMBINE_COUNTERS_MAX and len(sizes) >= bins:
        assert len(units) == bins  # everything fits: exactly one transaction per thread
