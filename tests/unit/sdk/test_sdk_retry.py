"""The SDK's retry decisions, driven by a scripted HTTP transport (only the client's logic is under test here;
the real server, broker and a real dropped connection are in tests/integration/sdk)."""

from __future__ import annotations

import random

import httpx
import orjson
import pytest

from meterline.client import DeliveryFailed, MeterlineClient, RequestRejected, RetryPolicy, usage_event, uuid7


def scripted(responses: list[httpx.Response | Exception], seen: list[list[str]]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append([e["id"] for e in orjson.loads(request.content)])
        item = responses.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    return httpx.MockTransport(handler)


def test_retries_429_and_5xx_honouring_retry_after_with_the_same_ids() -> None:
    seen: list[list[str]] = []
    sleeps: list[float] = []
    transport = scripted([httpx.Response(429, headers={"Retry-After": "2"}), httpx.Response(503),
                          httpx.ConnectError("refused"), httpx.Response(204)], seen)
    events = [usage_event(type="t", subject="s") for _ in range(3)]
    with MeterlineClient("http://127.0.0.1:1", "mlk_x", transport=transport, sleep=sleeps.append, seed=1,
                         retry=RetryPolicy(backoff_base_s=0.1, backoff_max_s=1.0)) as client:
        result = client.send(events)
    assert (result.accepted, result.retries, result.requests) == (3, 3, 4)
    assert all(ids == seen[0] for ids in seen) and seen[0] == [e["id"] for e in events]
    assert 2.0 <= sleeps[0] <= 2.1  # Retry-After is a floor
    assert 0 <= sleeps[1] <= 0.2 and 0 <= sleeps[2] <= 0.4  # full jitter under base·2^attempt


def test_partial_rejection_maps_indexes_to_the_callers_input_and_is_not_retried() -> None:
    seen: list[list[str]] = []
    problem = {"code": "ingest.events_rejected", "accepted": 1, "rejected": [{"index": 1, "id": "b", "reason": "x"}]}
    transport = scripted([httpx.Response(204), httpx.Response(400, json=problem)], seen)
    events = [usage_event(type="t", subject="s", id=i) for i in "abcd"]
    with MeterlineClient("http://127.0.0.1:1", "mlk_x", batch_size=2, transport=transport) as client:
        result = client.send(events)
    assert result.accepted == 3 and result.rejected == [{"index": 3, "id": "b", "reason": "x"}]
    assert len(seen) == 2


def test_non_retryable_and_exhausted() -> None:
    seen: list[list[str]] = []
    transport = scripted([httpx.Response(401, json={"code": "api_key.revoked", "detail": "revoked"})], seen)
    with MeterlineClient("http://127.0.0.1:1", "mlk_x", transport=transport) as client, \
            pytest.raises(RequestRejected, match=r"api_key\.revoked"):
        client.send([usage_event(type="t", subject="s")])
    assert len(seen) == 1

    transport = scripted([httpx.Response(204)] + [httpx.Response(503)] * 3, seen)
    with MeterlineClient("http://127.0.0.1:1", "mlk_x", batch_size=1, transport=transport, sleep=lambda s: None,
                         retry=RetryPolicy(max_attempts=3)) as client, pytest.raises(DeliveryFailed) as info:
        client.send([usage_event(type="t", subject="s") for _ in range(3)])
    assert info.value.result.accepted == 1 and info.value.unconfirmed == 2 and info.value.status == 503


def test_uuid7_layout_and_order() -> None:
    ids = [uuid7() for _ in range(200)]
    assert len(set(ids)) == 200
    for value in ids:
        assert value[14] == "7" and value[19] in "89ab"
    # time-ordered at millisecond resolution
    assert [i[:13] for i in ids] == sorted(i[:13] for i in ids)
    random.shuffle(ids)
