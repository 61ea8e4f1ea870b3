"""Analytics fixtures: a ClickHouse of its own per test, settings pointing at the test's topics, and helpers
to produce real Kafka messages and to wait (bounded) for the sink.

chDB allows one engine path per process at a time, so every test gets its own path under tmp_path and
closes its clients at teardown. With CLICKHOUSE_URL=http(s)://... the test gets its own database instead."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from analytics_testkit import Producer, RunningSink
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient

from analytics.client import connect
from analytics.migrate import migrate
from analytics.settings import AnalyticsSettings
from api.main import create_app
from api.settings import ApiSettings


@pytest.fixture
def ch_target(tmp_path: Path) -> tuple[str, str]:
    """(clickhouse_url, database) for this test alone."""
    url = os.environ.get("CLICKHOUSE_URL", "")
    if url.startswith("http"):
        return url, f"t_{uuid.uuid4().hex[:12]}"
    return f"chdb://{(tmp_path / 'clickhouse').resolve()}", "meterline"


@pytest.fixture
def analytics_settings(ch_target: tuple[str, str], topics: Any) -> AnalyticsSettings:
    url, database = ch_target
    return AnalyticsSettings(
        clickhouse_url=url, database=database, kafka_bootstrap_servers=topics.bootstrap,
        topic_prefix=topics.prefix, consumer_group=f"analytics-{uuid.uuid4().hex[:8]}",
        batch_rows_max=500, batch_age_ms_max=100, poll_timeout_ms=50, embedded_sink_owner="none")


@pytest.fixture
def ch(analytics_settings: AnalyticsSettings) -> Iterator[Client]:
    client = connect(analytics_settings.clickhouse_url)
    migrate(client, database=analytics_settings.database)
    yield client
    if analytics_settings.clickhouse_url.startswith("http"):
        client.command(f"DROP DATABASE IF EXISTS `{analytics_settings.database}`")
    client.close()


@pytest.fixture
def producer(topics: Any) -> Producer:
    return Producer(topics.bootstrap)


@pytest.fixture
def run_sink(analytics_settings: AnalyticsSettings) -> Iterator[Callable[..., RunningSink]]:
    started: list[RunningSink] = []

    def start(*, group_id: str | None = None, settings: AnalyticsSettings | None = None) -> RunningSink:
        running = RunningSink(settings or analytics_settings, group_id=group_id)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop_event.set()
    for running in started:
        running._thread.join(30)




@pytest.fixture
def api(database_url: str, topics: Any, analytics_settings: AnalyticsSettings,
        run_sink: Callable[..., RunningSink]) -> Iterator[TestClient]:
    """The api on the test's PostgreSQL and topics. Embedded: the api owns the chDB path and runs the sink
    thread (production shape). Server: the sink runs on its own, as its own process would."""
    settings = ApiSettings(database_url=database_url, kafka_bootstrap_servers=topics.bootstrap,
                           topic_prefix=topics.prefix, auth_rate_limit_per_s=1000.0, auth_rate_limit_burst=1000)
    app = create_app(settings)
    embedded = analytics_settings.embedded
    app.state.analytics_settings = analytics_settings.model_copy(
        update={"embedded_sink_owner": "auto" if embedded else "none"})
    if not embedded:
        run_sink()
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client
