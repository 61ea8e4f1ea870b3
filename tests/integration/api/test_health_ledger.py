"""``GET /healthz`` shows the money pipeline's state (issue 13): a halted ledger lane and the last invariant check's
violations make it ``degraded`` (still 200: the API is up). On cbf7ba4 it said ``ok`` whatever the ledger did."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from tenancy_testkit import api_client

from ledger.db import make_engine
from ledger.invariant_check import check_invariants


def test_health_reports_halted_partitions_and_invariant_violations(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        healthy = client.get("/healthz")
        assert healthy.status_code == 200 and healthy.json()["status"] == "ok"
        assert healthy.json()["ledger"] == {"halted_partitions": [], "invariant_check": None, "reconciliation": None}

        engine = make_engine(database_url, pool_size=1)
        try:
            with engine.begin() as conn:  # what the ledger consumer and the scheduler record
                conn.execute(text("""
                    INSERT INTO partition_halts (scope, topic, partition, reason, error, as_of_offset,
                                                 charges_partition, charges_offset, pending_checkpoints, consumer)
                    VALUES ('source', 'usage.events.v1', 3, 'apply_failed', 'TypeError: Integer exceeds 64-bit range',
                            120, 1, 42, 2, 'ledger-1')"""))
                conn.execute(text("INSERT INTO wallets (id, project_id, owner_kind, owner_ref, balance_minor) "
                                  "VALUES ('w', 'p', 'user', 'u', 5)"))  # a balance no transaction explains
                check_invariants(conn)
        finally:
            engine.dispose()
        degraded = client.get("/healthz")
    assert degraded.status_code == 200
    body = degraded.json()
    assert body["status"] == "degraded"
    [halt] = body["ledger"]["halted_partitions"]
    assert (halt["partition"], halt["reason"], halt["as_of_offset"], halt["pending_checkpoints"]) == \
        (3, "apply_failed", 120, 2)
    assert body["ledger"]["invariant_check"]["violations"] == {"balance_vs_postings": 1, "buckets_vs_balance": 1}
