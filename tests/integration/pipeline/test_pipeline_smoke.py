"""One worker + one ledger consumer: exact totals for a small mixed stream (duplicates included)."""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal

import pytest
from pipeline_harness import EventProducer, Pipeline, make_event, price_floor, setup_catalog, wallet_of

from streams.contracts import partition_for

pytestmark = pytest.mark.integration


def test_events_are_charged_exactly_once(pipeline: Pipeline) -> None:
    ids = setup_catalog(pipeline.database_url)
    streams = pipeline.start("streams")
    ledger = pipeline.start("ledger")
    producer = EventProducer(pipeline.bootstrap, pipeline.usage_topic, pipeline.partitions)
    events = [make_event(i, f"user-{i % 7}", (i % 13) + 1) for i in range(3000)]
    producer.send_packed(events + events[:500])  # 500 exact duplicates
    sent = producer.flush()
    pipeline.wait_applied(sent.last_offset, timeout_s=90, watch=[streams, ledger])
    units: dict[str, Decimal] = defaultdict(Decimal)
    for ev in events:
        units[wallet_of(ev["subject"])] += ev["data"]["tokens"]
    expected = {w: -price_floor(u, Decimal("0.4")) for w, u in units.items()}
    assert pipeline.wallet_balances() == expected
    assert pipeline.charges() == {(w, ids["price_version_id"]): (u, -expected[w]) for w, u in units.items()}
    pipeline.assert_ledger_consistent()


def test_one_packed_message_of_thousands_of_wallets_makes_one_large_checkpoint(pipeline: Pipeline) -> None:
    """A checkpoint cannot be cut inside a message: 4,000 distinct wallets in one ~800 KB message → one checkpoint
    of ~1.3 MB (over librdkafka's 1 MB default), which must still travel and apply."""
    setup_catalog(pipeline.database_url)
    streams = pipeline.start("streams")
    ledger = pipeline.start("ledger")
    producer = EventProducer(pipeline.bootstrap, pipeline.usage_topic, pipeline.partitions)
    subjects = [s for s in (f"wide-{i}" for i in range(40_000)) if partition_for(s, pipeline.partitions) == 0][:4_000]
    events = [make_event(i, s, 5) for i, s in enumerate(subjects)]
    producer.send_packed(events, pack=len(events))
    sent = producer.flush()
    assert sent.messages == 1
    pipeline.wait_applied(sent.last_offset, timeout_s=90, watch=[streams, ledger])
    assert pipeline.wallet_balances() == {wallet_of(s): -2 for s in subjects}
