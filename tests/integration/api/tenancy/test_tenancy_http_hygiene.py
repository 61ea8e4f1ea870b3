"""HTTP hygiene on the real app: request ids, security headers, problem+json, body size limit (413), per-user
and per-address rate limits (429 + Retry-After), CORS from settings, and OpenAPI completeness."""

from __future__ import annotations

from typing import Any

import pytest
from tenancy_testkit import api_client, signup

pytestmark = pytest.mark.integration


def test_request_id_security_headers_and_problem_json(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        r = client.get("/api/v1/auth/me", headers={"X-Request-ID": "trace-abc.1"})
        assert r.status_code == 401
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.headers["x-request-id"] == "trace-abc.1"
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert r.json()["code"] == "api.unauthorized" and r.json()["status"] == 401
        generated = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
        assert generated != "bad id with spaces" and len(generated) == 32
        assert "script-src 'self'" in client.get("/docs").headers["content-security-policy"]  # its own policy


def test_oversized_bodies_are_refused_with_413(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines, request_body_bytes_max=1_000) as client:
        big = {"email": "a@example.com", "password": "x" * 2_000}
        r = client.post("/api/v1/auth/signup", json=big)
        assert r.status_code == 413 and r.json()["code"] == "api.payload_too_large"

        def chunks() -> Any:  # no Content-Length: counted while streaming
            for _ in range(5):
                yield b"x" * 400

        r = client.post("/api/v1/auth/login", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        small = client.post("/api/v1/auth/login", json={"email": "a@example.com", "password": "nope"})
        assert small.status_code == 401


def test_rate_limits_per_user_and_per_address(database_url: str, engines: Any) -> None:
    # refill rates far below the test's pace: a loaded machine cannot slip a token in between requests
    with api_client(database_url, engines, rate_limit_per_s=0.01, rate_limit_burst=5) as client:
        ada, bob = signup(client, "ada"), signup(client, "bob")
        statuses = [client.get("/api/v1/auth/me", headers=ada.headers).status_code for _ in range(8)]
        assert statuses[:5] == [200] * 5 and statuses[5:] == [429] * 3
        limited = client.get("/api/v1/auth/me", headers=ada.headers)
        assert limited.json()["code"] == "api.rate_limited" and int(limited.headers["retry-after"]) >= 1
        assert client.get("/api/v1/auth/me", headers=bob.headers).status_code == 200  # bob has his own bucket
    with api_client(database_url, engines, auth_rate_limit_per_s=0.01, auth_rate_limit_burst=3) as client:
        codes = [client.post("/api/v1/auth/login", json={"email": "x@example.com", "password": "guess-guess"}
                             ).status_code for _ in range(5)]
        assert codes == [401, 401, 401, 429, 429]


def test_cors_from_settings(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines, cors_origins=["https://app.example.com"]) as client:
        pre = client.options("/api/v1/auth/me", headers={"Origin": "https://app.example.com",
                                                          "Access-Control-Request-Method": "GET",
                                                          "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://app.example.com"
        evil = client.options("/api/v1/auth/me", headers={"Origin": "https://evil.example.com",
                                                           "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in evil.headers


def test_openapi_documents_every_tenancy_and_wallet_route(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        spec = client.get("/openapi.json").json()
    mine = {p: ops for p, ops in spec["paths"].items()
            if p.startswith(("/api/v1/auth", "/api/v1/invitations")) or
            any(s in p for s in ("/members", "/invitations", "/wallets", "/audit-log", "/feature-costs",
                                 "/ownership-transfer")) or p in ("/api/v1/projects", "/api/v1/projects/{project_id}")}
    assert len(mine) >= 25
    missing = [(p, m) for p, ops in mine.items() for m, op in ops.items()
               if not op.get("summary") or not any(c.startswith("2") for c in op.get("responses", {}))]
    assert missing == []
    debit = spec["paths"]["/api/v1/projects/{project_id}/wallets/{wallet_id}/debit"]["post"]
    assert {"400", "402", "404", "409"} <= set(debit["responses"])
    assert any(p["name"] == "Idempotency-Key" for p in debit["parameters"])
    schema = spec["components"]["schemas"]["DebitRequest"]
    assert schema.get("examples")


def test_docs_work_offline_under_a_csp_with_an_authorize_button(database_url: str, engines: Any) -> None:
    """/docs references only this server's assets (Swagger UI from the installed wheel), every one of them is
    served, no inline script runs, and the OpenAPI declares the two ways to authenticate."""
    import re

    with api_client(database_url, engines) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
        html = page.text
        assert "http://" not in html and "https://" not in html  # nothing from a CDN
        assert not re.search(r"<script>(?!</script>)", html)  # no inline script
        assets = re.findall(r'(?:src|href)="(/docs/[^"]+)"', html)
        assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css", "/docs/init.js"} <= set(assets)
        for asset in assets:
            r = client.get(asset)
            assert r.status_code == 200 and len(r.content) > 100, asset
        assert "SwaggerUIBundle" in client.get("/docs/assets/swagger-ui-bundle.js").text
        assert client.get("/redoc").status_code == 404  # ReDoc would load from a CDN: off

        spec = client.get("/openapi.json").json()
        schemes = spec["components"]["securitySchemes"]
        assert schemes["userToken"] == {**schemes["userToken"], "type": "http", "scheme": "bearer",
                                        "bearerFormat": "JWT"}
        assert schemes["apiKey"]["scheme"] == "bearer"
        assert spec["paths"]["/api/v1/auth/me"]["get"]["security"] == [{"userToken": []}, {"apiKey": []}]
        assert spec["paths"]["/api/v1/auth/login"]["post"]["security"] == []
