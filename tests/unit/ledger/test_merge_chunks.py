"""How the ledger cuts a backlog of one source partition's checkpoints into merged applications: bounded by the
DISTINCT keys a run posts (and the events it dedupes), so a backlog that repeats its keys merges into few
postings, and one that never repeats them still stays a bounded transaction."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from ledger import consumer
from ledger.consumer import _merge_chunks
from ledger.contracts import ChargeCheckpoint, CounterKey, CounterValue, PriceModel

PERIOD = datetime(2026, 11, 1, tzinfo=UTC)
PRICE = PriceModel(model="per_unit", unit_price_minor=Decimal("0.4"))


def _checkpoint(as_of: int, wallets: list[str], dedupe: int = 0) -> ChargeCheckpoint:
    return ChargeCheckpoint(
        source_topic="usage", partition=0, as_of_offset=as_of, emitted_at=datetime.now(UTC),
        counters=[CounterValue(key=CounterKey(wallet_id=w, project_id="p1", meter_id="tokens", period_start=PERIOD,
                                              price_version_id="v1"), units=Decimal(as_of), price=PRICE, events=1)
                  for w in wallets],
        dedupe_keys=list(range(as_of * 1_000, as_of * 1_000 + dedupe)))


def _sizes(chunks: list[list[ChargeCheckpoint]]) -> list[int]:
    return [len(c) for c in chunks]


def test_a_backlog_that_repeats_its_keys_merges_past_the_sum_of_its_listings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer, "MERGE_COUNTERS_MAX", 10)
    same = [_checkpoint(i, [f"w{k}" for k in range(8)]) for i in range(1, 7)]  # 48 listings, 8 keys
    chunks = _merge_chunks(same)
    assert _sizes(chunks) == [6]
    assert [c.as_of_offset for c in chunks[0]] == [1, 2, 3, 4, 5, 6]  # arrival order kept


def test_new_keys_beyond_the_bound_start_a_new_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer, "MERGE_COUNTERS_MAX", 10)
    checkpoints = [_checkpoint(1, ["a", "b", "c", "d"]), _checkpoint(2, ["a", "b", "e", "f"]),  # 6 distinct
                   _checkpoint(3, ["g", "h", "i", "j", "k"]),  # 11 distinct: a new run
                   _checkpoint(4, ["g", "h"])]
    assert _sizes(_merge_chunks(checkpoints)) == [2, 2]


def test_dedupe_keys_bound_a_run_and_an_oversized_checkpoint_is_a_run_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer, "MERGE_DEDUPE_KEYS_MAX", 100)
    checkpoints = [_checkpoint(1, ["a"], 60), _checkpoint(2, ["a"], 30), _checkpoint(3, ["a"], 20),
                   _checkpoint(4, ["a"], 500), _checkpoint(5, ["a"], 1)]
    assert _sizes(_merge_chunks(checkpoints)) == [2, 1, 1, 1]
    assert _merge_chunks([]) == []
