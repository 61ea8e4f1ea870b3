"""Catalog changes on a live pipeline never rewrite charged history (DESIGN §2 invariant 9, issue 13 items 3–4):
a meter edit starts new counters (SUM → MAX credited charged usage back: 2,000 → 1,000), and a new price version
continues the period's units (900 + 900 tokens with 1,000 free charged 0; 800 is right)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pipeline_harness import PROJECT, EventProducer, Pipeline, make_event

from ledger.db import make_engine
from streams import catalog
from streams.contracts import partition_for

pytestmark = pytest.mark.integration


def _catalog(pipeline: Pipeline, model: dict[str, str]) -> dict[str, str]:
    engine = make_engine(pipeline.database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            catalog.create_meter(conn, project_id=PROJECT, slug="tokens", event_type="llm.tokens",
                                 aggregation="SUM", value_property="$.tokens")
            price = catalog.create_price(conn, project_id=PROJECT, meter="tokens", model=model,
                                         effective_from=datetime(2020, 1, 1, tzinfo=UTC))
    finally:
        engine.dispose()
    return {"price_id": price.id}


def _two_subjects_on_two_partitions(pipeline: Pipeline) -> tuple[str, str]:
    first = "alice"
    for i in range(1_000):
        other = f"carol-{i}"
        if partition_for(other, pipeline.partitions) != partition_for(first, pipeline.partitions):
            return first, other
    raise AssertionError("no subject on another partition")


def _charged(pipeline: Pipeline, wallet: str) -> int:
    return -pipeline.wallet_balances()[wallet]


def test_a_meter_edit_on_a_live_meter_never_credits_back_charged_usage(pipeline: Pipeline) -> None:
    _catalog(pipeline, {"model": "per_unit", "unit_price_minor": "1"})
    a, b = _two_subjects_on_two_partitions(pipeline)
    engine = make_engine(pipeline.database_url, pool_size=1)
    try:
        with engine.begin() as conn:  # one wallet, two subjects on two partitions
            for subject in (a, b):
                catalog.set_subject_key(conn, project_id=PROJECT, subject=subject, wallet_id="w-shared")
        worker, ledger = pipeline.start("streams"), pipeline.start("ledger")
        producer = EventProducer(pipeline.bootstrap, pipeline.usage_topic, pipeline.partitions)
        producer.send_packed([make_event(1, a, 1000), make_event(2, b, 1000)])
        pipeline.wait_applied(producer.flush().last_offset, timeout_s=60, watch=[worker, ledger])
        assert _charged(pipeline, "w-shared") == 2_000
        with engine.begin() as conn:  # the worker re-reads the catalog before its next batch
            edited = catalog.update_meter(conn, project_id=PROJECT, meter="tokens", aggregation="MAX")
        assert edited.counting_version == 2
        producer.send_packed([make_event(3, a, 500), make_event(4, b, 300)])
        pipeline.wait_applied(producer.flush().last_offset, timeout_s=60, watch=[worker, ledger])
        # the SUM period stays charged; the MAX counters start at the change: max(500, 300) across partitions
        assert _charged(pipeline, "w-shared") == 2_000 + 500
        with engine.begin() as conn:  # a cosmetic edit keeps counting where it is
            renamed = catalog.update_meter(conn, project_id=PROJECT, meter="tokens", name="Tokens")
        assert renamed.counting_version == 2
        producer.send_packed([make_event(5, a, 800)])
        pipeline.wait_applied(producer.flush().last_offset, timeout_s=60, watch=[worker, ledger])
        assert _charged(pipeline, "w-shared") == 2_000 + 800
    finally:
        engine.dispose()
    pipeline.assert_ledger_consistent()


def test_a_new_price_version_continues_the_periods_allowance(pipeline: Pipeline) -> None:
    free_1000 = {"model": "per_unit", "unit_price_minor": "1", "free_units": "1000"}
    ids = _catalog(pipeline, free_1000)
    worker, ledger = pipeline.start("streams"), pipeline.start("ledger")
    producer = EventProducer(pipeline.bootstrap, pipeline.usage_topic, pipeline.partitions)
    before = datetime.now(UTC) - timedelta(seconds=5)
    producer.send_packed([make_event(i, "alice", 100, time=before) for i in range(9)])  # 900 under v1
    pipeline.wait_applied(producer.flush().last_offset, timeout_s=60, watch=[worker, ledger])
    engine = make_engine(pipeline.database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            v2 = catalog.add_price_version(conn, project_id=PROJECT, price_id=ids["price_id"],
                                           model={**free_1000, "unit_price_minor": "2"}).versions[-1]
    finally:
        engine.dispose()
    after = v2.effective_from + timedelta(milliseconds=1)
    producer.send_packed([make_event(100 + i, "alice", 100, time=after) for i in range(9)])  # 900 under v2
    pipeline.wait_applied(producer.flush().last_offset, timeout_s=60, watch=[worker, ledger])
    wallet = pipeline.sql("SELECT wallet_id FROM usage_charges GROUP BY 1")[0][0]
    # v2 continues at 900: 100 units still free, 800 charged at v2's price of 2
    assert _charged(pipeline, wallet) == 800 * 2
    # a late event of v1's time arrives after v2 is in force: v1 stays free at 1,000, v2's slice moves up by 100
    producer.send_packed([make_event(50, "alice", 100, time=before)])
    pipeline.wait_applied(producer.flush().last_offset, timeout_s=60, watch=[worker, ledger])
    assert _charged(pipeline, wallet) == 900 * 2
    pipeline.assert_ledger_consistent()
