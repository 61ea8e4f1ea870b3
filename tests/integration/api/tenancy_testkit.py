"""Helpers for the tenancy and wallet API tests: an app on this test's database, users, projects, roles.

Everything goes through HTTP (FastAPI's TestClient runs the real app with its lifespan against the real
PostgreSQL of the ``database_url`` fixture); only reading the email outbox and forcing an expiry use SQL."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import psycopg
from fastapi.testclient import TestClient

from api.main import create_app
from api.settings import ApiSettings
from ledger.db import libpq_url, make_engine
from ledger.scheduler import Job, Scheduler
from ledger.settings import LedgerSettings

PASSWORD = "correct horse battery staple"
ROLES = ("owner", "admin", "member", "viewer")


def _settings(database_url: str, engines: Any, overrides: dict[str, Any]) -> ApiSettings:
    return ApiSettings(database_url=database_url, kafka_bootstrap_servers=engines.kafka_bootstrap_servers,
                       **{"clickhouse_url": engines.clickhouse_url, "auth_rate_limit_per_s": 1000.0,
                          "auth_rate_limit_burst": 1000, **overrides})


@contextmanager
def api_client(database_url: str, engines: Any, **overrides: Any) -> Iterator[TestClient]:
    """The app on this test's database (and the session's broker, for routers that talk to Kafka)."""
    settings = _settings(database_url, engines, overrides)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@dataclass(frozen=True)
class UserSession:
    user_id: str
    email: str
    access_token: str
    refresh_token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


def signup(client: httpx.Client, name: str | None = None) -> UserSession:
    email = f"{name or 'user'}-{uuid.uuid4().hex[:8]}@example.com"
    r = client.post("/api/v1/auth/signup", json={"email": email, "password": PASSWORD, "display_name": name})
    assert r.status_code == 201, r.text
    body = r.json()
    return UserSession(body["user"]["id"], email, body["access_token"], body["refresh_token"])


def create_project(client: httpx.Client, owner: UserSession, name: str = "Acme", **extra: Any) -> str:
    r = client.post("/api/v1/projects", json={"name": name, **extra}, headers=owner.headers)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def owner_and_project(client: httpx.Client, name: str = "Acme") -> tuple[dict[str, str], str]:
    """A new owner and their project (works over TestClient and over real HTTP): the owner's headers, the id."""
    owner = signup(client, "owner")
    return owner.headers, create_project(client, owner, name)


def add_member(client: TestClient, project_id: str, owner: UserSession, user: UserSession, role: str) -> None:
    r = client.post(f"/api/v1/projects/{project_id}/members", json={"user_id": user.user_id, "role": role},
                    headers=owner.headers)
    assert r.status_code == 201, r.text


@dataclass(frozen=True)
class Team:
    project_id: str
    by_role: dict[str, UserSession]  # owner, admin, member, viewer, outsider


def team(client: TestClient, users: dict[str, UserSession], name: str = "Acme") -> Team:
    """A project owned by users['owner'] with users admin/member/viewer in those roles; 'outsider' is not in it."""
    project_id = create_project(client, users["owner"], name)
    for role in ("admin", "member", "viewer"):
        add_member(client, project_id, users["owner"], users[role], role)
    return Team(project_id, users)


def five_users(client: TestClient) -> dict[str, UserSession]:
    return {role: signup(client, role) for role in (*ROLES, "outsider")}


def sql(database_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def outbox_token(database_url: str, email: str) -> str:
    """The invitation token in the newest email to ``email`` (what the invitee would click)."""
    rows = sql(database_url, "SELECT body_text FROM email_outbox WHERE to_address = %s ORDER BY id DESC LIMIT 1",
               email.lower())
    assert rows, f"no email to {email}"
    match = re.search(r"/invitations/(mli_[A-Za-z0-9_-]+)", rows[0][0])
    assert match, rows[0][0]
    return match.group(1)


@contextmanager
def live_server(database_url: str, engines: Any, **overrides: Any) -> Iterator[str]:
    """The real app under uvicorn on 127.0.0.1 in a thread (for concurrency over real HTTP). Yields the base URL."""
    import threading
    import time

    import uvicorn

    from meterline.services import free_port

    settings = _settings(database_url, engines, overrides)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def scheduler_round(database_url: str, jobs: list[Job], *, now: datetime | None = None) -> dict[str, int]:
    """One forced round of the real scheduler running ``jobs`` on this test's database, as a new holder that
    releases the lease after it (like a restarted scheduler); ``now`` stands in for the database clock. Returns
    name -> rows; fails on a job error."""
    engine = make_engine(database_url, pool_size=2)
    try:
        scheduler = Scheduler(engine=engine, settings=LedgerSettings.model_validate({"DATABASE_URL": database_url}),
                              jobs=jobs)
        results = scheduler.run_round(now=now, force=True)
        scheduler.release()
    finally:
        engine.dispose()
    assert results is not None and not scheduler.failures, scheduler.failures
    return results


def money(client: TestClient, path: str, body: dict[str, Any] | None, headers: dict[str, str],
          key: str | None = None) -> Any:
    """POST a money operation with a fresh (or the given) Idempotency-Key."""
    return client.post(path, json=body, headers={**headers, "Idempotency-Key": key or uuid.uuid4().hex})
