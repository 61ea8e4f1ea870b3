"""The scheduled reconciliation of the four records (meterline/reconcile_job.py) on real engines: the usage topic
on the broker, the ledger in PostgreSQL, and ClickHouse (chDB, or the server of CLICKHOUSE_URL) filled by the real
analytics sink from the real outbox relay.

The ledger is fed as in test_replay_repair.py (the workers' own metering core, checkpoints applied with the
ledger's own ``apply_checkpoints``). One test walks through: a clean run (zero drift on all four), a row deleted
from ClickHouse usage (named: clickhouse_usage disagrees, with wallet / meter / period), a ledger checkpoint lost
(named: ledger disagrees), a posting deleted from ClickHouse (clickhouse_flow disagrees) — each seen in the stored
report, the route's per-wallet drift and the Prometheus gauges — and a lagging sink, whose unsettled usage and
postings are not compared (no false drift; the report lists the lagging partition)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pipeline_harness import PROJECT, price_floor, setup_catalog, wallet_of
from prometheus_client import REGISTRY
from sqlalchemy import Engine
from test_replay_repair import PRICE, Feeder, _same_partition

from analytics.client import connect
from analytics.migrate import migrate
from analytics.settings import AnalyticsSettings
from analytics.sink import Sink
from ledger.db import make_engine
from ledger.kafka import make_producer
from ledger.outbox import OutboxRelay
from ledger.reconciliation import latest_report
from meterline.reconcile_job import run_once
from streams.contracts import partition_for


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url, pool_size=2)
    yield eng
    eng.dispose()


class Analytics:
    """A ClickHouse of this test's own and the real sink in a thread (as the api process runs it embedded)."""

    def __init__(self, tmp_path: Path, topics: Any) -> None:
        url = os.environ.get("CLICKHOUSE_URL", "")
        embedded = not url.startswith("http")
        self.settings = AnalyticsSettings(
            clickhouse_url=f"chdb://{(tmp_path / 'clickhouse').resolve()}" if embedded else url,
            database="meterline" if embedded else f"t_{uuid.uuid4().hex[:12]}",
            kafka_bootstrap_servers=topics.bootstrap, topic_prefix=topics.prefix,
            consumer_group=f"analytics-{uuid.uuid4().hex[:8]}", batch_rows_max=500, batch_age_ms_max=100,
            poll_timeout_ms=50, embedded_sink_owner="none")
        self.client = connect(self.settings.clickhouse_url)
        migrate(self.client, database=self.settings.database)
        self.stop = threading.Event()
        self.sink = Sink(self.settings, stop=self.stop)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.sink.run()
        except BaseException as exc:
            self.error = exc

    def wait(self, expected: dict[str, int]) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.error is None, self.error
            got = self.sink.stats.messages
            if all(got.get(t, 0) >= n for t, n in expected.items()) and not self.sink._pending:
                return
            time.sleep(0.05)
        raise AssertionError(f"the sink did not consume {expected}: {self.sink.stats.messages}")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        if self.settings.clickhouse_url.startswith("http"):
            self.client.command(f"DROP DATABASE IF EXISTS `{self.settings.database}`")
        self.client.close()


@pytest.fixture
def analytics(tmp_path: Path, topics: Any) -> Iterator[Analytics]:
    a = Analytics(tmp_path, topics)
    yield a
    a.close()


def _catch_up(feeder: Feeder, analytics: Analytics, engine: Engine, topics: Any, relayed: list[int]) -> None:
    """Relay the ledger's outbox and wait until the sink stored every usage message and every posting."""
    producer = make_producer(topics.bootstrap)
    relayed.append(OutboxRelay(engine=engine, producer=producer, topic_prefix=topics.prefix).drain(timeout_s=30))
    usage_messages = sum(o + 1 for o in feeder.producer.flush().last_offset.values())
    analytics.wait({feeder.topic: usage_messages, topics.name("ledger.transactions.v1"): sum(relayed)})


def _reconcile(database_url: str, topics: Any, analytics: Analytics, engine: Engine, *, settle_s: float = 0) -> Any:
    run_once(database_url=database_url, bootstrap=topics.bootstrap, topic_prefix=topics.prefix, timeout_s=60,
             clickhouse=analytics.client, clickhouse_database=analytics.settings.database,
             clickhouse_group=analytics.settings.consumer_group, settle_s=settle_s)
    with engine.connect() as conn:
        report = latest_report(conn, PROJECT)
    assert report is not None
    return report


def _gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def _one(report: Any) -> tuple[str, str, str, str, list[str], dict[str, Any]]:
    [m] = report.mismatches
    return m["wallet_id"], m["meter_id"], m["period_start"], m["measure"], m["disagreeing"], m["values"]


