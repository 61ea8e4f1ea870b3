"""The catalog over HTTP: roles (viewer reads, admin changes, outsiders see 404), versioning, problem codes."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.settings import ApiSettings

pytestmark = pytest.mark.integration


def _signup(client: TestClient, name: str) -> dict[str, str]:
    r = client.post("/api/v1/auth/signup", json={"email": f"{name}-{uuid.uuid4().hex[:8]}@example.com",
                                                 "password": "correct horse battery staple", "display_name": name})
    assert r.status_code == 201, r.text
    body = r.json()
    return {"id": body["user"]["id"], "Authorization": f"Bearer {body['access_token']}"}


def test_catalog_routes(database_url: str, engines: Any) -> None:
    settings = ApiSettings(database_url=database_url, kafka_bootstrap_servers=engines.kafka_bootstrap_servers,
                           clickhouse_url=engines.clickhouse_url, auth_rate_limit_per_s=1000.0,
                           auth_rate_limit_burst=1000)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        owner, viewer, outsider = _signup(client, "owner"), _signup(client, "viewer"), _signup(client, "outsider")
        h = {k: v for k, v in owner.items() if k == "Authorization"}
        project = client.post("/api/v1/projects", json={"name": "Acme"}, headers=h).json()["id"]
        r = client.post(f"/api/v1/projects/{project}/members", json={"user_id": viewer["id"], "role": "viewer"},
                        headers=h)
        assert r.status_code == 201, r.text
        base = f"/api/v1/projects/{project}"
        vh = {"Authorization": viewer["Authorization"]}

        r = client.post(f"{base}/meters", json={"slug": "tokens", "event_type": "llm.tokens",
                                                "aggregation": "SUM", "value_property": "$.tokens"}, headers=h)
        assert r.status_code == 201, r.text
        meter = r.json()
        assert client.post(f"{base}/meters", json={"slug": "tokens", "event_type": "x", "aggregation": "COUNT"},
                           headers=h).json()["code"] == "catalog.conflict"
        bad = client.post(f"{base}/meters", json={"slug": "t2", "event_type": "x", "aggregation": "SUM"}, headers=h)
        assert (bad.status_code, bad.json()["code"]) == (422, "catalog.invalid")
        assert client.post(f"{base}/meters", json={"slug": "t3", "event_type": "x", "aggregation": "COUNT"},
                           headers=vh).status_code == 403
        assert client.get(f"{base}/meters", headers={"Authorization": outsider["Authorization"]}).status_code == 404
        assert [m["slug"] for m in client.get(f"{base}/meters", headers=vh).json()] == ["tokens"]

        r = client.patch(f"{base}/meters/tokens", json={"filters": [{"property": "$.model", "equals": "m1"}]},
                         headers=h)
        assert (r.status_code, r.json()["version"], r.json()["id"]) == (200, 2, meter["id"])
        assert [m["version"] for m in client.get(f"{base}/meters/{meter['id']}/versions", headers=vh).json()] == [1, 2]

        r = client.post(f"{base}/prices", json={"meter": "tokens", "model": {"model": "per_unit",
                                                                             "unit_price_minor": "0.4"}}, headers=h)
        assert r.status_code == 201, r.text
        price = r.json()
        r = client.post(f"{base}/prices", json={"meter": "tokens", "model": {"model": "per_unit",
                                                                             "unit_price_minor": 0.4}}, headers=h)
        assert r.status_code in (409, 422)  # a float price is refused; so is a second active price
        r = client.post(f"{base}/prices/{price['id']}/versions",
                        json={"model": {"model": "volume", "tiers": [{"up_to": "100", "unit_price_minor": "1"},
                                                                     {"unit_price_minor": "0.5"}]}}, headers=h)
        assert (r.status_code, [v["version"] for v in r.json()["versions"]]) == (201, [1, 2])
        assert client.get(f"{base}/prices/nope", headers=vh).json()["code"] == "catalog.price_not_found"
        # public codes, never a component's name: a price for a meter that does not exist
        r = client.post(f"{base}/prices", json={"meter": "no-such-meter", "model": {"model": "per_unit",
                                                                                    "unit_price_minor": "1"}}, headers=h)
        assert (r.status_code, r.json()["code"]) == (404, "catalog.meter_not_found"), r.text
        assert not any(r.json()["code"].startswith(f"{c}.") for c in ("streams", "analytics", "ledger"))
        # every missing field is listed, not only the first
        r = client.post(f"{base}/meters", json={"aggregation": "SUM"}, headers=h)
        assert (r.status_code, r.json()["code"]) == (422, "api.validation_failed")
        assert sorted(e["loc"][-1] for e in r.json()["errors"]) == ["event_type", "slug"]
        assert "event_type" in r.json()["detail"] and "slug" in r.json()["detail"]

        r = client.put(f"{base}/subject-keys/alice", json={"wallet_id": "w-alice"}, headers=h)
        assert (r.status_code, r.json()["wallet_id"]) == (200, "w-alice")
        assert client.put(f"{base}/subject-keys/alice", json={"wallet_id": "w-other"}, headers=h).status_code == 409
        assert [k["subject"] for k in client.get(f"{base}/subject-keys", headers=vh).json()] == ["alice"]
        r = client.put(f"{base}/metering-policy", json={"unknown_subjects": "dead_letter"}, headers=h)
        assert r.json()["unknown_subjects"] == "dead_letter"
        assert client.get(f"{base}/metering-policy", headers=vh).json()["unknown_subjects"] == "dead_letter"
        assert client.delete(f"{base}/meters/tokens", headers=h).json()["archived_at"] is not None

        audit = client.get(f"{base}/audit-log", headers=h, params={"limit": 100})
        assert audit.status_code == 200, audit.text  # every change left an audit row
        actions = {e["action"] for e in audit.json()["items"]}
        assert {"meter.create", "meter.update", "meter.archive", "price.create", "price.version",
                "subject_key.set", "metering_policy.set"} <= actions
