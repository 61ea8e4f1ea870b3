"""Backpressure: with the broker gone, ingestion answers 503 + Retry-After and acknowledges nothing; once the
broker is back, the same events are accepted and every acknowledged event is in the topic.

A dedicated broker is started for this test and SIGKILLed (the session broker is shared with other tests).
The embedded broker keeps topics in memory (DESIGN §5 e), so after its restart the topics are created again,
as `meterline up` would."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from ingest_testkit import all_events, cloudevent, consume, make_app, new_tenant, serve, usage_topic

from meterline import services
from meterline.topics import ensure_topics, topic_specs

pytestmark = pytest.mark.integration


def _start(port: int, log_path: Path, prefix: str) -> services.BrokerProcess:
    broker = services.start_embedded_broker(host="127.0.0.1", port=port, log_path=log_path)
    ensure_topics(broker.bootstrap, topic_specs(prefix=prefix, usage_partitions=4, charges_partitions=1,
                                                transactions_partitions=1))
    return broker


def test_broker_down_answers_503_with_retry_after_and_loses_nothing_acknowledged(
        database_url: str, tmp_path: Path) -> None:
    port = services.free_port()
    prefix = f"t{uuid.uuid4().hex[:8]}."
    broker = _start(port, tmp_path / "broker.log", prefix)
    try:
        app = make_app(database_url, bootstrap=broker.bootstrap, topic_prefix=prefix, ack_timeout_s=2.0,
                       broker_retry_after_s=3)
        with serve(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as http:
            tenant = new_tenant(http)
            headers = tenant.key_headers(content_type="application/cloudevents-batch+json")

            def post(batch: list[dict[str, Any]]) -> httpx.Response:
                return http.post("/api/v1/events", content=orjson.dumps(batch), headers=headers)

            assert post([cloudevent(i, prefix="up-", subject=f"s{i}") for i in range(50)]).status_code == 204

            broker.process.kill()  # SIGKILL: no goodbye to the producer
            broker.process.wait(10)
            down_batch = [cloudevent(i, prefix="down-", subject=f"s{i % 7}") for i in range(100)]
            started = time.monotonic()
            r = post(down_batch)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "3"
            assert r.json()["code"] == "ingest.broker_unavailable"
            assert time.monotonic() - started < 10  # answered within the ack timeout, not hung

            broker = _start(port, tmp_path / "broker2.log", prefix)
            # the client resends the same events (same ids) until accepted, as the SDK would
            deadline = time.monotonic() + 90
            while True:
                r = post(down_batch)
                if r.status_code == 204:
                    break
                assert r.status_code == 503, r.text
                assert time.monotonic() < deadline, "ingestion did not recover after the broker came back"
                time.sleep(min(float(r.headers["retry-after"]), 1.0))
            after_batch = [cloudevent(i, prefix="after-", subject=f"s{i % 5}") for i in range(100)]
            assert post(after_batch).status_code == 204

            consumed = consume(broker.bootstrap, usage_topic(prefix), expect_events=200, timeout_s=60)
            ids = Counter(e["id"] for e in all_events(consumed))
            acknowledged = {e["id"] for e in down_batch + after_batch}
            missing = acknowledged - set(ids)
            assert not missing, f"acknowledged but not in the topic: {sorted(missing)[:10]}"
            # a resend may land twice (the pipeline dedupes by id); nothing we did not send appears
            assert set(ids) <= acknowledged
    finally:
        broker.stop()
