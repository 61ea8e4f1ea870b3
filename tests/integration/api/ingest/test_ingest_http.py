"""HTTP ingestion against a real uvicorn server, the real broker and PostgreSQL: what reaches the topic.

Every assertion about acceptance is checked on the messages actually in ``usage.events.v1`` (consumed),
including their partition (``partition_for``), packing and the project stamped from the API key."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from ingest_testkit import (
    Tenant,
    all_events,
    cloudevent,
    consume,
    make_app,
    new_tenant,
    serve,
    usage_topic,
)

from streams.contracts import UsageEvent, partition_for

pytestmark = pytest.mark.integration


@pytest.fixture
def server(database_url: str, topics: Any) -> Iterator[tuple[str, Any]]:
    app = make_app(database_url, bootstrap=topics.bootstrap, topic_prefix=topics.prefix, batch_events_max=500)
    with serve(app) as base_url:
        yield base_url, app


@pytest.fixture
def http(server: tuple[str, Any]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=30) as client:
        yield client


@pytest.fixture
def tenant(http: httpx.Client) -> Tenant:
    return new_tenant(http, keys={"ingest": ["ingest"], "reader": ["read"], "admin": ["admin"]})


def _assert_placed(consumed: list[Any], partitions: int, project_id: str) -> None:
    for message in consumed:
        for event in message.events:
            assert message.partition == partition_for(event["subject"], partitions), event
            assert event["project"] == project_id
            UsageEvent.model_validate(event)


def test_cloudevents_single_batch_and_plain_json_reach_their_partitions_packed(
        http: httpx.Client, tenant: Tenant, topics: Any) -> None:
    single = cloudevent(0, subject="solo")
    r = http.post("/api/v1/events", content=orjson.dumps(single),
                  headers=tenant.key_headers(content_type="application/cloudevents+json"))
    assert r.status_code == 204, r.text
    assert r.content == b""

    batch = [cloudevent(i, subject=f"cust-{i % 10}") for i in range(1, 201)]
    r = http.post("/api/v1/events", content=orjson.dumps(batch),
                  headers=tenant.key_headers(content_type="application/cloudevents-batch+json"))
    assert r.status_code == 204, r.text

    plain = [cloudevent(i, subject=f"cust-{i % 3}") for i in range(201, 211)]
    r = http.post("/api/v1/events", json=plain, headers=tenant.key_headers())
    assert r.status_code == 204, r.text
    r = http.post("/api/v1/events", json=cloudevent(211, subject="solo"), headers=tenant.key_headers())
    assert r.status_code == 204, r.text

    consumed = consume(topics.bootstrap, usage_topic(topics.prefix), expect_events=212)
    events = all_events(consumed)
    assert sorted(e["id"] for e in events) == sorted(f"e{i}" for i in range(212))
    _assert_placed(consumed, topics.usage_partitions, tenant.project_id)
    # packing: the 200-event batch over 10 subjects became at most one message per partition
    assert len(consumed) <= 1 + topics.usage_partitions + topics.usage_partitions + 1
    by_id = {e["id"]: e for e in events}
    assert by_id["e5"]["data"] == {"tokens": 1} and by_id["e5"]["source"] == "svc"
    single_message = next(c for c in consumed if any(e["id"] == "e0" for e in c.events))
    assert single_message.key == b"solo"


def test_cloudevents_python_sdk_structured_binary_and_batch_work_unchanged(
        http: httpx.Client, tenant: Tenant, topics: Any) -> None:
    from cloudevents.core.bindings.http import to_binary, to_structured
    from cloudevents.core.formats.json import JSONFormat
    from cloudevents.core.v1.event import CloudEvent
    from cloudevents.v1.http import CloudEvent as LegacyCloudEvent
    from cloudevents.v1.http import to_structured as legacy_to_structured

    fmt = JSONFormat()
    event = CloudEvent(attributes={"type": "tokens", "source": "sdk", "subject": "cust-sdk", "id": "sdk-1"},
                       data={"tokens": 7})
    message = to_structured(event, fmt)
    r = http.post("/api/v1/events", content=message.body, headers={**tenant.key_headers(), **message.headers})
    assert r.status_code == 204, r.text

    binary = to_binary(CloudEvent(attributes={"type": "tokens", "source": "sdk", "subject": "cust sdk/2",
                                              "id": "sdk-2"}, data={"tokens": 3}), fmt)
    r = http.post("/api/v1/events", content=binary.body, headers={**tenant.key_headers(), **binary.headers})
    assert r.status_code == 204, r.text

    # batch mode: a JSON array of structured events with the batch media type
    batch = [CloudEvent(attributes={"type": "tokens", "source": "sdk", "subject": f"cust-{i}", "id": f"sdk-b{i}"},
                        data={"tokens": i}) for i in range(5)]
    body = b"[" + b",".join(fmt.write(e) for e in batch) + b"]"
    r = http.post("/api/v1/events", content=body,
                  headers=tenant.key_headers(content_type="application/cloudevents-batch+json"))
    assert r.status_code == 204, r.text

    headers, legacy_body = legacy_to_structured(LegacyCloudEvent(
        {"type": "tokens", "source": "sdk-legacy", "subject": "cust-legacy"}, {"tokens": 1}))
    r = http.post("/api/v1/events", content=legacy_body, headers={**tenant.key_headers(), **headers})
    assert r.status_code == 204, r.text

    consumed = consume(topics.bootstrap, usage_topic(topics.prefix), expect_events=8)
    events = all_events(consumed)
    assert len(events) == 8
    by_id = {e["id"]: e for e in events}
    assert by_id["sdk-1"]["data"] == {"tokens": 7} and by_id["sdk-1"]["subject"] == "cust-sdk"
    assert by_id["sdk-2"]["subject"] == "cust sdk/2" and by_id["sdk-2"]["data"] == {"tokens": 3}
    assert {f"sdk-b{i}" for i in range(5)} <= set(by_id)
    assert any(e["source"] == "sdk-legacy" for e in events)
    _assert_placed(consumed, topics.usage_partitions, tenant.project_id)


def test_lago_single_and_batch_answer_in_lagos_shape(http: httpx.Client, tenant: Tenant, topics: Any) -> None:
    one = {"transaction_id": "tx-1", "external_subscription_id": "sub-1", "code": "storage",
           "timestamp": 1651222791, "properties": {"gb": 10}}
    r = http.post("/api/v1/events", json={"event": one}, headers=tenant.key_headers())
    assert r.status_code == 200, r.text
    body = r.json()["event"]
    assert body["transaction_id"] == "tx-1" and body["code"] == "storage"
    assert body["external_subscription_id"] == "sub-1" and body["properties"] == {"gb": 10}
    assert body["timestamp"] == "2022-04-29T08:59:51.000Z" and body["lago_id"]

    batch = [{"transaction_id": f"tx-b{i}", "external_customer_id": f"cus-{i % 3}", "code": "api_calls",
              "timestamp": "2026-03-01T10:00:00Z"} for i in range(20)]
    r = http.post("/api/v1/events/batch", json={"events": batch}, headers=tenant.key_headers())
    assert r.status_code == 200, r.text
    assert [e["transaction_id"] for e in r.json()["events"]] == [f"tx-b{i}" for i in range(20)]

    consumed = consume(topics.bootstrap, usage_topic(topics.prefix), expect_events=21)
    events = {e["id"]: e for e in all_events(consumed)}
    assert len(events) == 21
    assert events["tx-1"]["source"] == "lago" and events["tx-1"]["type"] == "storage"
    assert events["tx-1"]["subject"] == "sub-1" and events["tx-1"]["data"] == {"gb": 10}
    assert events["tx-b4"]["subject"] == "cus-1" and events["tx-b4"]["time"] == "2026-03-01T10:00:00Z"
    _assert_placed(consumed, topics.usage_partitions, tenant.project_id)


def test_mixed_batch_accepts_the_valid_events_and_lists_each_rejection(
        http: httpx.Client, tenant: Tenant, topics: Any) -> None:
    batch: list[Any] = [cloudevent(i, subject=f"cust-{i}") for i in range(6)]
    batch[1] = {**batch[1], "subject": ""}
    batch[3] = {**batch[3], "time": "not a time"}
    batch[4] = 17
    r = http.post("/api/v1/events", json=batch, headers=tenant.key_headers())
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["code"] == "ingest.events_rejected"
    assert problem["accepted"] == 3 and problem["rejected_count"] == 3
    assert [(x["index"], x["id"]) for x in problem["rejected"]] == [(1, "e1"), (3, "e3"), (4, None)]
    assert problem["rejected"][0]["reason"].startswith("subject")
    assert problem["rejected"][1]["reason"].startswith("time")

    lago = [{"transaction_id": "l0", "external_customer_id": "c", "code": "x"},
            {"transaction_id": "l1", "code": "x"}]
    r = http.post("/api/v1/events/batch", json={"events": lago}, headers=tenant.key_headers())
    assert r.status_code == 422, r.text
    assert r.json()["accepted"] == 1 and "1" in r.json()["error_details"]

    consumed = consume(topics.bootstrap, usage_topic(topics.prefix), expect_events=4)
    assert sorted(e["id"] for e in all_events(consumed)) == ["e0", "e2", "e5", "l0"]

    # the recent-events list shows accepted and rejected events, rejected ones with their reason
    r = http.get("/api/v1/events", headers=tenant.key_headers("reader"))
    assert r.status_code == 200, r.text
    listed = r.json()
    assert len(listed) == 8
    reasons = {item["event"].get("id", item["event"].get("transaction_id")) if isinstance(item["event"], dict)
               else item["event"]: item.get("validationError") for item in listed}
    assert reasons["e0"] is None and reasons["e1"].startswith("subject") and reasons[17].startswith("event must")
    assert reasons["l1"].startswith("external_subscription_id")


def test_limits_malformed_bodies_and_content_types(http: httpx.Client, tenant: Tenant, server: Any) -> None:
    headers = tenant.key_headers(content_type="application/cloudevents-batch+json")
    too_many = [cloudevent(i) for i in range(501)]
    r = http.post("/api/v1/events", content=orjson.dumps(too_many), headers=headers)
    assert (r.status_code, r.json()["code"]) == (413, "ingest.batch_too_large")

    huge = b"[" + b" " * (6 * 1024 * 1024) + b"]"
    r = http.post("/api/v1/events", content=huge, headers=headers)
    assert r.status_code == 413

    r = http.post("/api/v1/events", content=b"{not json", headers=tenant.key_headers(content_type="application/json"))
    assert (r.status_code, r.json()["code"]) == (400, "ingest.malformed_json")
    r = http.post("/api/v1/events", content=b"id=1", headers=tenant.key_headers(content_type="text/plain"))
    assert (r.status_code, r.json()["code"]) == (415, "ingest.unsupported_media_type")
    r = http.post("/api/v1/events", content=b"[]", headers=headers)
    assert (r.status_code, r.json()["code"]) == (400, "ingest.invalid_body")
    r = http.post("/api/v1/events", content=orjson.dumps(cloudevent(1)), headers=headers)  # object as batch
    assert (r.status_code, r.json()["code"]) == (400, "ingest.invalid_body")
    big_event = cloudevent(1, data={"blob": "x" * 70_000})
    r = http.post("/api/v1/events", json=big_event, headers=tenant.key_headers())
    assert r.status_code == 400 and "bytes" in r.json()["rejected"][0]["reason"]


def test_keys_authenticate_only_their_own_project(http: httpx.Client, tenant: Tenant, topics: Any) -> None:
    event = cloudevent(1)
    assert http.post("/api/v1/events", json=event).status_code == 401
    r = http.post("/api/v1/events", json=event, headers={"Authorization": "Bearer mlk_00000000_" + "a" * 32})
    assert (r.status_code, r.json()["code"]) == (401, "api_key.invalid")
    r = http.post("/api/v1/events", json=event, headers={"Authorization": "Bearer mlk_garbage"})
    assert r.status_code == 401
    token = tenant.keys["ingest"]
    forged = token[:-1] + ("A" if token[-1] != "A" else "B")
    r = http.post("/api/v1/events", json=event, headers={"Authorization": f"Bearer {forged}"})
    assert (r.status_code, r.json()["code"]) == (401, "api_key.invalid")

    # a read-only key may list but not ingest
    r = http.post("/api/v1/events", json=event, headers=tenant.key_headers("reader"))
    assert r.status_code == 403
    assert http.get("/api/v1/events", headers=tenant.key_headers("ingest")).status_code == 403

    # another project's key: its events are stamped with ITS project, whatever the body says; it cannot name ours
    other = new_tenant(http, name="other", keys={"ingest": ["ingest"], "reader": ["read"]})
    r = http.post("/api/v1/events", json=cloudevent(99, project=tenant.project_id, prefix="x"),
                  headers=other.key_headers())
    assert r.status_code == 204, r.text
    r = http.post(f"/api/v1/events?project_id={tenant.project_id}", json=event, headers=other.key_headers())
    assert (r.status_code, r.json()["code"]) == (404, "api.not_found")
    r = http.get(f"/api/v1/events?project_id={tenant.project_id}", headers=other.key_headers("reader"))
    assert r.status_code == 404
    r = http.post("/api/v1/events", json=cloudevent(1), headers=tenant.key_headers())
    assert r.status_code == 204
    mine = http.get("/api/v1/events", headers=tenant.key_headers("reader")).json()
    theirs = http.get("/api/v1/events", headers=other.key_headers("reader")).json()
    assert [i["event"]["id"] for i in mine] == ["e1"] and [i["event"]["id"] for i in theirs] == ["x99"]
    assert theirs[0]["event"]["project"] == other.project_id

    consumed = consume(topics.bootstrap, usage_topic(topics.prefix), expect_events=2)
    projects = Counter((e["id"], e["project"]) for e in all_events(consumed))
    assert projects == Counter({("x99", other.project_id): 1, ("e1", tenant.project_id): 1})

    # a user token must name a project it can see
    r = http.post("/api/v1/events", json=cloudevent(2), headers=tenant.owner_headers)
    assert r.status_code == 422
    r = http.post(f"/api/v1/events?project_id={tenant.project_id}", json=cloudevent(2), headers=tenant.owner_headers)
    assert r.status_code == 204
    r = http.post(f"/api/v1/events?project_id={tenant.project_id}", json=cloudevent(3), headers=other.owner_headers)
    assert r.status_code == 404

    # revoked and expired keys stop working
    r = http.post(f"/api/v1/projects/{tenant.project_id}/api-keys/{tenant.key_ids['ingest']}/revoke",
                  headers=tenant.owner_headers)
    assert r.status_code == 200
    r = http.post("/api/v1/events", json=event, headers=tenant.key_headers())
    assert (r.status_code, r.json()["code"]) == (401, "api_key.revoked")


def test_recent_events_filters(http: httpx.Client, tenant: Tenant) -> None:
    events = [cloudevent(i, subject=f"cust-{i % 2}", time=f"2026-03-0{1 + i % 3}T00:00:00Z") for i in range(9)]
    assert http.post("/api/v1/events", json=events, headers=tenant.key_headers()).status_code == 204
    reader = tenant.key_headers("reader")

    def ids(params: dict[str, Any]) -> list[str]:
        r = http.get("/api/v1/events", params=params, headers=reader)
        assert r.status_code == 200, r.text
        return sorted(item["event"]["id"] for item in r.json())

    assert ids({}) == sorted(f"e{i}" for i in range(9))
    assert ids({"subject": "cust-1"}) == sorted(f"e{i}" for i in range(9) if i % 2 == 1)
    assert ids({"id": "e8"}) == ["e8"]
    assert ids({"from": "2026-03-02T00:00:00Z", "to": "2026-03-02T23:59:59Z"}) == \
        sorted(f"e{i}" for i in range(9) if i % 3 == 1)
    assert len(ids({"limit": 2})) == 2
    assert ids({"ingestedAtFrom": "2999-01-01T00:00:00Z"}) == []
    r = http.get("/api/v1/events", params={"limit": 101}, headers=reader)
    assert r.status_code == 422
    item = http.get("/api/v1/events", params={"limit": 1}, headers=reader).json()[0]
    assert set(item) >= {"event", "ingestedAt", "storedAt"}
