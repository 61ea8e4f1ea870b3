"""Security item 2 (issue 14): anonymous callers cannot fill the database through the webhook endpoints.

On main, four unsigned 5 MB POSTs grew ``webhook_events`` by 20 MiB: every failed delivery was stored whole,
with no rate limit and no purge."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from payments_testkit import handled, send, shop
from tenancy_testkit import api_client, scheduler_round, sql

from api.settings import IdempotencySettings
from meterline.scheduler import api_jobs

pytestmark = pytest.mark.integration

ORDER = "lemonsqueezy/order_created.json"


def test_unverified_deliveries_keep_a_digest_not_the_body(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = shop(client)
        big = b'{"meta": {"event_name": "order_created"}, "pad": "' + b"x" * 1_000_000 + b'"}'
        r = client.post(f"/api/v1/webhooks/lemonsqueezy/{s.project_id}", content=big,
                        headers={"X-Signature": "0" * 64, "X-Event-Name": "order_created"})
        assert r.status_code == 400, r.text
        handled(send(client, s.project_id, "lemonsqueezy", ORDER), "unmatched")
        handled(send(client, s.project_id, "lemonsqueezy", ORDER), "duplicate")
    rows = {status: (stored, digest) for status, stored, digest in sql(
        database_url, "SELECT status, octet_length(body), body_sha256 FROM webhook_events WHERE project_id = %s",
        s.project_id)}
    assert rows["rejected"] == (256, hashlib.sha256(big).hexdigest())  # 1 MB came in, 256 bytes were kept
    assert rows["duplicate"][0] <= 256
    assert rows["unmatched"][0] > 256  # a verified delivery keeps its whole body (replays need it)
    sizes = sql(database_url, "SELECT status, body_bytes FROM webhook_events WHERE project_id = %s", s.project_id)
    assert dict(sizes)["rejected"] == len(big)


def test_webhook_deliveries_are_rate_limited_per_address_and_project(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines, webhook_rate_limit_per_s=0.01, webhook_rate_limit_burst=3) as client:
        a, b = shop(client), shop(client)
        codes = [client.post(f"/api/v1/webhooks/stripe/{a.project_id}", content=b"{}").status_code for _ in range(5)]
        assert codes == [400, 400, 400, 429, 429]
        limited = client.post(f"/api/v1/webhooks/stripe/{a.project_id}", content=b"{}")
        assert limited.json()["code"] == "api.rate_limited" and int(limited.headers["retry-after"]) >= 1
        assert client.post(f"/api/v1/webhooks/stripe/{b.project_id}", content=b"{}").status_code == 400
    stored = sql(database_url, "SELECT count(*) FROM webhook_events WHERE project_id = %s", a.project_id)
    assert stored == [(3,)]  # refused deliveries store nothing


def test_old_unverified_deliveries_are_purged_by_the_scheduler(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        s = shop(client)
        for _ in range(3):
            assert client.post(f"/api/v1/webhooks/stripe/{s.project_id}", content=b"{}").status_code == 400
        handled(send(client, s.project_id, "lemonsqueezy", ORDER), "unmatched")
        handled(send(client, s.project_id, "lemonsqueezy", ORDER), "duplicate")
    sql(database_url, "UPDATE webhook_events SET received_at = now() - interval '8 days' WHERE project_id = %s "
                      "AND status = 'rejected' AND id = (SELECT min(id) FROM webhook_events WHERE status = 'rejected'"
                      " AND project_id = %s)", s.project_id, s.project_id)
    sql(database_url, "UPDATE webhook_events SET received_at = now() - interval '8 days' WHERE project_id = %s "
                      "AND status IN ('duplicate', 'unmatched')", s.project_id)
    jobs = [j for j in api_jobs(IdempotencySettings()) if j.name == "purge_webhook_deliveries"]
    results = scheduler_round(database_url, jobs, now=datetime.now(UTC) + timedelta(seconds=1))
    assert results["purge_webhook_deliveries"] == 2
    left = sorted(r[0] for r in sql(database_url, "SELECT status FROM webhook_events WHERE project_id = %s",
                                    s.project_id))
    assert left == ["rejected", "rejected", "unmatched"]  # the old settled row is kept; recent rejects too
