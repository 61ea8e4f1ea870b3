"""ledger/lane_chunks.py, pure: chunks cut while a batch decodes, thinned of superseded counters, merge to exactly
what the checkpoints as fetched merge to — for every suffix step 1 can accept — within the merge bounds."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.checkpoints import posting_key
from ledger.contracts import ChargeCheckpoint, CounterKey, CounterValue, PriceModel
from ledger.halts import Pending
from ledger.lane_chunks import ChunkCutter, chunks_of

PERIOD = datetime(2026, 12, 1, tzinfo=UTC)
PRICE = PriceModel(model="per_unit", unit_price_minor=Decimal(1))


def _checkpoint(partition: int, as_of: int, epoch: int, wallets: list[str], dedupe: int) -> ChargeCheckpoint:
    return ChargeCheckpoint(
        source_topic="u", partition=partition, as_of_offset=as_of, owner_epoch=epoch, emitted_at=PERIOD,
        dedupe_keys=list(range(as_of * 100, as_of * 100 + dedupe)),
        counters=[CounterValue(key=CounterKey(wallet_id=w, project_id="p", meter_id="m", period_start=PERIOD,
                                              price_version_id="v"), units=Decimal(as_of * 10 + i), price=PRICE,
                               events=1) for i, w in enumerate(wallets)])


def _merged(checkpoints: list[ChargeCheckpoint]) -> dict[object, Decimal]:
    return {posting_key(c): c.units for checkpoint in checkpoints for c in checkpoint.counters}


_steps = st.lists(st.tuples(st.integers(0, 1),                      # partition (lane)
                            st.integers(-2, 3),                     # as_of step (<= 0: not increasing)
                            st.sampled_from([1, 1, 1, 2]),          # owner epoch
                            st.lists(st.sampled_from("abcdefgh"), max_size=6),  # wallets (repeats allowed)
                            st.integers(0, 4)),                     # dedupe keys
                  min_size=1, max_size=25)


@settings(max_examples=300, deadline=None)
@given(_steps, st.integers(2, 6), st.integers(3, 12))
def test_chunks_merge_like_the_checkpoints_as_fetched_for_every_accepted_suffix(
        steps: list[tuple[int, int, int, list[str], int]], counters_max: int, dedupe_max: int) -> None:
    cutter = ChunkCutter(counters_max=counters_max, dedupe_keys_max=dedupe_max)
    as_of = {0: 10, 1: 10}
    fetched: dict[int, list[ChargeCheckpoint]] = {0: [], 1: []}
    cut: dict[int, list[Pending]] = {0: [], 1: []}
    for offset, (partition, step, epoch, wallets, dedupe) in enumerate(steps):
        as_of[partition] += step
        checkpoint = _checkpoint(partition, max(as_of[partition], 0), epoch, wallets, dedupe)
        fetched[partition].append(checkpoint)
        raw = checkpoint.model_dump_json().encode()
        cut[partition].append(cutter.add(("source", "u", partition), Pending(0, offset, checkpoint, raw, len(raw))))
    cutter.finish()
    for partition in (0, 1):
        chunks = chunks_of(cut[partition])
        assert chunks is not None
        assert [p for chunk in chunks for p in chunk] == cut[partition]
        start = 0
        for chunk in chunks:
            thin = [p.checkpoint for p in chunk]
            original = fetched[partition][start:start + len(chunk)]
            start += len(chunk)
            assert all(c is not None for c in thin)
            # what step 1 may accept of a chunk is a suffix: each merges the same
            for s in range(len(chunk)):
                assert _merged(thin[s:]) == _merged(original[s:])  # type: ignore[arg-type]
            # within the chunk: one epoch, offsets increasing, the bounds, each key listed once
            assert len({c.owner_epoch for c in original}) == 1
            assert all(a.as_of_offset < b.as_of_offset for a, b in itertools.pairwise(original))
            keys = [posting_key(c) for checkpoint in thin for c in checkpoint.counters]  # type: ignore[union-attr]
            # a chunk of one checkpoint may list a key twice (it is thinned only once a second one joins)
            assert len(chunk) == 1 or (len(keys) == len(set(keys)) <= counters_max
                                       and sum(len(c.dedupe_keys) for c in original) <= dedupe_max)
            assert [c.dedupe_keys for c in thin] == [c.dedupe_keys for c in original]  # type: ignore[union-attr]


def test_a_halted_lane_queue_is_not_cut() -> None:
    checkpoint = _checkpoint(0, 1, 1, ["a"], 0)
    assert chunks_of([Pending(0, 0, checkpoint)]) is None
