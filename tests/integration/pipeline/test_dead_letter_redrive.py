"""Dead-letter redrive over HTTP (api/ingest/routes_dead_letters.py, api/ingest/redrive.py, streams/redrive.py) with the real
streams worker and ledger consumer: events of a type without a meter are dead-lettered; once the meter exists a
redrive charges them once, and a second redrive charges nothing."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pipeline_harness import EventProducer, Pipeline, make_event, price_floor

from api.main import create_app
from api.settings import ApiSettings
from ledger.db import make_engine
from streams import catalog
from streams.catalog_model import auto_wallet_id


@pytest.fixture
def client(pipeline: Pipeline, engines: Any, monkeypatch: pytest.MonkeyPatch,
           clear_settings_caches: None) -> Iterator[TestClient]:
    monkeypatch.setenv("METERLINE_TOPIC_PREFIX", pipeline.prefix)
    settings = ApiSettings(database_url=pipeline.database_url, kafka_bootstrap_servers=pipeline.bootstrap,
                           clickhouse_url=engines.clickhouse_url, auth_rate_limit_per_s=1000.0,
                           auth_rate_limit_burst=1000)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def _owner_project(client: TestClient) -> tuple[dict[str, str], str]:
    r = client.post("/api/v1/auth/signup", json={"email": f"o-{uuid.uuid4().hex[:8]}@example.com",
                                                 "password": "correct horse battery staple"})
    assert r.status_code == 201, r.text
    headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
    r = client.post("/api/v1/projects", json={"name": "Acme"}, headers=headers)
    assert r.status_code == 201, r.text
    return headers, str(r.json()["id"])


def _meter(database_url: str, project: str, slug: str, event_type: str, unit_price: str) -> None:
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            catalog.create_meter(conn, project_id=project, slug=slug, event_type=event_type, aggregation="SUM",
                                 value_property="$.tokens")
            catalog.create_price(conn, project_id=project, meter=slug,
                                 model={"model": "per_unit", "unit_price_minor": unit_price},
                                 effective_from=datetime(2020, 1, 1, tzinfo=UTC))
    finally:
        engine.dispose()


def _charged(pipeline: Pipeline, wallet: str) -> int:
    return -int(pipeline.sql("SELECT coalesce(sum(amount_minor), 0) FROM transactions WHERE wallet_id = %s",
                             wallet)[0][0])


def test_a_redrive_after_creating_the_missing_meter_charges_once_and_a_second_charges_nothing(
        pipeline: Pipeline, client: TestClient) -> None:
    headers, project = _owner_project(client)
    _meter(pipeline.database_url, project, "tokens", "llm.tokens", "1")
    worker, ledger = pipeline.start("streams"), pipeline.start("ledger")
    producer = EventProducer(pipeline.bootstrap, pipeline.usage_topic, pipeline.partitions)
    tokens = [make_event(i, "alice", 10, project=project) for i in range(5)]
    images = [make_event(100 + i, "alice", 7 + i, project=project, etype="llm.images") for i in range(4)]
    producer.send_packed(tokens + images, pack=3)
    pipeline.wait_applied(producer.flush().last_offset, timeout_s=90, watch=[worker, ledger])
    wallet = auto_wallet_id(project, "alice")
    assert _charged(pipeline, wallet) == 50

    listed = client.get(f"/api/v1/projects/{project}/dead-letters", headers=headers)
    assert listed.status_code == 200, listed.text
    assert listed.json()["by_reason"] == {"unknown_meter": 4}
    assert {d["event_id"] for d in listed.json()["items"]} == {e["id"] for e in images}
    assert all(d["redrive_id"] is None for d in listed.json()["items"])
    assert client.post(f"/api/v1/projects/{project}/dead-letters/redrive", json={},
                       headers=headers).status_code == 422

    _meter(pipeline.database_url, project, "images", "llm.images", "3")  # the cause is fixed
    time.sleep(2.0)  # the worker re-reads the catalog when its revision moves (every 500 ms in this harness)
    first = client.post(f"/api/v1/projects/{project}/dead-letters/redrive", json={"reasons": ["unknown_meter"]},
                        headers=headers)
    assert first.status_code == 200, first.text
    assert len(first.json()["redriven"]) == 4 and first.json()["already_redriven"] == []
    expected = 50 + price_floor(Decimal(7 + 8 + 9 + 10), Decimal(3))
    deadline = time.monotonic() + 60
    while _charged(pipeline, wallet) != expected and time.monotonic() < deadline:
        assert worker.alive() and ledger.alive()
        time.sleep(0.3)
    assert _charged(pipeline, wallet) == expected

    second = client.post(f"/api/v1/projects/{project}/dead-letters/redrive",
                         json={"ids": [d["id"] for d in listed.json()["items"]]}, headers=headers)
    assert second.status_code == 200, second.text
    assert second.json()["redriven"] == [] and len(second.json()["already_redriven"]) == 4
    relisted = client.get(f"/api/v1/projects/{project}/dead-letters", headers=headers).json()
    assert {d["redrive_id"] for d in relisted["items"]} == {first.json()["redrive_id"]}
    # the same events sent again by hand (a client retry) are duplicates for the workers: still charged once
    producer.send_packed(images, pack=4)
    pipeline.wait_applied(producer.flush().last_offset, timeout_s=60, watch=[worker, ledger])
    assert _charged(pipeline, wallet) == expected
    pipeline.assert_ledger_consistent()
