"""The dedupe store answers exactly like an unbounded set with the horizon's forgetting rule — through spills to
disk, merges and a filter full of false positives — while its RAM stays under the stated bound."""

from __future__ import annotations

import random
import struct
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.dedupe_seed import decode_key_set
from streams.dedupe_store import DedupeStore, ram_bytes_bound
from streams.metering import Limits, PartitionAggregator

DAY_S = 86_400
steps = st.lists(st.tuples(st.integers(-3, 60), st.integers(0, 9), st.sampled_from(["remember", "forget", "ask"])),
                 max_size=400)


@settings(max_examples=200, deadline=None)
@given(steps=steps, ram_keys=st.integers(1, 12), slot_s=st.integers(1, 5), horizon_s=st.integers(0, 60),
       filter_bytes=st.sampled_from([8, 64, 4096]), merge_keys_max=st.integers(1, 40))
def test_matches_an_unbounded_reference(steps: list[tuple[int, int, str]], ram_keys: int, slot_s: int,
                                        horizon_s: int, filter_bytes: int, merge_keys_max: int) -> None:
    """Arrivals move forward (as stream time does): a key is present iff its slot has not ended by the cutoff —
    never a false "new" within the horizon, never a false "duplicate" (a tiny filter says "maybe" to nearly
    everything, so the exact run lookups decide)."""
    store = DedupeStore(slot_s=slot_s, horizon_s=horizon_s, ram_keys=ram_keys, filter_bytes=filter_bytes,
                        merge_keys_max=merge_keys_max)
    reference: dict[int, float] = {}  # key -> arrival
    cutoff = float("-inf")
    now = 1_000.0
    for key, advance_s, action in steps:
        now += advance_s
        if action == "remember":
            if key not in store:  # the aggregator only remembers a key it does not hold
                store.remember(key, now)
                reference[key] = now
        elif action == "forget":
            cutoff = max(cutoff, now - horizon_s)
            store.forget_before(now - horizon_s)
        live = {k for k, at in reference.items() if (at // slot_s + 1) * slot_s > cutoff}
        assert (key in store) == (key in live)
        assert all(k in store for k, at in reference.items() if at >= cutoff)  # never early
    assert set(store) == {k for k, at in reference.items() if (at // slot_s + 1) * slot_s > cutoff}


def test_a_duplicate_23_hours_later_is_caught_from_disk_and_one_after_the_horizon_is_new(tmp_path: Path) -> None:
    store = DedupeStore(slot_s=60, horizon_s=DAY_S, ram_keys=500, filter_bytes=16 * 1024, directory=str(tmp_path))
    rng = random.Random(7)
    t0 = 1.7e9
    store.remember(42, t0)
    for i in range(30_000):  # 23 h of other keys: 60 RAM-tier spills, ~2.6 per generation, merged once closed
        at = t0 + 1 + i * (23 * 3_600 / 30_000)
        key = rng.getrandbits(63)
        if key not in store:
            store.remember(key, at)
        if i % 500 == 0:
            store.forget_before(at - DAY_S)
    assert store.runs > 1 and store.stats["merges"] > 0 and store.ram_keys_now <= 500
    assert 42 in store  # 23 h later, long gone from RAM: found in a run
    store.forget_before(t0)  # stream time t0 + 24 h: exactly the horizon, still caught
    assert 42 in store
    store.forget_before(t0 + 60)  # its time slot ended more than 24 h ago: a new event again
    assert 42 not in store


def test_ram_stays_under_the_stated_bound_while_keys_far_exceed_the_ram_budget(tmp_path: Path) -> None:
    ram_keys, filter_bytes, merge_keys_max = 2_000, 256 * 1024, 20_000
    store = DedupeStore(slot_s=60, horizon_s=DAY_S, ram_keys=ram_keys, filter_bytes=filter_bytes,
                        merge_keys_max=merge_keys_max, directory=str(tmp_path))
    keys = np.random.default_rng(3).integers(-(2**63), 2**63 - 1, size=150_000, dtype=np.int64).tolist()
    bound = ram_bytes_bound(ram_keys=ram_keys, filter_bytes=filter_bytes, merge_keys_max=merge_keys_max,
                            keys_on_disk=len(keys))
    tracemalloc.start()
    try:
        for i, key in enumerate(keys):  # 75x the RAM tier, over ~20 h
            store.remember(key, 1.7e9 + i / 2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(store) == len(keys) and store.disk_bytes >= 12 * (len(keys) - ram_keys)
    assert peak < bound, f"peak {peak} B > bound {bound} B"
    assert all(k in store for k in keys[::97])


def test_seeding_streams_chunks_to_disk_and_keeps_only_the_newest_in_ram(tmp_path: Path) -> None:
    limits = Limits(dedupe_memory_max=1_000, dedupe_filter_bytes=64 * 1024, dedupe_dir=str(tmp_path))
    aggregator = PartitionAggregator(source_topic="t", partition=0, partitions=1, limits=limits)
    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    chunks = [(np.arange(i * 500, (i + 1) * 500, dtype=np.int64), t0 + timedelta(minutes=30 * i)) for i in range(50)]
    aggregator.seed(applied_through=9, counters=(), dedupe_chunks=iter(chunks))
    store = aggregator._seen
    assert aggregator.stream_time == t0 + timedelta(minutes=30 * 49)
    assert store.ram_keys_now <= 1_000 and store.runs >= 1
    assert all(k in store for k in (0, 499, 11_111, 24_999)) and -1 not in store and 25_000 not in store
    # the horizon is measured back from the newest seeded arrival (24.5 h after the first): the first chunk leaves
    aggregator.forget_before(aggregator.stream_time - timedelta(days=1))  # type: ignore[operator]
    assert 0 not in store and 499 not in store and 500 in store and 24_999 in store


def test_decode_key_set_reads_postgres_binary_arrays() -> None:
    values = [0, -1, 2**63 - 1, -(2**63), 123456789]
    packed = struct.pack(">iiiii", 1, 0, 20, len(values), 1) + b"".join(struct.pack(">iq", 8, v) for v in values)
    assert decode_key_set(packed).tolist() == values
    assert decode_key_set(struct.pack(">iii", 0, 0, 20)).tolist() == []


def test_a_run_spanning_more_slots_than_int32_holds_keeps_every_slot(tmp_path: Path) -> None:
    """A producer may set any CreateTime: a run's slots are stored relative to its oldest, in 8 bytes when they
    span more than int32 — never wrapped (a wrapped slot would look forgotten: a false "new")."""
    store = DedupeStore(slot_s=1, horizon_s=60, ram_keys=2, filter_bytes=64, directory=str(tmp_path))
    store.remember(1, 1.7e9)
    store.remember(2, 1.7e9 + 2**33)  # 272 years later
    store.remember(3, 1.7e9 + 2**33 + 1)  # spills 1 and 2 into one run
    store.forget_before(1.7e9 + 2**33 - 60)
    assert 1 not in store and 2 in store and 3 in store
    assert sorted(store) == [2, 3]
