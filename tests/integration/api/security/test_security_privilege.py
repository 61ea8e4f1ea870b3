"""Security item 5 (issue 14): least privilege for API keys, and adding a member by email enumerates nothing.

On main an admin-scope key could add any user as a project admin and mint new admin keys (so a leaked key
outlived its revocation), and adding a member by email answered 404 for an unknown address."""

from __future__ import annotations

from typing import Any

import pytest
from tenancy_testkit import api_client, create_project, signup, sql

pytestmark = pytest.mark.integration


def _key(client: Any, project: str, headers: dict[str, str], scopes: list[str]) -> dict[str, str]:
    r = client.post(f"/api/v1/projects/{project}/api-keys", json={"name": "k", "scopes": scopes}, headers=headers)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def test_an_admin_key_cannot_add_members_or_mint_admin_keys(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        owner, mallory = signup(client, "owner"), signup(client, "mallory")
        project = create_project(client, owner)
        admin_key = _key(client, project, owner.headers, ["admin"])
        base = f"/api/v1/projects/{project}"
        r = client.post(f"{base}/members", json={"user_id": mallory.user_id, "role": "admin"}, headers=admin_key)
        assert r.status_code == 403 and r.json()["code"] == "api.keys_cannot_manage_members", r.text
        r = client.post(f"{base}/invitations", json={"email": mallory.email, "role": "admin"}, headers=admin_key)
        assert r.status_code == 403, r.text
        r = client.post(f"{base}/api-keys", json={"name": "twin", "scopes": ["admin"]}, headers=admin_key)
        assert r.status_code == 403 and r.json()["code"] == "api_key.scope_escalation", r.text
        admin_key_id = client.get(f"{base}/api-keys", headers=owner.headers).json()[0]["id"]
        r = client.post(f"{base}/api-keys/{admin_key_id}/rotate", headers=admin_key)
        assert r.status_code == 403, r.text  # the successor would be a new admin key
        # what a key may still do: keys with rights it holds (admin implies read and ingest), revoke keys
        lesser = client.post(f"{base}/api-keys", json={"name": "ingest", "scopes": ["ingest", "read"]},
                             headers=admin_key)
        assert lesser.status_code == 201, lesser.text
        members = client.get(f"{base}/members", headers=owner.headers).json()
        assert [m["user_id"] for m in members] == [owner.user_id]
        assert sql(database_url, "SELECT count(*) FROM api_keys WHERE project_id = %s AND 'admin' = ANY(scopes)",
                   project) == [(1,)]
        # users still manage everything
        assert client.post(f"{base}/api-keys", json={"name": "a2", "scopes": ["admin"]},
                           headers=owner.headers).status_code == 201


def test_adding_a_member_by_email_answers_the_same_for_unknown_addresses(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        owner, grace = signup(client, "owner"), signup(client, "grace")
        project = create_project(client, owner)
        base = f"/api/v1/projects/{project}/members"
        known = client.post(base, json={"email": grace.email, "role": "member"}, headers=owner.headers)
        unknown = client.post(base, json={"email": "nobody-here@example.com", "role": "member"},
                              headers=owner.headers)
        assert known.status_code == unknown.status_code == 202, (known.text, unknown.text)
        assert set(known.json()) == set(unknown.json())
        assert known.json()["status"] == unknown.json()["status"] == "invited"
        assert "user_id" not in known.json()
        # both were invited (the known one is not added behind their back)
        assert [m["user_id"] for m in client.get(base, headers=owner.headers).json()] == [owner.user_id]
        assert sql(database_url, "SELECT count(*) FROM invitations WHERE project_id = %s AND status = 'pending'",
                   project) == [(2,)]
