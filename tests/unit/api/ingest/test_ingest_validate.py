"""The lean ingest validator, the Lago mapping and the packer (pure functions, no engines)."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.ingest.packing import pack
from api.ingest.service import InvalidBody, UnsupportedMediaType, classify
from api.ingest.validate import Limits, check_cloudevents, check_lago_events, lago_time
from streams.contracts import UsageEvent, partition_for

NOW = "2026-03-01T12:00:00.000Z"
LIMITS = Limits()


def ce(**overrides: object) -> dict[str, object]:
    event: dict[str, object] = {"specversion": "1.0", "id": "e1", "source": "svc", "type": "tokens",
                                "subject": "cust-1", "time": "2026-03-01T11:00:00Z", "data": {"tokens": 5}}
    event.update(overrides)
    return {k: v for k, v in event.items() if v is not ...}


def test_valid_event_is_normalized_and_parses_as_the_streams_contract() -> None:
    accepted, rejected = check_cloudevents([ce(project="someone-else")], project_id="prj_a", now_iso=NOW,
                                           limits=LIMITS)
    assert rejected == []
    event = accepted[0].event
    assert event["project"] == "prj_a"  # the key's project wins over a client-sent attribute
    assert orjson.loads(accepted[0].payload) == event
    UsageEvent.model_validate(event)


def test_missing_time_and_specversion_are_filled_deterministically() -> None:
    accepted, _ = check_cloudevents([ce(time=..., specversion=...)], project_id="p", now_iso=NOW, limits=LIMITS)
    assert accepted[0].event["time"] == NOW
    assert accepted[0].event["specversion"] == "1.0"


@pytest.mark.parametrize(("overrides", "reason_start"), [
    ({"id": ...}, "id:"),
    ({"id": ""}, "id:"),
    ({"id": 5}, "id:"),
    ({"source": "x" * 257}, "source:"),
    ({"subject": "a\x00b"}, "subject:"),
    ({"type": None}, "type:"),
    ({"time": "yesterday"}, "time:"),
    ({"time": "2026-03-01T11:00:00"}, "time:"),  # no offset
    ({"data": [1, 2]}, "data:"),
    ({"specversion": "0.3"}, "specversion:"),
    ({"datacontenttype": "text/plain"}, "datacontenttype:"),
    ({"data_base64": "AAAA"}, "data_base64:"),
    ({"Bad-Name": "x"}, "Bad-Name:"),
    ({"ext": {"nested": 1}}, "ext:"),
])
def test_each_invalid_field_is_rejected_with_its_name(overrides: dict[str, object], reason_start: str) -> None:
    accepted, rejected = check_cloudevents([ce(**overrides)], project_id="p", now_iso=NOW, limits=LIMITS)
    assert accepted == []
    assert rejected[0].index == 0
    assert rejected[0].reason.startswith(reason_start), rejected[0].reason


def test_extensions_are_kept_and_oversized_events_rejected() -> None:
    accepted, _ = check_cloudevents([ce(region="eu", retries=2)], project_id="p", now_iso=NOW, limits=LIMITS)
    assert accepted[0].event["region"] == "eu"
    big = ce(data={"blob": "x" * 70_000})
    accepted, rejected = check_cloudevents([big], project_id="p", now_iso=NOW, limits=LIMITS)
    assert accepted == [] and "bytes" in rejected[0].reason


def test_mixed_batch_keeps_indexes() -> None:
    items = [ce(id="a"), "not an object", ce(id="c", subject=""), ce(id="d")]
    accepted, rejected = check_cloudevents(items, project_id="p", now_iso=NOW, limits=LIMITS)
    assert [a.index for a in accepted] == [0, 3]
    assert [(r.index, r.id) for r in rejected] == [(1, None), (2, "c")]


def test_lago_event_maps_onto_the_contract() -> None:
    lago = {"transaction_id": "tx-1", "external_subscription_id": "sub-9", "code": "storage",
            "timestamp": 1651222791, "properties": {"gb": 10}}
    accepted, rejected = check_lago_events([lago], project_id="p", now_iso=NOW, limits=LIMITS)
    assert rejected == []
    event = accepted[0].event
    assert (event["id"], event["source"], event["type"], event["subject"]) == ("tx-1", "lago", "storage", "sub-9")
    assert event["time"] == "2022-04-29T08:59:51.000Z"
    assert event["data"] == {"gb": 10}
    UsageEvent.model_validate(event)
    # external_customer_id wins as the subject when both are given
    both = {**lago, "external_customer_id": "cus-1"}
    assert check_lago_events([both], project_id="p", now_iso=NOW, limits=LIMITS)[0][0].event["subject"] == "cus-1"


@pytest.mark.parametrize(("value", "expected"), [
    (None, NOW), (0, "1970-01-01T00:00:00.000Z"), ("1651222791.5", "2022-04-29T08:59:51.500Z"),
    ("2022-04-29T08:59:51Z", "2022-04-29T08:59:51Z"), ("soon", None), (True, None), ({}, None)])
def test_lago_timestamps(value: object, expected: str | None) -> None:
    assert lago_time(value, now_iso=NOW) == expected


def test_lago_reasons_use_lago_field_names() -> None:
    items = [{"code": "x", "external_customer_id": "c"}, {"transaction_id": "t", "code": "x"}]
    _, rejected = check_lago_events(items, project_id="p", now_iso=NOW, limits=LIMITS)
    assert rejected[0].reason.startswith("transaction_id")
    assert rejected[1].reason.startswith("external_subscription_id or external_customer_id")


def test_classify_content_types() -> None:
    assert classify("application/cloudevents+json; charset=utf-8", {"id": "x"})[0:2] == ("cloudevents", [{"id": "x"}])
    assert classify("application/cloudevents-batch+json", [{"id": "x"}])[0] == "cloudevents"
    assert classify("application/json", [{"id": "x"}])[0] == "cloudevents"
    assert classify("application/json", {"event": {"transaction_id": "t"}})[0] == "lago"
    with pytest.raises(UnsupportedMediaType):
        classify("text/plain", {"id": "x"})
    with pytest.raises(InvalidBody):
        classify("application/cloudevents+json", [{"id": "x"}])
    with pytest.raises(InvalidBody):
        classify("application/cloudevents-batch+json", {"id": "x"})


@settings(max_examples=60, deadline=None)
@given(subjects=st.lists(st.text(min_size=1, max_size=20).filter(lambda s: "\x00" not in s), min_size=1,
                         max_size=60),
       partitions=st.integers(min_value=1, max_value=8), size_max=st.integers(min_value=300, max_value=3000))
def test_pack_puts_every_event_once_in_its_partition_under_the_size_bound(subjects: list[str], partitions: int,
                                                                        size_max: int) -> None:
    items = [ce(id=f"e{i}", subject=s) for i, s in enumerate(subjects)]
    accepted, rejected = check_cloudevents(items, project_id="p", now_iso=NOW, limits=LIMITS)
    assert rejected == []
    messages = pack(accepted, partitions=partitions, message_bytes_max=size_max)
    seen: list[str] = []
    for message in messages:
        decoded = orjson.loads(message.value)
        events = decoded if isinstance(decoded, list) else [decoded]
        assert len(events) == message.events
        if len(events) > 1:
            assert len(message.value) <= size_max
        for event in events:
            assert partition_for(event["subject"], partitions) == message.partition
            seen.append(event["id"])
        if message.key is not None:
            assert {e["subject"] for e in events} == {message.key.decode()}
    assert sorted(seen) == sorted(f"e{i}" for i in range(len(subjects)))


def test_every_missing_attribute_is_named_not_only_the_first() -> None:
    _, rejected = check_cloudevents([ce(id=..., subject=..., source="")], project_id="prj_a", now_iso=NOW,
                                    limits=LIMITS)
    reason = rejected[0].reason
    assert all(name in reason for name in ("id:", "source:", "subject:")) and "type:" not in reason
