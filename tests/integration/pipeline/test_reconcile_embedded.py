"""The reconciliation of the four records on the DEFAULT stack: ClickHouse is an embedded chDB path, owned by the
api process (its analytics sink runs in-process), which no other process may open. The api runs the job itself
(meterline/reconcile_embedded.py) on its background thread, with its own ClickHouse client, and the scheduler leaves
the job out — so both ClickHouse records are compared, and a row deleted from ClickHouse usage is named.

Real engines: the broker, PostgreSQL, the api app (its real lifespan: chDB opened, the sink thread started), the
real outbox relay; the ledger is fed by the workers' own metering core (test_replay_repair.py ``Feeder``)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pipeline_harness import PROJECT, setup_catalog, wallet_of
from sqlalchemy import Engine
from test_replay_repair import Feeder

from analytics.settings import AnalyticsSettings
from api.main import create_app
from api.settings import ApiSettings
from ledger.db import make_engine
from ledger.kafka import make_producer
from ledger.outbox import OutboxRelay
from ledger.reconciliation import ProjectReport, latest_report
from ledger.scheduler import run_lease
from meterline.reconcile_embedded import EmbeddedReconciliation
from meterline.reconcile_job import RECONCILE_LEASE, reconcile_jobs

FOUR = {"usage_log": True, "ledger": True, "clickhouse_usage": True, "clickhouse_flow": True}


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url, pool_size=2)
    yield eng
    eng.dispose()


def _until(what: str, found: Callable[[], Any], *, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := found()) is not None:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _report_since(engine: Engine, moment: datetime) -> Callable[[], ProjectReport | None]:
    def newer() -> ProjectReport | None:
        with engine.connect() as conn:
            report = latest_report(conn, PROJECT)
        return report if report is not None and report.started_at > moment else None
    return newer


def test_the_api_owning_embedded_clickhouse_reconciles_all_four_records(
        database_url: str, topics: Any, engine: Engine, tmp_path: Path) -> None:
    # the interval is long: the test makes a run due (``last_started``) once ClickHouse holds what it should, so no
    # run is half-way through a stale picture when the test looks; the run itself starts on the api's own thread
    hook = EmbeddedReconciliation(interval_s=3_600, settle_s=0, check_every_s=0.1, timeout_s=60)
    app = create_app(ApiSettings(database_url=database_url, kafka_bootstrap_servers=topics.bootstrap,
                                 topic_prefix=topics.prefix), hooks=[hook])
    app.state.analytics_settings = AnalyticsSettings(  # what the default stack runs: chdb://, sink in the api
        clickhouse_url=f"chdb://{(tmp_path / 'clickhouse').resolve()}", database="meterline",
        kafka_bootstrap_servers=topics.bootstrap, topic_prefix=topics.prefix,
        consumer_group=f"analytics-{uuid.uuid4().hex[:8]}", batch_rows_max=500, batch_age_ms_max=100,
        poll_timeout_ms=50, embedded_sink_owner="auto")
    with TestClient(app):
        assert app.state.analytics_sink is not None and hook.reconciler is not None  # this api owns chDB
        setup_catalog(database_url)
        feeder = Feeder(topics, engine)
        feeder.send("alice", [10, 20])
        feeder.send("carol", [11, 12, 13])
        feeder.meter()
        relayed = OutboxRelay(engine=engine, producer=make_producer(topics.bootstrap),
                              topic_prefix=topics.prefix).drain(timeout_s=30)
        usage_messages = sum(o + 1 for o in feeder.producer.flush().last_offset.values())
        expected = {feeder.topic: usage_messages, topics.name("ledger.transactions.v1"): relayed}

        def caught_up() -> bool | None:
            sink = app.state.analytics_sink.sink
            got = sink.stats.messages if sink is not None else {}
            done = all(got.get(t, 0) >= n for t, n in expected.items()) and not sink._pending
            return True if done else None

        _until(f"the api's sink to store {expected}", caught_up)

        def background_run(what: str) -> ProjectReport:
            moment = datetime.now(UTC)
            assert hook.reconciler is not None
            hook.reconciler.last_started = float("-inf")  # due: the api's ticker starts it within check_every_s
            return _until(what, _report_since(engine, moment))

        # all four records compared, and they agree
        clean = background_run("a report of the api's reconciliation")
        assert {r: c["compared"] for r, c in clean.coverage.items()} == FOUR
        assert clean.coverage["clickhouse_usage"]["settled_partitions"]
        assert clean.mismatches == [] and clean.differences == []

        # a row deleted from ClickHouse usage (alice's 20 tokens) is named
        with app.state.analytics.pool.client() as client:
            client.command("ALTER TABLE meterline.usage_events DELETE WHERE subject = 'alice' AND "
                           "JSONExtractInt(data, 'tokens') = 20 SETTINGS mutations_sync = 2")
        report = background_run("a report after the deletion")
        assert {r: c["compared"] for r, c in report.coverage.items()} == FOUR
        assert [(m["wallet_id"], m["disagreeing"], m["values"]) for m in report.mismatches] == [
            (wallet_of("alice"), ["clickhouse_usage"], {"usage_log": "30", "ledger": "30", "clickhouse_usage": "10"})]

        # a run never overlaps another process's: with the lease held elsewhere (a scheduler), the api's is skipped
        _until("the api's background run to finish", lambda: None if hook.reconciler.thread.is_alive() else True)
        with run_lease(engine, RECONCILE_LEASE, "a-scheduler-elsewhere", ttl_s=30) as held:
            assert held
            assert hook.run(app) is None
        with engine.connect() as conn:
            assert latest_report(conn, PROJECT) == report  # nothing new stored
    assert hook.reconciler.thread is not None and not hook.reconciler.thread.is_alive()


def test_the_scheduler_leaves_reconcile_usage_to_the_api_only_when_the_api_owns_embedded_clickhouse(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLICKHOUSE_URL", f"chdb://{tmp_path / 'ch'}")
    monkeypatch.setenv("ANALYTICS_EMBEDDED_SINK_OWNER", "auto")
    assert reconcile_jobs() == []
    monkeypatch.setenv("ANALYTICS_EMBEDDED_SINK_OWNER", "process")  # `meterline run analytics` owns it
    assert [j.name for j in reconcile_jobs()] == ["reconcile_usage"]
    monkeypatch.setenv("CLICKHOUSE_URL", "http://127.0.0.1:8123")
    assert [j.name for j in reconcile_jobs()] == ["reconcile_usage"]
