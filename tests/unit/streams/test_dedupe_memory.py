"""The dedupe memory keeps every key for at least the horizon, at most one slot longer, and never more keys than
its bound — checked against a plain reference model."""

from __future__ import annotations

import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.dedupe_memory import DedupeMemory, slot_seconds

steps = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 7), st.booleans()), max_size=300)


@settings(max_examples=300, deadline=None)
@given(steps=steps, keys_max=st.integers(1, 30), slot_s=st.integers(1, 9), horizon_s=st.integers(0, 50))
def test_matches_a_reference_model(steps: list[tuple[int, int, bool]], keys_max: int, slot_s: int,
                                   horizon_s: int) -> None:
    memory = DedupeMemory(slot_s=slot_s, keys_max=keys_max)
    reference: dict[int, float] = {}  # key -> last arrival, in remember order (oldest first)
    now = 0.0
    for key, advance_s, forget in steps:
        now += advance_s
        if forget:
            cutoff = now - horizon_s
            memory.forget_before(cutoff)
            # never early: everything that arrived at or after the cutoff is still there
            assert all(k in memory for k, at in reference.items() if at >= cutoff)
            # never more than a slot late: a key whose slot ended by the cutoff is gone
            reference = {k: at for k, at in reference.items() if (at // slot_s + 1) * slot_s > cutoff}
            assert set(memory) == set(reference)
        else:
            reference.pop(key, None)
            reference[key] = now
            memory.remember(key, now)
            while len(reference) > keys_max:  # the bound drops the oldest first
                del reference[next(iter(reference))]
            assert set(memory) == set(reference)
        assert len(memory) <= keys_max


def test_an_arrival_from_the_past_is_kept_with_the_newest_slot() -> None:
    memory = DedupeMemory(slot_s=10, keys_max=100)
    memory.remember(1, 1_000.0)
    memory.remember(2, 500.0)  # clock went back: kept at least as long as key 1, never forgotten sooner
    assert memory.forget_before(1_005.0) == 0
    assert memory.forget_before(1_010.0) == 2 and len(memory) == 0


def test_slot_seconds_scale_with_the_horizon() -> None:
    assert [slot_seconds(h) for h in (0, 60, 3_600, 86_400)] == [1, 1, 36, 60]


def test_a_key_costs_about_half_of_an_ordered_dict_entry() -> None:
    memory = DedupeMemory(slot_s=60, keys_max=1_000_000)
    tracemalloc.start()
    try:
        for i in range(200_000):
            memory.remember((i * 0x9E3779B97F4A7C15) % (2**63), 1.7e9 + i / 1_000)
        bytes_per_key = tracemalloc.get_traced_memory()[0] / 200_000
    finally:
        tracemalloc.stop()
    assert bytes_per_key < 100  # an OrderedDict[int, float] measured ~150 here


def test_the_bound_forgets_by_last_arrival_within_a_slot() -> None:
    """Hypothesis found it: 0, 0, 1, 0 in one slot with room for one key must keep 0 (remembered last)."""
    memory = DedupeMemory(slot_s=1, keys_max=1)
    for key in (0, 0, 1, 0):
        memory.remember(key, 0.0)
    assert set(memory) == {0}
    memory.remember(2, 0.0)
    assert set(memory) == {2}
