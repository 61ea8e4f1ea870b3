"""The short chaos run (the long one is `python -m bench.chaos`): while a load runs, streams workers and the
ledger consumer are SIGKILLed, hostile events (values ≥ 2^63 and 1e300, negative, not numbers, wrong types,
unknown meters, bytes that are not JSON, times in the future) and duplicate, late, out-of-order and another
tenant's events are mixed into the packed messages, and the catalog changes under load (a new tokens price
version; the images meter's aggregation SUM → MAX, a new meter counting version; a cross-tenant subject key,
refused). Afterwards every wallet — ours and the other tenant's — equals the reference model
(bench/chaos_load.Reference: computed from what was sent and the catalog versions in force), no key is posted
twice, every hostile event is dead-lettered with its reason, and the ledger's invariant check holds."""

from __future__ import annotations

import pytest
from pipeline_harness import PROJECT, Pipeline, Proc

from bench.chaos_load import (
    OTHER_PROJECT,
    Applied,
    ChaosLoad,
    ChaosProducer,
    FaultPlan,
    Reference,
    Shape,
    balances,
    dead_letters,
    duplicate_postings,
    hostile_accounted,
    money_diff,
    set_up_catalog,
)
from ledger.db import make_engine
from ledger.invariant_check import check_invariants

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_kills_hostile_events_and_catalog_edits_under_load_leave_every_wallet_exact(pipeline: Pipeline) -> None:
    ids, prices = set_up_catalog(pipeline.database_url, PROJECT)
    reference = Reference(PROJECT, prices)
    procs: dict[str, Proc] = {f"streams-{i}": pipeline.start("streams", STREAMS_WORKER_INDEX=str(i)) for i in (0, 1)}
    procs["ledger"] = pipeline.start("ledger")

    def kill(target: str) -> bool:  # this test is the supervisor: kill -9, start again at once
        procs[target].kill()
        extra = {"STREAMS_WORKER_INDEX": target[-1]} if target.startswith("streams") else {}
        procs[target] = pipeline.start(target.split("-")[0], **extra)
        return True

    producer = ChaosProducer(pipeline.bootstrap, pipeline.usage_topic, pipeline.partitions, reference)
    applied = Applied(pipeline.database_url, pipeline.usage_topic)
    load = ChaosLoad(producer=producer, reference=reference, ids=ids, database_url=pipeline.database_url,
                     applied=applied, seed=20261203, kill=kill, log=lambda _line: None)
    shape = Shape(rate=400, seconds=24, pack=50, subjects=150)
    load.run(shape, FaultPlan.of(60, kill_targets=tuple(procs), seconds=shape.seconds))
    pipeline.wait_applied(producer.produced.last_offset, timeout_s=180, watch=list(procs.values()))

    faults = load.faults
    assert faults.total >= 60, faults.injected
    assert faults.injected["catalog:meter_version"] == 1 and faults.injected["catalog:price_version"] == 1, faults
    assert sum(n for k, n in faults.injected.items() if k.startswith("kill:")) >= 3
    assert sum(n for k, n in faults.injected.items() if k.startswith("hostile:")) >= 10
    assert faults.injected["refused:cross_tenant_subject_key"] == 1
    assert not faults.skipped, faults.skipped  # every planned edit made, each price version committed before its start
    assert faults.injected["cross_tenant_subject_key_ACCEPTED"] == 0
    assert reference.images_version == (2, "MAX")

    expected = reference.expected_balances()
    assert money_diff(expected, balances(pipeline.database_url, (PROJECT, OTHER_PROJECT))) == []
    assert any(project == OTHER_PROJECT for project, _ in expected)  # the other tenant was charged, apart
    assert duplicate_postings(pipeline.database_url) == 0
    by_id, reasons = dead_letters(pipeline.bootstrap, f"{pipeline.prefix}usage.events.dlq.v1",
                                  min_messages=len(faults.hostile_ids) + faults.garbage_messages)
    _found, missing = hostile_accounted(faults, by_id, reasons)
    assert missing == []
    pipeline.assert_ledger_consistent()
    engine = make_engine(pipeline.database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            assert check_invariants(conn).violation_count == 0
    finally:
        engine.dispose()
