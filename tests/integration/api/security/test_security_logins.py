"""Security item 3 (issue 14): logins are limited per account and locked out with backoff, password checks are
capped, and logout / refresh-token reuse / disabling a user end access tokens at once (server-side session
check), on the debit hot path too. On main an access token kept working for up to 15 minutes after each."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import httpx
import pytest
from tenancy_testkit import PASSWORD, api_client, live_server, money, signup, sql

pytestmark = pytest.mark.integration


def _debit_path(client: Any, headers: dict[str, str]) -> str:
    project = client.post("/api/v1/projects", json={"name": "Acme"}, headers=headers).json()["id"]
    base = f"/api/v1/projects/{project}/wallets"
    wallet = client.post(base, json={"owner_kind": "project"}, headers=headers).json()["id"]
    assert money(client, f"{base}/{wallet}/grants", {"amount_minor": 100}, headers).status_code == 201
    return f"{base}/{wallet}/debit"


def test_logout_and_refresh_reuse_end_access_tokens_at_once(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        ada = signup(client, "ada")
        debit = _debit_path(client, ada.headers)
        assert money(client, debit, {"amount_minor": 1}, ada.headers).status_code in (200, 201)
        r = client.post("/api/v1/auth/logout", json={"refresh_token": ada.refresh_token})
        assert r.status_code == 204
        assert client.get("/api/v1/auth/me", headers=ada.headers).status_code == 401
        r = money(client, debit, {"amount_minor": 1}, ada.headers)  # the fast lane and the route alike
        assert r.status_code == 401, r.text
        # a second login of the same user is a separate session: unaffected by the first one's logout
        login = client.post("/api/v1/auth/login", json={"email": ada.email, "password": PASSWORD}).json()
        second = {"Authorization": f"Bearer {login['access_token']}"}
        assert client.get("/api/v1/auth/me", headers=second).status_code == 200
        rotated = client.post("/api/v1/auth/refresh", json={"refresh_token": login["refresh_token"]}).json()
        third = {"Authorization": f"Bearer {rotated['access_token']}"}
        assert client.get("/api/v1/auth/me", headers=third).status_code == 200
        # the old refresh token comes back: theft detected, the whole family ends, access tokens included
        reused = client.post("/api/v1/auth/refresh", json={"refresh_token": login["refresh_token"]})
        assert reused.status_code == 401 and reused.json()["code"] == "api.refresh_token_reused"
        assert client.get("/api/v1/auth/me", headers=second).status_code == 401
        assert client.get("/api/v1/auth/me", headers=third).status_code == 401
        assert money(client, debit, {"amount_minor": 1}, third).status_code == 401


def test_disabling_a_user_ends_their_tokens_in_every_process(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as one, api_client(database_url, engines) as other:
        bob = signup(one, "bob")
        debit = _debit_path(one, bob.headers)
        assert other.get("/api/v1/auth/me", headers=bob.headers).status_code == 200
        sql(database_url, "UPDATE users SET disabled_at = now() WHERE id = %s", bob.user_id)  # by an operator
        # each process syncs on its own timer (API_SESSION_SYNC_S): wait for each one, not for the first to notice
        deadline = time.monotonic() + 5
        for process in (other, one):
            while process.get("/api/v1/auth/me", headers=bob.headers).status_code != 401:
                assert time.monotonic() < deadline, "a disabled user's token still works after 5 s"
                time.sleep(0.1)
        assert money(one, debit, {"amount_minor": 1}, bob.headers).status_code == 401


def test_repeated_failures_lock_the_account_known_or_not(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines, login_lockout_after=3, login_lockout_base_s=30) as client:
        cy = signup(client, "cy")
        unknown = f"nobody-{uuid.uuid4().hex[:6]}@example.com"
        for email in (cy.email, unknown):
            codes = [client.post("/api/v1/auth/login", json={"email": email, "password": "wrong password!"}
                                 ).status_code for _ in range(4)]
            assert codes == [401, 401, 401, 429], (email, codes)  # the same answers: existence is not told
        locked = client.post("/api/v1/auth/login", json={"email": cy.email, "password": PASSWORD})
        assert locked.status_code == 429 and int(locked.headers["retry-after"]) >= 1  # even the right password
        dee = signup(client, "dee")
        ok = client.post("/api/v1/auth/login", json={"email": dee.email, "password": PASSWORD})
        assert ok.status_code == 200  # other accounts are not affected


def test_concurrent_password_checks_are_capped(database_url: str, engines: Any) -> None:
    with live_server(database_url, engines, password_checks_max=1, password_check_wait_s=0.05) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            email = f"eve-{uuid.uuid4().hex[:6]}@example.com"
            assert http.post("/api/v1/auth/signup", json={"email": email, "password": PASSWORD}).status_code == 201
        codes: list[int] = []
        lock = threading.Lock()

        def login() -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                code = c.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD}).status_code
            with lock:
                codes.append(code)

        threads = [threading.Thread(target=login) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(codes) == 8 and set(codes) <= {200, 503}, codes
        assert 503 in codes and 200 in codes, codes  # one check at a time; the rest were told to retry
