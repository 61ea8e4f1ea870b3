"""Security item 8 (issue 14): the authorization matrix, generated from the code (meterline/security_matrix.py
reads every project-scoped operation and the action its guard requires).

Every operation × every role (owner, admin, member, viewer) × every key scope (admin, read, ingest):
- too small a role or scope → 403 (people management by any key → 403);
- enough → the guard lets it through (never 401/403, never "project not found");
- another tenant's project id (owner's token, admin key) → 404 "project not found";
- another tenant's object ids under one's own project (owner's token) → never a 2xx and never a 5xx."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tenancy_testkit import _settings, five_users, money, signup, sql, team

from analytics.settings import AnalyticsSettings
from api.main import create_app
from meterline.security_matrix import ROLES, SCOPES, Operation, project_operations

pytestmark = pytest.mark.integration

PROJECT_NOT_FOUND = "project not found"


def _key(client: TestClient, project: str, headers: dict[str, str], scope: str) -> dict[str, str]:
    r = client.post(f"/api/v1/projects/{project}/api-keys", json={"name": scope, "scopes": [scope]}, headers=headers)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def _examples(spec: dict[str, Any]) -> dict[tuple[str, str], Any]:
    """(METHOD, path) -> the request body's first documented example (so refusals are not masked by a 422)."""
    found: dict[tuple[str, str], Any] = {}
    schemas = spec.get("components", {}).get("schemas", {})
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            content = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            schema = content.get("schema", {})
            for candidate in (schema, *schema.get("anyOf", [])):
                ref = candidate.get("$ref", "").rsplit("/", 1)[-1]
                examples = schemas.get(ref, {}).get("examples") if ref else None
                if examples:
                    found[(method.upper(), path)] = examples[0]
                    break
    return found


EXAMPLES: dict[tuple[str, str], Any] = {}
#: bodies that exercise the operation's guard action, where the first example asks for more (``charge: true`` on
#: an access check needs ``write``; the guard's ``read`` covers the uncharged check)
OVERRIDES: dict[tuple[str, str], Any] = {
    ("POST", "/api/v1/projects/{project_id}/access/check"): {"subject": "user-1", "feature_key": "export"}}


def _call(client: TestClient, op: Operation, project: str, ids: dict[str, str], headers: dict[str, str]) -> Any:
    path = op.path.replace("{project_id}", project)
    for name in [p.strip("{}") for p in op.path.split("/") if p.startswith("{")]:
        path = path.replace("{" + name + "}", ids.get(name, f"nope-{name}"))
    body = EXAMPLES.get((op.method, op.path), {}) if op.method in ("POST", "PUT", "PATCH") else None
    return client.request(op.method, path, json=body,
                          headers={**headers, "Idempotency-Key": uuid.uuid4().hex})


def _detail(response: Any) -> Any:
    body = response.json() if response.headers.get("content-type", "").endswith("json") else None
    return body.get("detail") if isinstance(body, dict) else None


def _foreign_tenant(client: TestClient, database_url: str) -> tuple[str, dict[str, str]]:
    """Another tenant with real objects, whose ids the first tenant will try."""
    owner = signup(client, "foreign")
    project = client.post("/api/v1/projects", json={"name": "Other"}, headers=owner.headers).json()["id"]
    base = f"/api/v1/projects/{project}"
    wallet = client.post(f"{base}/wallets", json={"owner_kind": "project"}, headers=owner.headers).json()["id"]
    grant = money(client, f"{base}/wallets/{wallet}/grants", {"amount_minor": 10}, owner.headers).json()
    key = client.post(f"{base}/api-keys", json={"name": "k", "scopes": ["read"]}, headers=owner.headers).json()
    invitation = client.post(f"{base}/invitations", json={"email": "x@example.com", "role": "viewer"},
                             headers=owner.headers).json()
    client.post(f"/api/v1/webhooks/stripe/{project}", content=b"{}")
    event = sql(database_url, "SELECT max(id) FROM webhook_events WHERE project_id = %s", project)[0][0]
    return project, {"wallet_id": wallet, "transaction_id": str(grant["transaction"]["id"]), "key_id": key["id"],
                     "invitation_id": invitation["id"], "user_id": owner.user_id, "event_row_id": str(event)}


def test_every_operation_role_and_scope(database_url: str, engines: Any, topics: Any, tmp_path: Path) -> None:
    app = create_app(_settings(database_url, engines, {"rate_limit_per_s": 0, "topic_prefix": topics.prefix}))
    app.state.analytics_settings = AnalyticsSettings(clickhouse_url=f"chdb://{(tmp_path / 'ch').resolve()}",
                                                     embedded_sink_owner="none")
    with TestClient(app, raise_server_exceptions=False) as client:
        operations = project_operations(app)
        EXAMPLES.update(_examples(client.get("/openapi.json").json()) | OVERRIDES)
        assert len(operations) > 80
        users = five_users(client)
        t = team(client, users)
        owner = users["owner"].headers
        principals = {role: users[role].headers for role in ROLES}
        principals |= {f"key:{scope}": _key(client, t.project_id, owner, scope) for scope in SCOPES}
        foreign_project, foreign_ids = _foreign_tenant(client, database_url)
        problems: list[str] = []
        ownership_transfer = ("POST", "/api/v1/projects/{project_id}/ownership-transfer")
        for op in operations:
            for who, headers in principals.items():
                allowed = op.role_may(who) if who in ROLES else op.scope_may(who.removeprefix("key:"))
                if allowed and who == "owner" and (op.method, op.path) == ownership_transfer:
                    continue  # would hand the project away mid-matrix; covered by the tenancy tests
                r = _call(client, op, t.project_id, {}, headers)
                detail = _detail(r)
                if r.status_code >= 500:
                    problems.append(f"{op.method} {op.path} as {who}: {r.status_code}")
                elif not allowed and r.status_code != 403:
                    problems.append(f"{op.method} {op.path} as {who}: {r.status_code}, expected 403")
                elif allowed and (r.status_code in (401, 403) or detail == PROJECT_NOT_FOUND):
                    problems.append(f"{op.method} {op.path} as {who}: {r.status_code} {detail}, expected through")
            for who in ("owner", "key:admin"):
                r = _call(client, op, foreign_project, foreign_ids, principals[who])
                # 422: the (empty) body was refused before the guard ran — the same for any project id
                if r.status_code != 422 and (r.status_code != 404 or _detail(r) != PROJECT_NOT_FOUND):
                    problems.append(f"{op.method} {op.path} on the foreign project as {who}: {r.status_code}")
            # (analytics reads ClickHouse filtered by the caller's project: a foreign wallet id finds no rows and
            # answers an empty view, checked in tests/integration/analytics/test_analytics_vs_ledger.py)
            if any("{" + name + "}" in op.path for name in foreign_ids) and "/analytics/" not in op.path:
                r = _call(client, op, t.project_id, foreign_ids, owner)
                if r.status_code < 300 or r.status_code >= 500:
                    problems.append(f"{op.method} {op.path} with foreign ids: {r.status_code} {r.text[:120]}")
        assert not problems, "\n".join(problems)