def test_four_records_agree_then_each_corruption_names_the_record_that_disagrees(
        database_url: str, topics: Any, engine: Engine, analytics: Analytics) -> None:
    setup_catalog(database_url)
    feeder = Feeder(topics, engine)
    relayed: list[int] = []
    feeder.send("alice", [10, 20])
    feeder.send("carol", [11, 12, 13])
    feeder.meter()
    _catch_up(feeder, analytics, engine, topics, relayed)

    clean = _reconcile(database_url, topics, analytics, engine)
    assert clean.mismatches == [] and clean.differences == [] and clean.drift_by_wallet() == []
    assert {r: c["compared"] for r, c in clean.coverage.items()} == {
        "usage_log": True, "ledger": True, "clickhouse_usage": True, "clickhouse_flow": True}
    assert clean.coverage["clickhouse_usage"]["lagging_partitions"] == []
    for record in ("usage_log", "ledger", "clickhouse_usage", "clickhouse_flow"):
        assert _gauge("meterline_reconciliation_drift_wallets", record=record) == 0
        assert _gauge("meterline_reconciliation_record_compared", record=record) == 1
    assert _gauge("meterline_reconciliation_drift_minor", pair="usage_log/clickhouse_usage") == 0

    # 1. a row deleted from ClickHouse usage: alice's 20 tokens
    db = analytics.settings.database
    analytics.client.command(f"ALTER TABLE {db}.usage_events DELETE WHERE subject = 'alice' AND "
                             "JSONExtractInt(data, 'tokens') = 20 SETTINGS mutations_sync = 2")
    report = _reconcile(database_url, topics, analytics, engine)
    wallet, meter, period, measure, wrong, values = _one(report)
    assert (wallet, measure, wrong) == (wallet_of("alice"), "units", ["clickhouse_usage"]) and meter and period
    assert values == {"usage_log": "30", "ledger": "30", "clickhouse_usage": "10"}
    assert report.mismatches[0]["amount_minor"] == price_floor(Decimal(30), PRICE) - price_floor(Decimal(10), PRICE)
    assert report.drift_by_wallet() == [{"wallet_id": wallet_of("alice"), "disagreeing": ["clickhouse_usage"],
                                         "keys": 1, "amount_minor": 8}]
    assert _gauge("meterline_reconciliation_drift_wallets", record="clickhouse_usage") == 1
    assert _gauge("meterline_reconciliation_drift_wallets", record="ledger") == 0
    assert _gauge("meterline_reconciliation_drift_minor", pair="usage_log/clickhouse_usage") == 8
    # 2. a ledger checkpoint lost: carol's last 16 tokens never reach the ledger (a later checkpoint of the
    #    partition moves its mark past them), while the log and ClickHouse have them
    carol_p = partition_for("carol", topics.usage_partitions)
    feeder.send("carol", [16])
    feeder.send(_same_partition("carol", topics.usage_partitions, "neighbour"), [9])
    sent = feeder.producer.flush()
    feeder.meter(drop=(carol_p, sent.last_offset[carol_p] - 1))
    _catch_up(feeder, analytics, engine, topics, relayed)
    # 3. and a posting deleted from ClickHouse credit flow: alice's
    analytics.client.command(f"ALTER TABLE {db}.ledger_transactions DELETE WHERE wallet_id = '{wallet_of('alice')}' "
                             "SETTINGS mutations_sync = 2")
    report = _reconcile(database_url, topics, analytics, engine)
    carol = [m for m in report.mismatches if m["wallet_id"] == wallet_of("carol")]
    assert sorted((m["wallet_id"], m["disagreeing"][0]) for m in report.mismatches) == sorted(
        [(wallet_of("alice"), "clickhouse_usage"), (wallet_of("carol"), "ledger"), (wallet_of("alice"), "clickhouse_flow")])
    assert len(report.mismatches) == 3  # alice's ClickHouse usage row is still missing
    [(wallet, meter, period, measure, wrong, values)] = [
        (m["wallet_id"], m["meter_id"], m["period_start"], m["measure"], m["disagreeing"], m["values"]) for m in carol]
    assert (wallet, measure, wrong) == (wallet_of("carol"), "units", ["ledger"]) and meter and period
    assert values == {"usage_log": "52", "ledger": "36", "clickhouse_usage": "52"}
    assert report.differences and report.differences[0]["wallet_id"] == wallet_of("carol")  # the replay's view
    assert _gauge("meterline_reconciliation_drift_wallets", record="ledger") == 1
    assert _gauge("meterline_reconciliation_drift_wallets", record="clickhouse_usage") == 1
    assert _gauge("meterline_reconciliation_drift_minor", pair="usage_log/ledger") == (
        price_floor(Decimal(52), PRICE) - price_floor(Decimal(36), PRICE))

    flow = [m for m in report.mismatches if m["measure"] == "charged_minor"]
    assert [(m["wallet_id"], m["disagreeing"], m["values"]) for m in flow] == [
        (wallet_of("alice"), ["clickhouse_flow"], {"ledger": price_floor(Decimal(30), PRICE), "clickhouse_flow": 0})]
    assert _gauge("meterline_reconciliation_drift_wallets", record="clickhouse_flow") == 1
    assert _gauge("meterline_reconciliation_drift_minor", pair="ledger/clickhouse_flow") == price_floor(
        Decimal(30), PRICE)

    # 4. ClickHouse lags (the sink stops): usage after its watermark and postings younger than the settle delay are
    #    not compared, so nothing new is named; the report says which partitions lag
    analytics.stop.set()
    analytics.thread.join(30)
    before = time.time()
    time.sleep(0.3)
    feeder.seed(carol_p)  # the worker restarted since the loss: it seeds carol at 36 from the ledger
    feeder.send("carol", [7])
    feeder.meter()
    report = _reconcile(database_url, topics, analytics, engine, settle_s=time.time() - before - 0.1)
    assert report.coverage["clickhouse_usage"]["lagging_partitions"] == [carol_p]
    assert sorted((m["wallet_id"], m["disagreeing"][0]) for m in report.mismatches) == sorted(
        [(wallet_of("alice"), "clickhouse_usage"), (wallet_of("carol"), "ledger"), (wallet_of("alice"), "clickhouse_flow")])
    [carol_now] = [m for m in report.mismatches if m["wallet_id"] == wallet_of("carol")]
    assert carol_now["values"] == {"usage_log": "59", "ledger": "43"}  # ClickHouse compared at its watermark only
