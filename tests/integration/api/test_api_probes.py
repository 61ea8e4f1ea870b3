"""The api process's /health, /ready and /metrics over real HTTP (uvicorn, PostgreSQL, the broker).

/metrics must parse with prometheus-client's own parser and count what users rely on: ingest accepted and
rejected (by reason), synchronous debits by outcome, webhook deliveries by provider and outcome. Counters are
process-wide (other tests in this session add to them), so every assertion compares before and after."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from ingest_testkit import cloudevent, make_app, new_tenant, serve
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration


def scrape(http: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of GET /metrics, parsed by prometheus-client: (sample name, sorted labels) -> value."""
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def http(database_url: str, topics: Any) -> Iterator[httpx.Client]:
    app = make_app(database_url, bootstrap=topics.bootstrap, topic_prefix=topics.prefix)
    with serve(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


def test_health_and_ready_answer_with_each_check(http: httpx.Client) -> None:
    assert http.get("/health").json() == {"status": "ok", "component": "api"}
    ready = http.get("/ready")
    for _ in range(50):  # the ingest producer connects in the background at start-up
        if ready.status_code == 200:
            break
        ready = http.get("/ready")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks["database"]["ok"] and checks["broker"]["ok"], checks
    assert "usage.events.v1" in checks["broker"]["detail"]


def test_metrics_count_ingest_debits_and_webhooks(http: httpx.Client) -> None:
    tenant = new_tenant(http, keys={"ingest": ["ingest"]})
    before = scrape(http)

    batch = [cloudevent(1), cloudevent(2), {"id": "no-type", "source": "svc"}]  # two valid, one rejected
    r = http.post("/api/v1/events", content=orjson.dumps(batch),
                  headers=tenant.key_headers(content_type="application/cloudevents-batch+json"))
    assert r.status_code == 400, r.text
    reason = r.json()["rejected"][0]["reason"]

    p, owner = tenant.project_id, tenant.owner_headers
    wallet = http.post(f"/api/v1/projects/{p}/wallets", headers=owner,
                       json={"owner_kind": "subject", "owner_ref": "cust-metrics"}).json()["id"]
    r = http.post(f"/api/v1/projects/{p}/wallets/{wallet}/grants", headers={**owner, "Idempotency-Key": "g1"},
                  json={"amount_minor": 100, "kind": "top_up"})
    assert r.status_code == 201, r.text
    r = http.post(f"/api/v1/projects/{p}/wallets/{wallet}/debit", headers={**owner, "Idempotency-Key": "d1"},
                  json={"amount_minor": 30})
    assert r.status_code == 201, r.text
    r = http.post(f"/api/v1/projects/{p}/wallets/{wallet}/debit", headers={**owner, "Idempotency-Key": "d2"},
                  json={"amount_minor": 1_000})
    assert r.status_code == 402, r.text
    r = http.post(f"/api/v1/webhooks/stripe/{p}", content=b'{"forged": true}',
                  headers={"Stripe-Signature": "t=1,v1=00"})
    assert r.status_code == 400, r.text

    after = scrape(http)
    assert value(after, "meterline_ingest_events_accepted_total") - value(before, "meterline_ingest_events_accepted_total") == 2
    rejected = "meterline_ingest_events_rejected_total"
    assert value(after, rejected, reason=reason) - value(before, rejected, reason=reason) == 1
    debits = "meterline_debit_seconds_count"
    assert value(after, debits, outcome="ok") - value(before, debits, outcome="ok") == 1
    assert value(after, debits, outcome="refused") - value(before, debits, outcome="refused") == 1
    hooks = "meterline_webhook_deliveries_total"
    assert value(after, hooks, provider="stripe", outcome="rejected") - value(
        before, hooks, provider="stripe", outcome="rejected") == 1
