"""Security item 8 (issue 14): a log scan. A session that handles every kind of secret — a password, access and
refresh tokens, an API key, webhook secrets and signatures, an invitation link — over real uvicorn, with every
logger at DEBUG and a failing request among them; nothing it logged (records or process output) holds any."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from payments_testkit import SECRETS, headers_for
from tenancy_testkit import PASSWORD, live_server, outbox_token

pytestmark = pytest.mark.integration


def test_logs_hold_no_tokens_keys_passwords_or_webhook_secrets(
        database_url: str, engines: Any, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    secrets: list[str] = [PASSWORD, *SECRETS.values()]
    with caplog.at_level(logging.DEBUG), live_server(database_url, engines) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        email = "scan-owner@example.com"
        tokens = http.post("/api/v1/auth/signup", json={"email": email, "password": PASSWORD}).json()
        secrets += [tokens["access_token"], tokens["refresh_token"]]
        owner = {"Authorization": f"Bearer {tokens['access_token']}"}
        assert http.post("/api/v1/auth/login", json={"email": email, "password": "not " + PASSWORD}
                         ).status_code == 401
        project = http.post("/api/v1/projects", json={"name": "Scan"}, headers=owner).json()["id"]
        key = http.post(f"/api/v1/projects/{project}/api-keys", json={"name": "k", "scopes": ["admin"]},
                        headers=owner).json()["token"]
        secrets.append(key)
        assert http.get(f"/api/v1/projects/{project}/wallets", headers={"Authorization": f"Bearer {key}"}
                        ).status_code == 200
        wrong_key = key[:-1] + ("y" if key.endswith("x") else "x")  # one character off, never the key itself
        assert http.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {wrong_key}"}).status_code == 401
        for provider, secret in SECRETS.items():
            r = http.put(f"/api/v1/projects/{project}/payment-providers/{provider}", json={"webhook_secret": secret},
                         headers=owner)
            assert r.status_code == 200, r.text
            body = b'{"id": "evt_scan", "type": "ping", "meta": {"event_name": "order_created"}}'
            if provider == "lemonsqueezy":
                headers = {"X-Signature": "0" * 64, "X-Event-Name": "order_created"}
            else:
                headers = headers_for(provider, body)
            http.post(f"/api/v1/webhooks/{provider}/{project}", content=body, headers=headers)
        invited = http.post(f"/api/v1/projects/{project}/invitations", json={"email": "scan-guest@example.com",
                                                                             "role": "viewer"}, headers=owner)
        assert invited.status_code == 201, invited.text
        secrets.append(outbox_token(database_url, "scan-guest@example.com"))
        # a request that fails inside the database: the statement's parameters must not reach a log line
        assert http.post("/api/v1/auth/login", json={"email": "x\u0000@example.com", "password": PASSWORD}
                         ).status_code == 422
        assert http.post("/api/v1/auth/logout", json={"refresh_token": tokens["refresh_token"]}).status_code == 204
    output = capfd.readouterr()
    logged = "\n".join([caplog.text, output.out, output.err])
    assert logged.strip(), "nothing was captured: the scan would prove nothing"
    leaked = [s[:6] + "…" for s in secrets if s and s in logged]
    assert not leaked, leaked
    assert "$argon2" not in logged
