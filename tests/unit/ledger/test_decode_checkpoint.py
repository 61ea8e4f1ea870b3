"""The ledger consumer decodes checkpoints with pydantic's JSON parser (``consumer._decode_bytes``); it must accept
and refuse exactly what validating the decoded JSON with the model does, so hostile or broken messages still halt
their lane as undecodable (ledger/README "Halted partitions") and nothing new slips through."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from ledger.consumer import _decode_bytes
from ledger.contracts import ChargeCheckpoint

WIRE: dict[str, Any] = {
    "source_topic": "usage.events.v1", "partition": 3, "as_of_offset": 41,
    "counters": [{
        "key": {"wallet_id": "w1", "project_id": "p1", "meter_id": "m1", "period_start": "2026-12-01T00:00:00+00:00",
                "price_version_id": "pv1"},
        "units": "12.5", "aggregation": "sum", "latest_at": "2026-12-06T01:59:00+00:00", "events": 4,
        "late_events": 0, "meter_version": 1, "price_effective_from": "2026-01-01T00:00:00+00:00",
        "price": {"model": "graduated", "tiers": [{"up_to": "10", "unit_price_minor": "2"},
                                                  {"up_to": None, "unit_price_minor": "1", "flat_price_minor": "5"}],
                  "free_units": "1"},
    }],
    "dedupe_keys": [1, -2, 2**63 - 1], "emitted_at": "2026-12-06T02:00:00+00:00",
    "stream_time": "2026-12-06T01:59:30Z", "owner_epoch": 2,
}


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return change


CHANGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "as sent": lambda doc: None,
    "float price": _set("counters.0.price.tiers.0.unit_price_minor", 0.4),
    "price tiers not increasing": _set("counters.0.price.tiers.0.up_to", "-1"),
    "per_unit without a unit price": _set("counters.0.price", {"model": "per_unit"}),
    "units as a number": _set("counters.0.units", 3),
    "units not a number": _set("counters.0.units", "NaN"),
    "units infinite": _set("counters.0.units", "Infinity"),
    "negative events": _set("counters.0.events", -1),
    "events as a string": _set("counters.0.events", "4"),
    "unknown aggregation": _set("counters.0.aggregation", "avg"),
    "naive period start": _set("counters.0.key.period_start", "2026-12-01T00:00:00"),
    "naive emitted_at": _set("emitted_at", "2026-12-06T02:00:00"),
    "dedupe key beyond 64 bits": _set("dedupe_keys.0", 2**63),
    "negative partition": _set("partition", -1),
    "partition as a string": _set("partition", "3"),
    "unknown member": _set("extra", 1),
    "counters not a list": _set("counters", {}),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_decodes_exactly_what_the_model_accepts(change: Callable[[dict[str, Any]], None]) -> None:
    doc = copy.deepcopy(WIRE)
    change(doc)
    raw = orjson.dumps(doc)
    try:
        expected: ChargeCheckpoint | None = ChargeCheckpoint.model_validate(orjson.loads(raw))
    except ValidationError:
        expected = None
    assert _decode_bytes(raw) == expected


@pytest.mark.parametrize("raw", [None, b"", b"{not json", b"[]", b"42", b"\xff\xfe"])
def test_what_is_not_json_or_not_an_object_is_undecodable(raw: bytes | None) -> None:
    assert _decode_bytes(raw) is None


def test_the_wire_form_decodes_to_its_values() -> None:
    checkpoint = _decode_bytes(orjson.dumps(WIRE))
    assert checkpoint is not None
    assert (checkpoint.partition, checkpoint.as_of_offset, checkpoint.owner_epoch) == (3, 41, 2)
    assert str(checkpoint.counters[0].units) == "12.5"
    assert checkpoint.dedupe_keys == [1, -2, 2**63 - 1]


def _with_counters(*prices: Any) -> bytes:
    doc = copy.deepcopy(WIRE)
    counter = doc["counters"][0]
    doc["counters"] = [{**copy.deepcopy(counter), "key": {**counter["key"], "wallet_id": f"w{i}"}, "price": price}
                       for i, price in enumerate(prices)]
    return orjson.dumps(doc)


def test_a_price_repeated_in_every_counter_is_validated_as_each_copy_says() -> None:
    """Prices are validated once per distinct wire form (ledger/contracts.py ``CounterPrice``): a bad copy of a
    price already seen still refuses the checkpoint, and a good price after a refused one still decodes."""
    good = WIRE["counters"][0]["price"]
    float_copy = copy.deepcopy(good)
    float_copy["tiers"][1]["unit_price_minor"] = 1.0
    assert _decode_bytes(_with_counters(good, good, good)) is not None
    assert _decode_bytes(_with_counters(good, float_copy, good)) is None
    assert _decode_bytes(_with_counters({"model": "per_unit"}, good)) is None
    decoded = _decode_bytes(_with_counters(good, {**good, "free_units": "1.0"}, {"model": "per_unit",
                                                                               "unit_price_minor": 3}))
    assert decoded is not None
    first, second, third = (c.price for c in decoded.counters)
    assert first == ChargeCheckpoint.model_validate(orjson.loads(_with_counters(good))).counters[0].price
    assert str(second.free_units) == "1.0" and str(third.unit_price_minor) == "3"


@pytest.mark.parametrize("number", [b"9" * 30, b"-" + b"9" * 30, b"1e400", b"0.4"])
def test_a_price_with_a_number_beyond_64_bits_is_decided_by_the_model(number: bytes) -> None:
    """A price field may hold any JSON number; one orjson cannot write back (the cache's key) is validated as sent,
    so the consumer decides exactly as the model and never raises."""
    raw = orjson.dumps(WIRE).replace(b'"unit_price_minor":"2"', b'"unit_price_minor":' + number)
    assert raw != orjson.dumps(WIRE)
    try:
        expected: ChargeCheckpoint | None = ChargeCheckpoint.model_validate(json.loads(raw))
    except ValidationError:
        expected = None
    assert _decode_bytes(raw) == expected


def test_a_number_beyond_range_never_passes_for_a_null_seen_before() -> None:
    """``1e400`` parses as infinity, which orjson writes back as ``null``: a price keyed that way would hit the entry
    of the valid price with ``"up_to": null`` (an open last tier) decoded just before, and be accepted."""
    good = WIRE["counters"][0]["price"]
    marked = copy.deepcopy(good)
    marked["tiers"][1]["up_to"] = "OUT-OF-RANGE"
    raw = _with_counters(good, marked).replace(b'"OUT-OF-RANGE"', b"1e400")
    with pytest.raises(ValidationError):
        ChargeCheckpoint.model_validate(json.loads(raw))
    assert _decode_bytes(_with_counters(good)) is not None
    assert _decode_bytes(raw) is None
