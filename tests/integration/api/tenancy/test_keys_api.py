"""API keys over HTTP against the real PostgreSQL: issued once, stored hashed, scoped, rotated, revoked, expired,
and never usable outside their project. Authentication is checked on a key-protected route that needs no
broker (GET /api/v1/events, scope read) and on key management itself (scope admin)."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tenancy_testkit import Team, api_client, five_users, sql, team

from api.tenancy.keys import authenticate_api_key, token_prefix
from ledger.db import make_engine

pytestmark = pytest.mark.integration


def _create(client: TestClient, project_id: str, headers: dict[str, str], **body: Any) -> Any:
    return client.post(f"/api/v1/projects/{project_id}/api-keys", json={"name": "k", **body}, headers=headers)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def client(database_url: str, engines: Any) -> Any:
    with api_client(database_url, engines) as c:
        yield c


@pytest.fixture
def acme(client: TestClient) -> Team:
    return team(client, five_users(client))


def test_token_is_shown_once_and_stored_only_as_its_sha256(client: TestClient, acme: Team, database_url: str) -> None:
    owner = acme.by_role["owner"].headers
    r = _create(client, acme.project_id, owner, name="prod ingest", scopes=["ingest", "read"])
    assert r.status_code == 201, r.text
    issued = r.json()
    token = issued["token"]
    assert token.startswith(f"mlk_{issued['prefix']}_") and token_prefix(token) == issued["prefix"]
    assert issued["scopes"] == ["ingest", "read"] and issued["status"] == "active"

    listed = client.get(f"/api/v1/projects/{acme.project_id}/api-keys", headers=owner).json()
    assert [k["id"] for k in listed] == [issued["id"]]
    assert "token" not in listed[0] and token not in str(listed)
    one = client.get(f"/api/v1/projects/{acme.project_id}/api-keys/{issued['id']}", headers=owner).json()
    assert "token" not in one

    rows = sql(database_url, "SELECT prefix, secret_hash FROM api_keys WHERE id = %s", issued["id"])
    assert rows == [(issued["prefix"], hashlib.sha256(token.encode()).hexdigest())]
    secret = token.split("_", 2)[2]
    dump = sql(database_url, "SELECT string_agg(t::text, '|') FROM api_keys t")[0][0] + \
        sql(database_url, "SELECT coalesce(string_agg(a::text, '|'), '') FROM audit_log a")[0][0]
    assert secret not in dump  # neither the key table nor the audit log holds the secret
    actions = sql(database_url, "SELECT action, actor_user_id FROM audit_log WHERE target_id = %s", issued["id"])
    assert actions == [("api_key.create", acme.by_role["owner"].user_id)]

    # the key works for what its scopes allow
    assert client.get("/api/v1/events", headers=_bearer(token)).status_code == 200


def test_scopes_and_roles_gate_key_management(client: TestClient, acme: Team) -> None:
    pid = acme.project_id
    assert _create(client, pid, acme.by_role["admin"].headers).status_code == 201
    assert _create(client, pid, acme.by_role["member"].headers).status_code == 403
    assert _create(client, pid, acme.by_role["viewer"].headers).status_code == 403
    assert _create(client, pid, acme.by_role["outsider"].headers).status_code == 404
    assert client.get(f"/api/v1/projects/{pid}/api-keys").status_code == 401

    r = _create(client, pid, acme.by_role["owner"].headers, scopes=["billing"])
    assert r.status_code == 422
    r = _create(client, pid, acme.by_role["owner"].headers, scopes=[])
    assert r.status_code == 422

    ingest_only = _create(client, pid, acme.by_role["owner"].headers, scopes=["ingest"]).json()["token"]
    admin_key = _create(client, pid, acme.by_role["owner"].headers, scopes=["admin"]).json()["token"]
    assert client.get(f"/api/v1/projects/{pid}/api-keys", headers=_bearer(ingest_only)).status_code == 403
    assert client.get("/api/v1/events", headers=_bearer(ingest_only)).status_code == 403
    r = _create(client, pid, _bearer(admin_key), scopes=["read"])
    assert r.status_code == 201  # an admin key manages keys of its own project
    assert r.json()["created_by_user_id"] is None


def test_keys_never_reach_another_project(client: TestClient, acme: Team) -> None:
    users = {role: s for role, s in acme.by_role.items()}
    other = team(client, users, name="Other")  # same people, a second project
    mine = _create(client, acme.project_id, users["owner"].headers, scopes=["admin"]).json()
    theirs = _create(client, other.project_id, users["owner"].headers, scopes=["admin"]).json()

    # a key cannot manage or even see the other project's keys (404: existence is not leaked)
    r = client.get(f"/api/v1/projects/{other.project_id}/api-keys", headers=_bearer(mine["token"]))
    assert r.status_code == 404
    r = client.post(f"/api/v1/projects/{other.project_id}/api-keys/{theirs['id']}/revoke",
                    headers=_bearer(mine["token"]))
    assert r.status_code == 404
    # a key id of another project, addressed through my project, is not found either
    r = client.post(f"/api/v1/projects/{acme.project_id}/api-keys/{theirs['id']}/revoke",
                    headers=users["owner"].headers)
    assert (r.status_code, r.json()["code"]) == (404, "api_key.not_found")
    r = client.get(f"/api/v1/events?project_id={other.project_id}", headers=_bearer(mine["token"]))
    assert r.status_code == 404
    assert client.get("/api/v1/events", headers=_bearer(theirs["token"])).status_code == 200


def test_rotate_ends_the_old_key_now_or_after_grace(client: TestClient, acme: Team, database_url: str) -> None:
    owner = acme.by_role["owner"].headers
    pid = acme.project_id
    old = _create(client, pid, owner, name="ci", scopes=["read"]).json()
    r = client.post(f"/api/v1/projects/{pid}/api-keys/{old['id']}/rotate", headers=owner)
    assert r.status_code == 201, r.text
    rotated = r.json()
    new = rotated["key"]
    assert new["name"] == "ci" and new["scopes"] == ["read"] and new["rotated_from"] == old["id"]
    assert new["token"] != old["token"] and rotated["previous"]["status"] == "revoked"
    assert client.get("/api/v1/events", headers=_bearer(old["token"])).json()["code"] == "api_key.revoked"
    assert client.get("/api/v1/events", headers=_bearer(new["token"])).status_code == 200
    # a revoked key cannot be rotated back to life
    r = client.post(f"/api/v1/projects/{pid}/api-keys/{old['id']}/rotate", headers=owner)
    assert r.status_code == 409

    graced = _create(client, pid, owner, name="deploy", scopes=["read"]).json()
    r = client.post(f"/api/v1/projects/{pid}/api-keys/{graced['id']}/rotate", json={"grace_s": 2}, headers=owner)
    assert r.status_code == 201
    successor = r.json()["key"]["token"]
    assert client.get("/api/v1/events", headers=_bearer(graced["token"])).status_code == 200  # still in grace
    assert client.get("/api/v1/events", headers=_bearer(successor)).status_code == 200
    time.sleep(2.2)
    r = client.get("/api/v1/events", headers=_bearer(graced["token"]))
    assert (r.status_code, r.json()["code"]) == (401, "api_key.expired")
    assert sql(database_url, "SELECT count(*) FROM audit_log WHERE action = 'api_key.rotate'")[0][0] == 2


def test_revoke_is_final_and_idempotent_and_expiry_is_enforced(client: TestClient, acme: Team,
                                                                 database_url: str) -> None:
    owner = acme.by_role["owner"].headers
    pid = acme.project_id
    key = _create(client, pid, owner, scopes=["read"]).json()
    r = client.post(f"/api/v1/projects/{pid}/api-keys/{key['id']}/revoke", headers=owner)
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    first_revoked_at = r.json()["revoked_at"]
    r = client.delete(f"/api/v1/projects/{pid}/api-keys/{key['id']}", headers=owner)
    assert r.status_code == 200 and r.json()["revoked_at"] == first_revoked_at
    assert sql(database_url, "SELECT count(*) FROM audit_log WHERE action = 'api_key.revoke'")[0][0] == 1
    with pytest.raises(Exception, match="revocation is final"):
        sql(database_url, "UPDATE api_keys SET revoked_at = NULL WHERE id = %s", key["id"])
    assert client.get("/api/v1/events", headers=_bearer(key["token"])).json()["code"] == "api_key.revoked"

    soon = _create(client, pid, owner, scopes=["read"], expires_in_s=1).json()
    assert client.get("/api/v1/events", headers=_bearer(soon["token"])).status_code == 200
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    expired = _create(client, pid, owner, scopes=["read"], expires_at=past).json()
    r = client.get("/api/v1/events", headers=_bearer(expired["token"]))
    assert (r.status_code, r.json()["code"]) == (401, "api_key.expired")
    listed = {k["id"]: k["status"] for k in client.get(f"/api/v1/projects/{pid}/api-keys", headers=owner).json()}
    assert listed[expired["id"]] == "expired" and listed[key["id"]] == "revoked"
    r = _create(client, pid, owner, scopes=["read"], expires_at="2030-01-01T00:00:00")  # no offset
    assert r.status_code == 422


def test_authenticate_api_key_contract(client: TestClient, acme: Team, database_url: str) -> None:
    key = _create(client, acme.project_id, acme.by_role["owner"].headers, scopes=["ingest"]).json()
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            principal = authenticate_api_key(conn, key["token"])
            assert principal is not None
            assert (principal.kind, principal.project_id, principal.key_id, principal.user_id) == \
                ("api_key", acme.project_id, key["id"], None)
            assert principal.scopes == frozenset({"ingest"})
            assert authenticate_api_key(conn, "eyJhbGciOi.not-a-key") is None
            from api.errors import Unauthorized

            for bad in ("mlk_short", key["token"][:-1] + "0", "mlk_ZZZZZZZZ_" + "a" * 32):
                with pytest.raises(Unauthorized):
                    authenticate_api_key(conn, bad)
        last_used = sql(database_url, "SELECT last_used_at FROM api_keys WHERE id = %s", key["id"])[0][0]
        assert last_used is not None
    finally:
        engine.dispose()
