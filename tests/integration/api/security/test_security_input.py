"""Security item 1 and 6 (issue 14): no leaks, no 500s on hostile input, strict money types.

Every case here answered a 500 on main before the fix — most of them with the SQL text and its bound
parameters (an argon2 hash included) in the body."""

from __future__ import annotations

import http.client
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy.exc
from fastapi.testclient import TestClient
from payments_testkit import SECRETS, headers_for, ls_signature, shop
from tenancy_testkit import api_client, create_project, live_server, money, signup

from api.main import create_app

JSON_DEPTH_MAX = 32  # api/validation.py; a literal so this file also runs against the code before it

pytestmark = pytest.mark.integration

# built at run time, so the traceback's source lines cannot carry them: only the exception's text does
HASH = "$" + "argon2id$v=19$" + "secret-hash"
STATEMENT = " ".join(("INSERT", "INTO users VALUES", "(%(h)s)"))
LEAKS = ("SELECT", "INSERT", "argon2", "psycopg", "sqlalchemy", "parameters")


def _no_leak(text: str) -> None:
    for marker in LEAKS:
        assert marker.lower() not in text.lower(), (marker, text)


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


def test_nul_in_strings_is_a_422_without_sql(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        r = client.post("/api/v1/auth/login", json={"email": "a\x00@example.com", "password": "pw-pw-pw-pw"})
        assert r.status_code == 422, r.text
        _no_leak(r.text)
        r = client.post("/api/v1/auth/signup", json={"email": "b\x00@example.com", "password": "correct horse 1"})
        assert r.status_code == 422, r.text
        _no_leak(r.text)
        r = client.post("/api/v1/webhooks/stripe/prj%00x", content=b"{}")
        assert r.status_code == 404 and r.json()["code"] == "http.404", r.text
        _no_leak(r.text)
        owner = signup(client, "owner")
        project = create_project(client, owner)
        base = f"/api/v1/projects/{project}"
        r = client.post(f"{base}/wallets", json={"owner_kind": "subject", "owner_ref": "u\x00x"}, headers=owner.headers)
        assert r.status_code == 422, r.text
        _no_leak(r.text)
        r = client.put(f"{base}/subject-keys/cust%00x", json={"wallet_id": "w"}, headers=owner.headers)
        assert r.status_code == 404, r.text
        r = client.get(f"{base}/wallets", params={"owner_ref": "x\x00"}, headers=owner.headers)
        assert r.status_code == 422, r.text
        r = client.get("/dashboard/static/dashboard.js%00.js")
        assert r.status_code == 404, r.text


def test_bodies_bounded_in_depth_and_money_types_strict(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        owner = signup(client, "owner")
        project = create_project(client, owner)
        base = f"/api/v1/projects/{project}"
        wallet = client.post(f"{base}/wallets", json={"owner_kind": "project"}, headers=owner.headers).json()["id"]
        assert money(client, f"{base}/wallets/{wallet}/grants", {"amount_minor": 100}, owner.headers).status_code == 201
        debit = f"{base}/wallets/{wallet}/debit"
        for body in ({"amount_minor": 1, "metadata": _nested(500)}, {"amount_minor": 1, "source_ref": "r\x00"},
                     {"amount_minor": 1, "metadata": {"k\x00": 1}}, {"amount_minor": True}, {"amount_minor": "10"},
                     {"amount_minor": 1.0}):
            r = money(client, debit, body, owner.headers)
            assert r.status_code == 422, (body if len(str(body)) < 200 else "deep", r.text)
            _no_leak(r.text)
        assert money(client, f"{base}/wallets/{wallet}/grants", {"amount_minor": True}, owner.headers).status_code == 422
        ok = money(client, debit, {"amount_minor": 1, "metadata": _nested(JSON_DEPTH_MAX - 1)}, owner.headers)
        assert ok.status_code in (200, 201), ok.text
        balance = client.get(f"{base}/wallets/{wallet}", headers=owner.headers).json()["balance"]
        assert int(balance["available_minor"]) == 99  # only the one valid debit moved money


def test_analytics_window_outside_the_store_is_a_422(database_url: str, engines: Any, tmp_path: Path) -> None:
    from tenancy_testkit import _settings

    from analytics.settings import AnalyticsSettings

    app = create_app(_settings(database_url, engines, {}))
    app.state.analytics_settings = AnalyticsSettings(clickhouse_url=f"chdb://{(tmp_path / 'ch').resolve()}",
                                                     embedded_sink_owner="none")
    with TestClient(app, raise_server_exceptions=False) as client:
        owner = signup(client, "owner")
        base = f"/api/v1/projects/{create_project(client, owner)}/analytics"
        for route in ("/usage", "/credit-flow", "/wallets/summary"):
            r = client.get(base + route, params={"to": "0235-01-28T23:41:42Z"}, headers=owner.headers)
            assert r.status_code == 422, (route, r.text)


def test_deep_ingest_data_and_signed_deep_webhook_are_4xx(database_url: str, engines: Any, topics: Any) -> None:
    with api_client(database_url, engines, topic_prefix=topics.prefix) as client:
        owner = signup(client, "owner")
        project = create_project(client, owner)
        event = {"specversion": "1.0", "id": "e1", "source": "s", "type": "t", "subject": "c", "data": _nested(500)}
        r = client.post("/api/v1/events", params={"project_id": project}, content=json.dumps(event),
                        headers={**owner.headers, "Content-Type": "application/cloudevents+json"})
        assert 400 <= r.status_code < 500, r.text
        s = shop(client)
        for provider in ("lemonsqueezy", "stripe", "revenuecat"):
            deep = b'{"meta": {"event_name": "order_created"}, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
            headers = ({"X-Signature": ls_signature(deep), "X-Event-Name": "order_created",
                        "Content-Type": "application/json"} if provider == "lemonsqueezy"
                       else headers_for(provider, deep))
            r = client.post(f"/api/v1/webhooks/{provider}/{s.project_id}", content=deep, headers=headers)
            assert r.status_code == 400, (provider, r.text)
        assert SECRETS  # the shop was configured with real secrets, so the bodies were verified first


def _boom_app(database_url: str, engines: Any) -> Any:
    from tenancy_testkit import _settings

    app = create_app(_settings(database_url, engines, {}))

    def boom() -> None:  # what a database error looks like: its text holds the SQL and the bound parameters
        raise sqlalchemy.exc.DataError(STATEMENT, {"h": HASH}, Exception("NUL"))

    app.add_api_route("/boom", boom)
    return app


def test_unexpected_errors_are_bare_500s_that_keep_the_connection_and_log_no_secret(
        database_url: str, engines: Any, caplog: pytest.LogCaptureFixture) -> None:
    app = _boom_app(database_url, engines)
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.DEBUG):
        r = client.get("/boom", headers={"X-Request-ID": "req-boom-1"})
    assert r.status_code == 500, r.text
    body = r.json()
    assert body["code"] == "api.internal" and body["request_id"] == "req-boom-1", body
    _no_leak(r.text)
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "secret-hash" not in caplog.text and "argon2" not in caplog.text
    assert "DataError" in caplog.text and "req-boom-1" in caplog.text  # still findable in the logs


def test_a_500_keeps_the_keep_alive_connection(database_url: str, engines: Any) -> None:
    import tenancy_testkit

    original = tenancy_testkit.create_app
    tenancy_testkit.create_app = lambda settings: _boom_app(database_url, engines)  # type: ignore[assignment]
    try:
        with live_server(database_url, engines) as url:
            parts = urlsplit(url)
            conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
            conn.request("GET", "/boom")
            first = conn.getresponse()
            first.read()
            assert first.status == 500 and first.getheader("connection") != "close"
            conn.request("GET", "/healthz")  # the same socket: the server did not drop it
            second = conn.getresponse()
            second.read()
            assert second.status == 200
            conn.close()
    finally:
        tenancy_testkit.create_app = original
