"""People and tenancy over HTTP against the real PostgreSQL: accounts and tokens, projects, the role ×
endpoint matrix (no leaks across projects), the member lifecycle, invitations, ownership transfer, audit."""

from __future__ import annotations

from typing import Any

import pytest
from tenancy_testkit import (
    PASSWORD,
    add_member,
    api_client,
    create_project,
    five_users,
    outbox_token,
    signup,
    sql,
    team,
)

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------------------------------ accounts


def test_signup_login_refresh_rotation_and_reuse_revokes_the_family(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        ada = signup(client, "ada")
        assert client.post("/api/v1/auth/signup", json={"email": ada.email.upper(), "password": PASSWORD}
                           ).json()["code"] == "api.email_taken"
        assert client.post("/api/v1/auth/signup", json={"email": "x@example.com", "password": "short"}
                           ).json()["code"] == "api.weak_password"
        assert client.post("/api/v1/auth/login", json={"email": ada.email, "password": "wrong password!"}
                           ).status_code == 401
        login = client.post("/api/v1/auth/login", json={"email": ada.email.upper(), "password": PASSWORD})
        assert login.status_code == 200
        me = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {login.json()['access_token']}"})
        assert me.status_code == 200 and me.json()["user"]["id"] == ada.user_id

        first = login.json()["refresh_token"]
        rotated = client.post("/api/v1/auth/refresh", json={"refresh_token": first})
        assert rotated.status_code == 200
        second = rotated.json()["refresh_token"]
        assert second != first
        # the spent token comes back: theft is assumed, the whole family dies (the new one too)
        reused = client.post("/api/v1/auth/refresh", json={"refresh_token": first})
        assert reused.status_code == 401 and reused.json()["code"] == "api.refresh_token_reused"
        assert client.post("/api/v1/auth/refresh", json={"refresh_token": second}).status_code == 401
        # the signup session is another family and still works; logout ends it
        assert client.post("/api/v1/auth/logout", json={"refresh_token": ada.refresh_token}).status_code == 204
        assert client.post("/api/v1/auth/refresh", json={"refresh_token": ada.refresh_token}).status_code == 401


def test_missing_expired_and_forged_tokens_are_401_problems(database_url: str, engines: Any) -> None:
    import jwt

    with api_client(database_url, engines, access_token_ttl_s=-1) as client:
        ada = signup(client, "ada")  # its access token was born expired
        r = client.get("/api/v1/auth/me", headers=ada.headers)
        assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json")
        assert "expired" in r.json()["detail"]
        assert client.get("/api/v1/auth/me").status_code == 401
        forged = jwt.encode({"sub": ada.user_id, "typ": "access", "exp": 4102444800}, "not-the-secret",
                            algorithm="HS256")
        assert client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {forged}"}).status_code == 401


# ------------------------------------------------------------------------------------------ projects


def test_projects_are_private_and_found_by_external_key(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        ada, bob = signup(client, "ada"), signup(client, "bob")
        pid = create_project(client, ada, "Acme", external_key="acme-42")
        assert client.post("/api/v1/projects", json={"name": "Other", "external_key": "acme-42"},
                           headers=bob.headers).json()["code"] == "api.external_key_taken"
        mine = client.get("/api/v1/projects", params={"external_key": "acme-42"}, headers=ada.headers).json()
        assert [p["id"] for p in mine] == [pid] and mine[0]["role"] == "owner"
        assert client.get("/api/v1/projects", params={"external_key": "acme-42"}, headers=bob.headers).json() == []
        # bob cannot tell a project he is not in from one that does not exist
        hidden = client.get(f"/api/v1/projects/{pid}", headers=bob.headers)
        missing = client.get("/api/v1/projects/prj_doesnotexist00", headers=bob.headers)
        assert hidden.status_code == missing.status_code == 404
        assert hidden.json()["detail"] == missing.json()["detail"]


# Each row: method, path (relative to the project), body, the smallest role allowed. Statuses that mean
# "refused" are 403 (visible project, role too small) and 404 "project not found" (outsider). Anything else means the guard let it
# through (the route may still answer 4xx for its own reasons, e.g. 409 for an existing member).
MATRIX: list[tuple[str, str, dict[str, object] | None, str]] = [
    ("GET", "", None, "viewer"),
    ("PATCH", "", {"name": "Renamed"}, "admin"),
    ("GET", "/members", None, "viewer"),
    ("POST", "/members", {"email": "nobody@example.com", "role": "viewer"}, "admin"),
    ("GET", "/invitations", None, "admin"),
    ("POST", "/invitations", {"email": "new-person@example.com", "role": "viewer"}, "admin"),
    ("GET", "/audit-log", None, "admin"),
    ("POST", "/ownership-transfer", {"user_id": "usr_nobody"}, "owner"),
]
RANK = {"viewer": 1, "member": 2, "admin": 3, "owner": 4}


def _refusal(response: Any) -> int | None:
    """403 = role too small; 404 = the project is invisible (a route's own 404, e.g. an unknown member, is not)."""
    if response.status_code == 403:
        return 403
    if response.status_code == 404 and response.json().get("detail") == "project not found":
        return 404
    return None


def test_role_by_endpoint_matrix_with_foreign_projects(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        users = five_users(client)
        acme = team(client, users, "Acme")
        # a foreign project where nobody of ours is a member: everyone gets 404, whatever their role at home
        stranger = signup(client, "stranger")
        foreign = create_project(client, stranger, "Foreign")
        failures = []
        for method, path, body, min_role in MATRIX:
            for who, session in users.items():
                r = client.request(method, f"/api/v1/projects/{acme.project_id}{path}", json=body,
                                   headers=session.headers)
                if who == "outsider":
                    expected_refusal: int | None = 404
                else:
                    expected_refusal = None if RANK[who] >= RANK[min_role] else 403
                refused = _refusal(r)
                if refused != expected_refusal:
                    failures.append((method, path, who, r.status_code, r.text[:120]))
                f = client.request(method, f"/api/v1/projects/{foreign}{path}", json=body, headers=session.headers)
                if _refusal(f) != 404:
                    failures.append((method, path, who, "foreign", f.status_code))
        assert failures == []


# ------------------------------------------------------------------------------------------ members


def test_member_lifecycle_and_owner_protection(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        base = f"/api/v1/projects/{t.project_id}/members"
        owner, admin, member, viewer = (users[r] for r in ("owner", "admin", "member", "viewer"))
        roles = {m["user_id"]: m["role"] for m in client.get(base, headers=viewer.headers).json()}
        assert roles == {owner.user_id: "owner", admin.user_id: "admin", member.user_id: "member",
                         viewer.user_id: "viewer"}
        # nobody removes or demotes the owner, not even the owner (ownership moves only by transfer)
        for who in (owner, admin):
            assert client.delete(f"{base}/{owner.user_id}", headers=who.headers).json()["code"] == "api.owner_protected"
            assert client.patch(f"{base}/{owner.user_id}", json={"role": "admin"}, headers=who.headers
                                ).json()["code"] == "api.owner_protected"
        # an admin manages lower roles but not another admin; a member manages nobody else
        assert client.patch(f"{base}/{member.user_id}", json={"role": "viewer"}, headers=admin.headers).status_code == 200
        assert client.patch(f"{base}/{member.user_id}", json={"role": "member"}, headers=viewer.headers).status_code == 403
        second_admin = signup(client, "admin2")
        add_member(client, t.project_id, owner, second_admin, "admin")
        assert client.patch(f"{base}/{second_admin.user_id}", json={"role": "viewer"}, headers=admin.headers
                            ).status_code == 403
        assert client.delete(f"{base}/{second_admin.user_id}", headers=admin.headers).status_code == 403
        assert client.delete(f"{base}/{second_admin.user_id}", headers=owner.headers).status_code == 204
        # members cannot promote themselves, may lower themselves, and may leave
        assert client.patch(f"{base}/{viewer.user_id}", json={"role": "admin"}, headers=viewer.headers).status_code == 403
        assert client.patch(f"{base}/{admin.user_id}", json={"role": "member"}, headers=admin.headers).status_code == 200
        assert client.delete(f"{base}/{viewer.user_id}", headers=viewer.headers).status_code == 204
        assert client.get(f"/api/v1/projects/{t.project_id}", headers=viewer.headers).status_code == 404
        final = {m["user_id"]: m["role"] for m in client.get(base, headers=owner.headers).json()}
        assert final == {owner.user_id: "owner", admin.user_id: "member", member.user_id: "viewer"}
        assert sql(database_url, "SELECT count(*) FROM project_members WHERE project_id = %s AND role = 'owner'",
                   t.project_id) == [(1,)]


def test_ownership_transfer(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        url = f"/api/v1/projects/{t.project_id}/ownership-transfer"
        owner, admin = users["owner"], users["admin"]
        assert client.post(url, json={"user_id": owner.user_id}, headers=admin.headers).status_code == 403
        assert client.post(url, json={"user_id": users["outsider"].user_id}, headers=owner.headers).status_code == 404
        r = client.post(url, json={"user_id": admin.user_id, "previous_owner_role": "member"}, headers=owner.headers)
        assert r.status_code == 200, r.text
        assert r.json()["new_owner"]["role"] == "owner" and r.json()["previous_owner"]["role"] == "member"
        project = client.get(f"/api/v1/projects/{t.project_id}", headers=admin.headers).json()
        assert project["owner_user_id"] == admin.user_id and project["role"] == "owner"
        # the old owner is now an ordinary member: removable by the new owner, unable to transfer back
        assert client.post(url, json={"user_id": owner.user_id}, headers=owner.headers).status_code == 403
        assert client.delete(f"/api/v1/projects/{t.project_id}/members/{owner.user_id}",
                             headers=admin.headers).status_code == 204
        owners = sql(database_url, "SELECT user_id FROM project_members WHERE project_id = %s AND role = 'owner'",
                     t.project_id)
        assert owners == [(admin.user_id,)]


# ------------------------------------------------------------------------------------------ invitations


def test_invitation_lifecycle(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        base = f"/api/v1/projects/{t.project_id}/invitations"
        admin = users["admin"]
        grace_email = "grace-invited@example.com"
        created = client.post(base, json={"email": grace_email.upper(), "role": "member"}, headers=admin.headers)
        assert created.status_code == 201, created.text
        inv = created.json()
        assert inv["email"] == grace_email and inv["status"] == "pending" and "token" not in str(inv)
        # a second invite to the same address while one is pending is refused with the open invitation's id
        dup = client.post(base, json={"email": grace_email, "role": "viewer"}, headers=admin.headers)
        assert dup.status_code == 409 and dup.json()["invitation_id"] == inv["id"]
        # an admin cannot invite an admin above... (admins may invite admins; viewers may not invite at all)
        assert client.post(base, json={"email": "v@example.com"}, headers=users["viewer"].headers).status_code == 403

        first_token = outbox_token(database_url, grace_email)
        peek = client.get(f"/api/v1/invitations/{first_token}")  # no auth
        assert peek.status_code == 200
        assert peek.json()["project_name"] == "Acme" and peek.json()["role"] == "member"

        resent = client.post(f"{base}/{inv['id']}/resend", headers=admin.headers)
        assert resent.status_code == 200 and resent.json()["send_count"] == 2
        token = outbox_token(database_url, grace_email)
        assert token != first_token
        assert client.get(f"/api/v1/invitations/{first_token}").status_code == 404  # the old link is dead

        # someone else signed in cannot take grace's invitation
        other = users["outsider"]
        wrong = client.post(f"/api/v1/invitations/{token}/accept", headers=other.headers)
        assert wrong.status_code == 403 and wrong.json()["code"] == "api.invitation_email_mismatch"
        r = client.post("/api/v1/auth/signup", json={"email": grace_email, "password": PASSWORD})
        grace = {"Authorization": f"Bearer {r.json()['access_token']}"}
        accepted = client.post(f"/api/v1/invitations/{token}/accept", headers=grace)
        assert accepted.status_code == 200 and accepted.json()["role"] == "member"
        assert client.get(f"/api/v1/projects/{t.project_id}", headers=grace).json()["role"] == "member"
        again = client.post(f"/api/v1/invitations/{token}/accept", headers=grace)
        assert again.status_code == 410 and again.json()["code"] == "api.invitation_closed"
        assert client.get(f"/api/v1/invitations/{token}").json()["status"] == "accepted"
        # already a member: a new invitation is refused
        assert client.post(base, json={"email": grace_email}, headers=admin.headers).json()["code"] == "api.already_member"


def test_invitation_revoke_and_expiry(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        base = f"/api/v1/projects/{t.project_id}/invitations"
        owner = users["owner"]
        gone = client.post(base, json={"email": "revoked@example.com"}, headers=owner.headers).json()
        revoked_token = outbox_token(database_url, "revoked@example.com")
        assert client.delete(f"{base}/{gone['id']}", headers=owner.headers).json()["status"] == "revoked"
        assert client.delete(f"{base}/{gone['id']}", headers=owner.headers).status_code == 410
        assert client.post(f"{base}/{gone['id']}/resend", headers=owner.headers).status_code == 410

        late = client.post(base, json={"email": "late@example.com"}, headers=owner.headers).json()
        late_token = outbox_token(database_url, "late@example.com")
        sql(database_url, "UPDATE invitations SET expires_at = now() - interval '1 second' WHERE id = %s", late["id"])
        assert client.get(f"/api/v1/invitations/{late_token}").json()["status"] == "expired"
        statuses = {i["id"]: i["status"] for i in client.get(base, headers=owner.headers).json()}
        assert statuses == {gone["id"]: "revoked", late["id"]: "expired"}

        late_user = client.post("/api/v1/auth/signup", json={"email": "late@example.com", "password": PASSWORD})
        late_headers = {"Authorization": f"Bearer {late_user.json()['access_token']}"}
        assert client.post(f"/api/v1/invitations/{late_token}/accept", headers=late_headers).status_code == 410
        revoked_user = client.post("/api/v1/auth/signup", json={"email": "revoked@example.com", "password": PASSWORD})
        assert client.post(f"/api/v1/invitations/{revoked_token}/accept",
                           headers={"Authorization": f"Bearer {revoked_user.json()['access_token']}"}
                           ).status_code == 410
        # an expired invitation can be resent (fresh link, fresh expiry) and then accepted
        assert client.post(f"{base}/{late['id']}/resend", headers=owner.headers).json()["status"] == "pending"
        fresh = outbox_token(database_url, "late@example.com")
        assert client.post(f"/api/v1/invitations/{fresh}/accept", headers=late_headers).status_code == 200


# ------------------------------------------------------------------------------------------ audit


def test_audit_log_records_changes_and_is_append_only(database_url: str, engines: Any) -> None:
    import psycopg

    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        owner = users["owner"]
        base = f"/api/v1/projects/{t.project_id}"
        client.patch(f"{base}/members/{users['member'].user_id}", json={"role": "viewer"}, headers=owner.headers,
                     ).raise_for_status()
        client.patch(base, json={"name": "Acme 2"}, headers={**owner.headers, "X-Request-ID": "req-rename-1"}
                     ).raise_for_status()
        page = client.get(f"{base}/audit-log", headers=owner.headers).json()
        actions = [e["action"] for e in page["items"]]
        assert actions == ["project.update", "member.role_change", "member.add", "member.add", "member.add",
                           "project.create"]
        rename = page["items"][0]
        assert rename["request_id"] == "req-rename-1" and rename["actor_user_id"] == owner.user_id
        assert rename["before"]["name"] == "Acme" and rename["after"]["name"] == "Acme 2"
        role_change = page["items"][1]
        assert role_change["before"]["role"] == "member" and role_change["after"]["role"] == "viewer"
        # filters and cursor pagination walk the same entries without gaps or repeats
        members_only = client.get(f"{base}/audit-log", params={"action": "member.*"}, headers=owner.headers).json()
        assert [e["action"] for e in members_only["items"]] == actions[1:5]
        seen, cursor = [], None
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            p = client.get(f"{base}/audit-log", params=params, headers=owner.headers).json()
            seen += [e["id"] for e in p["items"]]
            cursor = p["next_cursor"]
            if not cursor:
                break
        assert seen == [e["id"] for e in page["items"]]
        assert client.get(f"{base}/audit-log", params={"cursor": "!!bad"}, headers=owner.headers).status_code == 422
        for statement in ("UPDATE audit_log SET action = 'x'", "DELETE FROM audit_log"):
            with pytest.raises(psycopg.errors.RestrictViolation):
                sql(database_url, statement)
