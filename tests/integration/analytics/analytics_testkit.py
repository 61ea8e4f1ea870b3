"""Helpers for the analytics tests (a module of its own so test files can import it by a unique name)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg

from analytics.settings import AnalyticsSettings
from analytics.sink import Sink
from ledger.db import libpq_url, make_engine
from ledger.kafka import make_producer
from ledger.outbox import OutboxRelay


class Producer:
    """Produces JSON values to the real broker and waits for every delivery report."""

    def __init__(self, bootstrap: str) -> None:
        self._producer = make_producer(bootstrap)
        self.delivered: list[tuple[str, int, int]] = []
        self._errors: list[str] = []

    def send(self, topic: str, value: Any, *, key: str | None = None, partition: int | None = None,
             headers: dict[str, str] | None = None) -> None:
        payload = value if isinstance(value, bytes) else orjson.dumps(value)

        def report(err: Any, msg: Any) -> None:
            if err is not None:
                self._errors.append(str(err))
            else:
                self.delivered.append((msg.topic(), msg.partition(), msg.offset()))

        kwargs: dict[str, Any] = {"value": payload, "key": key, "on_delivery": report,
                                  "headers": list((headers or {}).items())}
        if partition is not None:
            kwargs["partition"] = partition
        self._producer.produce(topic, **kwargs)
        self._producer.poll(0)

    def flush(self) -> int:
        remaining = self._producer.flush(30)
        assert remaining == 0 and not self._errors, self._errors
        return len(self.delivered)


def wait_for(condition: Callable[[], bool], *, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class RunningSink:
    def __init__(self, settings: AnalyticsSettings, *, group_id: str | None = None) -> None:
        self.stop_event = threading.Event()
        self.sink = Sink(settings, stop=self.stop_event, group_id=group_id)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.sink.run()
        except BaseException as exc:  # surfaced by wait_messages / stop
            self.error = exc

    def wait_messages(self, expected: dict[str, int], *, timeout_s: float = 60.0) -> None:
        """Until the sink has consumed ``expected`` messages per topic AND inserted them (nothing pending)."""
        def done() -> bool:
            if self.error is not None:
                raise self.error
            got = self.sink.stats.messages
            return all(got.get(t, 0) >= n for t, n in expected.items()) and not self.sink._pending
        wait_for(done, timeout_s=timeout_s, what=f"sink to consume {expected}")

    def stop(self) -> None:
        self.stop_event.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "sink thread did not stop"
        if self.error is not None:
            raise self.error


def usage_event(*, project: str, subject: str, type_: str = "tokens", units: Any = 1, event_id: str | None = None,
                time_: datetime | None = None, source: str = "test", **data: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": event_id or uuid.uuid4().hex, "source": source, "type": type_,
            "subject": subject, "project": project,
            "time": (time_ or datetime.now(UTC)).isoformat(), "data": {"units": units, **data}}


PASSWORD = "correct horse battery staple"


def signup(client: Any, name: str = "user") -> dict[str, str]:
    """A new user through the tenancy API; returns {email, user_id, token}."""
    email = f"{name}-{uuid.uuid4().hex[:8]}@example.com"
    r = client.post("/api/v1/auth/signup", json={"email": email, "password": PASSWORD, "display_name": name})
    assert r.status_code == 201, r.text
    body = r.json()
    return {"email": email, "user_id": body["user"]["id"], "token": body["access_token"]}


def auth(user: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {user['token']}"}


def create_project(client: Any, owner: dict[str, str], name: str) -> str:
    r = client.post("/api/v1/projects", json={"name": name}, headers=auth(owner))
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def add_member(client: Any, project_id: str, owner: dict[str, str], user: dict[str, str], role: str) -> None:
    r = client.post(f"/api/v1/projects/{project_id}/members", json={"user_id": user["user_id"], "role": role},
                    headers=auth(owner))
    assert r.status_code == 201, r.text


def pg_rows(database_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def relay_then_republish(database_url: str, topics: Any, *, only_topic: str | None = None) -> int:
    """The real outbox relay, then the same payloads once more (a relay that crashed before marking its rows
    published), all of them or those of ``only_topic``; returns how many rows the real relay published."""
    engine = make_engine(database_url)
    producer = make_producer(topics.bootstrap)
    try:
        published = OutboxRelay(engine=engine, producer=producer, topic_prefix=topics.prefix).drain(timeout_s=30)
        rows = (pg_rows(database_url, "SELECT topic, key, payload FROM outbox ORDER BY id") if only_topic is None
                else pg_rows(database_url, "SELECT topic, key, payload FROM outbox WHERE topic = %s ORDER BY id",
                             only_topic))
        for topic, key, payload in rows:
            producer.produce(topics.name(topic), key=key.encode(), value=bytes(payload))
        assert producer.flush(30) == 0
        return published
    finally:
        engine.dispose()


def worker_dead_letters(project: str, *, source_topic: str) -> list[tuple[bytes, dict[str, str]]]:
    """Dead letters exactly as the streams worker builds them, for a packed message holding one event that
    lacks its ``id``: the worker's own parse/validate path makes the rejection and its own builder the message.
    Returns [current shape, the shape workers wrote before the ``project`` header and fields existed (the same
    envelope without ``project``/``event``, only a ``reason`` header)] — both are on real topics."""
    from streams.dead_letters import dead_letter_message
    from streams.metering import Limits, Rejection, parse_message, validate_event

    bad = {"specversion": "1.0", "source": "analytics-test", "type": "tokens", "subject": "user_1",
           "project": project, "data": {"units": "1"}}  # no id
    value = orjson.dumps([bad])
    items, rejections = parse_message(value, limits=Limits())
    assert not rejections
    (index, raw), = items
    rejection = validate_event(raw, index=index, message=value, arrival=datetime.now(UTC), limits=Limits())
    assert isinstance(rejection, Rejection)
    message = dead_letter_message(rejection, source_topic=source_topic, partition=0, offset=17,
                                  now=datetime.now(UTC))
    current = (message.value, {k: v.decode() for k, v in message.headers})
    legacy_envelope = {k: v for k, v in orjson.loads(message.value).items() if k not in ("project", "event")}
    legacy = (orjson.dumps(legacy_envelope), {"reason": rejection.reason})
    return [current, legacy]
