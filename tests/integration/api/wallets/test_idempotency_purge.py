"""Idempotency-Key records are purged by the scheduler's ``purge_idempotency_records`` job (meterline/scheduler.py)
once older than ``API_IDEMPOTENCY_RETENTION_S`` and never before: a key inside the retention replays its stored
response exactly as before the purge; one past it still cannot charge twice (the ledger key answers). The job runs
in the real ``meterline run scheduler`` process (what ``meterline up`` and compose start)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tenancy_testkit import api_client, create_project, money, scheduler_round, signup, sql

from api.settings import IdempotencySettings
from api.wallets.idempotency import purge_older_than
from ledger.db import make_engine
from meterline.scheduler import jobs

pytestmark = pytest.mark.integration

RETENTION_S = IdempotencySettings().idempotency_retention_s


def _age(database_url: str, project: str, key: str, seconds: float) -> None:
    sql(database_url, "UPDATE idempotency_records SET created_at = now() - make_interval(secs => %s) "
                      "WHERE project_id = %s AND idempotency_key = %s", seconds, project, key)


def test_the_job_purges_records_past_the_retention_and_fresh_ones_still_replay(database_url: str,
                                                                               engines: Any) -> None:
    with api_client(database_url, engines) as client:
        owner = signup(client, "owner")
        project = create_project(client, owner)
        wallets = f"/api/v1/projects/{project}/wallets"
        wallet = client.post(wallets, json={"owner_kind": "project"}, headers=owner.headers).json()["id"]
        assert money(client, f"{wallets}/{wallet}/grants", {"amount_minor": 100}, owner.headers,
                     key="grant").status_code == 201
        debit = f"{wallets}/{wallet}/debit"
        first = {key: money(client, debit, {"amount_minor": 10}, owner.headers, key=key)
                 for key in ("old", "edge", "fresh")}
        assert [r.status_code for r in first.values()] == [201, 201, 201]
        _age(database_url, project, "old", RETENTION_S + 60)  # just past the retention
        _age(database_url, project, "edge", RETENTION_S - 60)  # just inside it

        assert scheduler_round(database_url, jobs(IdempotencySettings()))["purge_idempotency_records"] == 1
        kept = {k for (k,) in sql(database_url, "SELECT idempotency_key FROM idempotency_records "
                                                "WHERE project_id = %s", project)}
        assert kept == {"grant", "edge", "fresh"}

        for key in ("edge", "fresh"):  # inside the retention: the stored response, as before the purge
            again = money(client, debit, {"amount_minor": 10}, owner.headers, key=key)
            assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
            assert again.json() == first[key].json()
            assert money(client, debit, {"amount_minor": 11}, owner.headers, key=key).status_code == 409

        # past it: the record is gone, but the ledger key still posts the debit once (a different answer)
        late = money(client, debit, {"amount_minor": 10}, owner.headers, key="old")
        assert late.status_code == 201, late.text
        assert late.json()["outcome"] == "duplicate"
        assert late.json()["transaction"]["id"] == first["old"].json()["transaction"]["id"]
    assert sql(database_url, "SELECT balance_minor FROM wallets WHERE id = %s", wallet) == [(70,)]


def test_a_purge_deletes_in_bounded_batches_oldest_first(database_url: str) -> None:
    sql(database_url, "INSERT INTO idempotency_records (project_id, idempotency_key, request_fingerprint, "
                      "status_code, response_body, created_at) "
                      "SELECT 'p', 'k' || i, 'f', 201, '{}', now() - make_interval(days => 10 - i) "
                      "FROM generate_series(1, 6) AS i")
    engine = make_engine(database_url, pool_size=1)
    cutoff = datetime.now(UTC) - timedelta(days=5.5)  # k1..k4 (9..6 days old) are past it; k5, k6 are not
    try:
        with engine.begin() as conn:
            assert purge_older_than(conn, cutoff=cutoff, limit=3) == 3
        assert sql(database_url, "SELECT idempotency_key FROM idempotency_records ORDER BY created_at") == \
            [("k4",), ("k5",), ("k6",)]
        with engine.begin() as conn:
            assert purge_older_than(conn, cutoff=cutoff, limit=3) == 1
            assert purge_older_than(conn, cutoff=cutoff, limit=3) == 0
    finally:
        engine.dispose()
    assert sql(database_url, "SELECT idempotency_key FROM idempotency_records ORDER BY created_at") == \
        [("k5",), ("k6",)]


def test_the_scheduler_process_purges_idempotency_records_past_the_retention(database_url: str) -> None:
    sql(database_url, "INSERT INTO idempotency_records (project_id, idempotency_key, request_fingerprint, "
                      "status_code, response_body, created_at) VALUES "
                      "('p', 'three-days-old', 'f', 201, '{}', now() - interval '3 days'), "
                      "('p', 'one-day-old', 'f', 201, '{}', now() - interval '1 day'), "
                      "('p', 'new', 'f', 201, '{}', now())")
    env = {**os.environ, "DATABASE_URL": database_url, "METERLINE_ENV": "local", "METERLINE_LOG_LEVEL": "INFO",
           "LEDGER_SCHEDULER_INTERVAL_S": "0.2",
           "API_IDEMPOTENCY_RETENTION_S": str(2 * 24 * 3600)}  # 2 days (the default, 3, would keep all three)
    with tempfile.TemporaryFile() as logs:
        process = subprocess.Popen([sys.executable, "-m", "meterline", "run", "scheduler"], env=env,
                                   stdout=logs, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and process.poll() is None:
                if not sql(database_url, "SELECT 1 FROM idempotency_records WHERE idempotency_key = %s", "three-days-old"):
                    break
                time.sleep(0.2)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)
        logs.seek(0)
        output = logs.read().decode()
    assert process.returncode == 0, output
    left = {k for (k,) in sql(database_url, "SELECT idempotency_key FROM idempotency_records")}
    assert left == {"one-day-old", "new"}, output
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    started = next(e for e in events if e["event"] == "scheduler_started")
    assert "purge_idempotency_records" in started["jobs"] and "expire_holds" in started["jobs"]
    ran = [e for e in events if e["event"] == "scheduler_job_ran" and e["job"] == "purge_idempotency_records"]
    assert ran and ran[0]["rows"] == 1 and ran[0]["component"] == "scheduler"
