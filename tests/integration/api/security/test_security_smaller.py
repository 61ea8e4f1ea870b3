"""Security item 7 (issue 14): smaller gaps — a foreign wallet id never takes the owner's row lock, ordinary 404s
are not logged as errors, and the docs pages carry a CSP."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import psycopg
import pytest
from tenancy_testkit import api_client, create_project, live_server, money, signup

from ledger.db import libpq_url

pytestmark = pytest.mark.integration


def test_a_debit_naming_a_foreign_wallet_does_not_lock_it(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        alice, mallory = signup(client, "alice"), signup(client, "mallory")
        theirs, mine = create_project(client, alice), create_project(client, mallory)
        wallet = client.post(f"/api/v1/projects/{theirs}/wallets", json={"owner_kind": "project"},
                             headers=alice.headers).json()["id"]
        with psycopg.connect(libpq_url(database_url)) as holder:
            holder.execute("SELECT 1 FROM wallets WHERE id = %s FOR UPDATE", (wallet,))  # alice's own work, running
            answer: list[Any] = []
            started = time.monotonic()
            t = threading.Thread(target=lambda: answer.append(money(
                client, f"/api/v1/projects/{mine}/wallets/{wallet}/debit", {"amount_minor": 1}, mallory.headers)))
            t.start()
            t.join(timeout=4)
            finished_s = time.monotonic() - started
            holder.rollback()
            t.join(timeout=30)
        assert answer and answer[0].status_code == 404, answer
        assert finished_s < 4, f"the foreign debit waited {finished_s:.1f} s for alice's wallet lock"


def test_ordinary_404s_are_not_logged_as_errors(database_url: str, engines: Any,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    # over real uvicorn: on main the catalog's 404 went through the catch-all handler, so uvicorn logged
    # "Exception in ASGI application" with a traceback (and dropped the connection) for a routine miss
    with live_server(database_url, engines) as url, httpx.Client(base_url=url, timeout=30) as http:
        owner = signup(http, "owner")
        base = f"/api/v1/projects/{create_project(http, owner)}"
        capfd.readouterr()
        for path in ("/meters/nope", "/prices/nope", "/wallets/w_nope", "/wallets/w_nope/transactions"):
            r = http.get(base + path, headers=owner.headers)
            assert r.status_code == 404, (path, r.text)
        logged = capfd.readouterr()
    text = logged.out + logged.err
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text[-3000:]


def test_docs_pages_have_a_content_security_policy(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        for path in ("/docs", "/redoc"):
            r = client.get(path)
            if path == "/redoc" and r.status_code == 404:
                continue  # not served (main serves Swagger UI only)
            assert r.status_code == 200, path
            csp = r.headers.get("content-security-policy", "")
            assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, (path, csp)
