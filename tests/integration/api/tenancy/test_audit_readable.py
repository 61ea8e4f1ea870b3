"""The audit log as people read it: users named by email, filtered by the acting user's email."""

from __future__ import annotations

from typing import Any

import pytest
from tenancy_testkit import api_client, five_users, team

pytestmark = pytest.mark.integration


def test_audit_log_names_users_by_email_and_filters_by_actor(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        owner, admin = users["owner"], users["admin"]
        p = f"/api/v1/projects/{t.project_id}"
        r = client.patch(f"{p}/members/{users['member'].user_id}", json={"role": "viewer"}, headers=admin.headers)
        assert r.status_code == 200, r.text
        items = client.get(f"{p}/audit-log", headers=owner.headers).json()["items"]
        change = next(i for i in items if i["action"] == "member.role_change")
        assert change["actor_email"] == admin.email and change["target_email"] == users["member"].email
        by_admin = client.get(f"{p}/audit-log", params={"actor_email": admin.email.upper()},
                              headers=owner.headers).json()["items"]
        assert by_admin and {i["actor_email"] for i in by_admin} == {admin.email}
        assert "member.role_change" in {i["action"] for i in by_admin}
        nobody = client.get(f"{p}/audit-log", params={"actor_email": "nobody@example.com"}, headers=owner.headers)
        assert nobody.status_code == 200 and nobody.json()["items"] == []
