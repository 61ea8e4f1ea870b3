"""Helpers for the ingestion, API-key and SDK tests: a real uvicorn server on 127.0.0.1 in a thread, a project
with keys made over HTTP, and a consumer that reads back what actually reached the topic.

"Everything consumed" is decided by counting the events we expect (then an idle window to catch extras),
never by end offsets, which this broker reports wrongly (DESIGN §5)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import uvicorn

from api.ingest.settings import IngestSettings
from api.main import create_app
from api.settings import ApiSettings
from ledger.kafka import make_consumer, topic_name
from meterline.services import free_port
from streams.contracts import TOPIC_USAGE_EVENTS

PASSWORD = "correct horse battery staple"


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1:<free port> in a thread; yield its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            lifespan="on", loop="asyncio", http="h11")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def make_app(database_url: str, *, bootstrap: str, topic_prefix: str, **ingest: Any) -> Any:
    # METERLINE_TOPIC_PREFIX, not topic_prefix=: the field only answers to its alias (topic_prefix= is ignored)
    settings = ApiSettings(database_url=database_url, KAFKA_BOOTSTRAP_SERVERS=bootstrap,
                           METERLINE_TOPIC_PREFIX=topic_prefix,
                           auth_rate_limit_per_s=1000.0, auth_rate_limit_burst=1000, rate_limit_per_s=100_000.0,
                           rate_limit_burst=100_000)
    assert settings.topic_prefix == topic_prefix and settings.kafka_bootstrap_servers == bootstrap
    app = create_app(settings)
    app.state.ingest_settings = IngestSettings(**{"ack_timeout_s": 5.0, "log_prune_interval_s": 3600.0, **ingest})
    return app


@dataclass
class Tenant:
    base_url: str
    project_id: str
    owner_headers: dict[str, str]
    keys: dict[str, str] = field(default_factory=dict)  # name -> token
    key_ids: dict[str, str] = field(default_factory=dict)

    def key_headers(self, name: str = "ingest", content_type: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.keys[name]}"}
        if content_type:
            headers["Content-Type"] = content_type
        return headers


def signup(http: httpx.Client, name: str) -> dict[str, str]:
    email = f"{name}-{uuid.uuid4().hex[:8]}@example.com"
    r = http.post("/api/v1/auth/signup", json={"email": email, "password": PASSWORD, "display_name": name})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def new_tenant(http: httpx.Client, *, name: str = "acme", owner_headers: dict[str, str] | None = None,
               keys: dict[str, list[str]] | None = None) -> Tenant:
    owner = owner_headers or signup(http, f"{name}-owner")
    r = http.post("/api/v1/projects", json={"name": name}, headers=owner)
    assert r.status_code == 201, r.text
    tenant = Tenant(str(http.base_url).rstrip("/"), r.json()["id"], owner)
    for key_name, scopes in (keys or {"ingest": ["ingest"]}).items():
        created = create_key(http, tenant, name=key_name, scopes=scopes)
        tenant.keys[key_name] = created["token"]
        tenant.key_ids[key_name] = created["id"]
    return tenant


def create_key(http: httpx.Client, tenant: Tenant, *, name: str, scopes: list[str], **extra: Any) -> dict[str, Any]:
    r = http.post(f"/api/v1/projects/{tenant.project_id}/api-keys", json={"name": name, "scopes": scopes, **extra},
                  headers=tenant.owner_headers)
    assert r.status_code == 201, r.text
    return dict(r.json())


def cloudevent(i: int, *, subject: str = "cust-1", source: str = "svc", tokens: int = 1,
               prefix: str = "e", **extra: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"{prefix}{i}", "source": source, "type": "tokens", "subject": subject,
            "time": "2026-03-01T11:00:00Z", "data": {"tokens": tokens}, **extra}


@dataclass(frozen=True)
class Consumed:
    partition: int
    offset: int
    key: bytes | None
    events: list[dict[str, Any]]


def usage_topic(prefix: str) -> str:
    return topic_name(TOPIC_USAGE_EVENTS, prefix)


def consume(bootstrap: str, topic: str, *, expect_events: int, timeout_s: float = 30.0,
            idle_s: float = 1.5) -> list[Consumed]:
    """Read ``topic`` from the beginning until ``expect_events`` events arrived, then ``idle_s`` more to catch
    extras (duplicates, strays). Bounded by ``timeout_s``; returns what was read either way."""
    consumer = make_consumer(bootstrap, f"test-{uuid.uuid4().hex[:8]}")
    consumer.subscribe([topic])
    out: list[Consumed] = []
    count = 0
    deadline = time.monotonic() + timeout_s
    idle_until: float | None = None
    try:
        while time.monotonic() < deadline:
            if idle_until is not None and time.monotonic() >= idle_until:
                break
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                continue
            decoded = orjson.loads(msg.value())
            events = decoded if isinstance(decoded, list) else [decoded]
            out.append(Consumed(msg.partition(), msg.offset(), msg.key(), events))
            count += len(events)
            if count >= expect_events and idle_until is None:
                idle_until = time.monotonic() + idle_s
    finally:
        consumer.close()
    return out


def all_events(consumed: list[Consumed]) -> list[dict[str, Any]]:
    return [e for c in consumed for e in c.events]
