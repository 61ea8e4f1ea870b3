"""Lean per-event validation and normalization (pure; no I/O, no pydantic on the hot path).

The output of ``check_cloudevent`` is the usage-event contract of ``streams.contracts.UsageEvent``: the
CloudEvents 1.0 attributes OpenMeter accepts (id, source, specversion, type, subject, time, data,
datacontenttype, dataschema, extensions) plus ``project``. Hand-written checks instead of a pydantic model
because this runs for every event at tens of thousands of events per second (a model costs ~10x more) —
``tests/unit/api/ingest/test_ingest_validate.py`` checks that everything accepted here also parses as a UsageEvent.

Normalizations (all deterministic, so a retried request produces the same event):
- ``project`` is always the authenticated project; a client-sent ``project`` attribute is overwritten, which
  is what makes a key unable to write into another project;
- a missing ``time`` becomes the ingestion time (OpenMeter does the same), so the period an event is charged
  to is fixed at the edge and a replay of the topic charges the same period;
- a missing ``specversion`` becomes "1.0".

Lago events map onto the same contract: id=transaction_id, subject=external_customer_id (else
external_subscription_id), type=code, time=timestamp, data=properties, source="lago".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

LAGO_SOURCE = "lago"
_CORE = frozenset({"specversion", "id", "source", "type", "subject", "time", "data", "datacontenttype",
                   "dataschema", "project"})
_EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,64}$")


@dataclass(frozen=True, slots=True)
class Limits:
    field_chars_max: int = 256
    event_bytes_max: int = 64 * 1024


@dataclass(frozen=True, slots=True)
class Accepted:
    index: int
    event: dict[str, Any]
    payload: bytes  # the event serialized once; packed into Kafka messages and the ingest log as is


@dataclass(frozen=True, slots=True)
class Rejected:
    index: int
    id: str | None
    reason: str
    raw: Any


def utc_iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _required_str(ev: dict[str, Any], name: str, limit: int) -> str | None:
    """None when fine, else the reason."""
    value = ev.get(name)
    if not isinstance(value, str) or not value:
        return f"{name}: required, a non-empty string"
    if len(value) > limit:
        return f"{name}: at most {limit} characters"
    if "\x00" in value:
        return f"{name}: must not contain NUL characters"
    return None


def _check_time(value: Any) -> str | None:
    if not isinstance(value, str):
        return "time: must be an RFC 3339 date-time string"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return "time: not an RFC 3339 date-time"
    if parsed.tzinfo is None:
        return "time: must carry a time zone offset (e.g. Z)"
    return None


def check_cloudevent(raw: Any, *, project_id: str, now_iso: str, limits: Limits) -> dict[str, Any] | str:
    """The normalized event, or the reason it is rejected."""
    if not isinstance(raw, dict):
        return "event must be a JSON object"
    limit = limits.field_chars_max
    for name in ("id", "source", "type", "subject"):
        reason = _required_str(raw, name, limit)
        if reason:  # report every required attribute that is wrong, not only the first
            reasons = [r for n in ("id", "source", "type", "subject") if (r := _required_str(raw, n, limit))]
            return "; ".join(reasons)
    ev = dict(raw)
    spec = ev.get("specversion")
    if spec is None:
        ev["specversion"] = "1.0"
    elif spec != "1.0":
        return "specversion: only CloudEvents 1.0 is supported"
    time = ev.get("time")
    if time is None:
        ev["time"] = now_iso
    else:
        reason = _check_time(time)
        if reason:
            return reason
    data = ev.get("data")
    if data is not None and not isinstance(data, dict):
        return "data: must be a JSON object when present"
    content_type = ev.get("datacontenttype")
    if content_type is not None and content_type != "application/json":
        return "datacontenttype: only application/json is accepted"
    schema = ev.get("dataschema")
    if schema is not None and (not isinstance(schema, str) or not schema or len(schema) > 2048):
        return "dataschema: must be a non-empty URI string"
    if not ev.keys() <= _CORE:  # fast path: most events carry no extensions
        for name, value in ev.items():
            if name in _CORE:
                continue
            if name == "data_base64":
                return "data_base64: binary data is not supported; send data as a JSON object"
            if not _EXTENSION_NAME.match(name):
                return f"{name}: extension attribute names are lower-case letters and digits"
            if value is not None and not isinstance(value, (str, int, float, bool)):
                return f"{name}: extension attribute values must be strings, numbers or booleans"
            if isinstance(value, str) and len(value) > limit:
                return f"{name}: at most {limit} characters"
    ev["project"] = project_id
    return ev


def check_cloudevents(items: list[Any], *, project_id: str, now_iso: str, limits: Limits
                      ) -> tuple[list[Accepted], list[Rejected]]:
    accepted: list[Accepted] = []
    rejected: list[Rejected] = []
    size_max = limits.event_bytes_max
    dumps = orjson.dumps
    for index, raw in enumerate(items):
        result = check_cloudevent(raw, project_id=project_id, now_iso=now_iso, limits=limits)
        if isinstance(result, str):
            rejected.append(Rejected(index, _raw_id(raw), result, raw))
            continue
        payload = dumps(result)
        if len(payload) > size_max:
            rejected.append(Rejected(index, result["id"], f"event is {len(payload)} bytes; at most {size_max}", raw))
            continue
        accepted.append(Accepted(index, result, payload))
    return accepted, rejected


def _raw_id(raw: Any) -> str | None:
    if isinstance(raw, dict):
        value = raw.get("id", raw.get("transaction_id"))
        return value if isinstance(value, str) else None
    return None


# --------------------------------------------------------------------------- Lago


def lago_time(value: Any, *, now_iso: str) -> str | None:
    """Lago's timestamp (Unix seconds as number or numeric string, or ISO 8601) as RFC 3339; None if invalid."""
    if value is None:
        return now_iso
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value if _check_time(value) is None else None
    if isinstance(value, (int, float)):
        try:
            return utc_iso(datetime.fromtimestamp(value, UTC))
        except (OverflowError, OSError, ValueError):
            return None
    return None


def lago_to_cloudevent(raw: Any, *, now_iso: str) -> dict[str, Any] | str:
    """Map one Lago event onto the CloudEvents contract (validated afterwards like any CloudEvent)."""
    if not isinstance(raw, dict):
        return "event must be a JSON object"
    transaction_id = raw.get("transaction_id")
    if not isinstance(transaction_id, str) or not transaction_id:
        return "transaction_id: required, a non-empty string"
    code = raw.get("code")
    if not isinstance(code, str) or not code:
        return "code: required, a non-empty string"
    customer = raw.get("external_customer_id")
    subscription = raw.get("external_subscription_id")
    subject = customer or subscription
    if not isinstance(subject, str) or not subject:
        return "external_subscription_id or external_customer_id: one is required (a non-empty string)"
    properties = raw.get("properties")
    if properties is not None and not isinstance(properties, dict):
        return "properties: must be a JSON object"
    time = lago_time(raw.get("timestamp"), now_iso=now_iso)
    if time is None:
        return "timestamp: Unix seconds or an ISO 8601 date-time with offset"
    event: dict[str, Any] = {"specversion": "1.0", "id": transaction_id, "source": LAGO_SOURCE, "type": code,
                             "subject": subject, "time": time, "data": properties or {}}
    if isinstance(customer, str) and customer:
        event["externalcustomerid"] = customer
    if isinstance(subscription, str) and subscription:
        event["externalsubscriptionid"] = subscription
    amount = raw.get("precise_total_amount_cents")
    if amount is not None:
        event["precisetotalamountcents"] = str(amount)
    return event


def check_lago_events(items: list[Any], *, project_id: str, now_iso: str, limits: Limits
                      ) -> tuple[list[Accepted], list[Rejected]]:
    mapped: list[Any] = []
    early: dict[int, str] = {}
    for index, raw in enumerate(items):
        result = lago_to_cloudevent(raw, now_iso=now_iso)
        if isinstance(result, str):
            early[index] = result
            mapped.append(None)
        else:
            mapped.append(result)
    accepted, rejected = check_cloudevents(mapped, project_id=project_id, now_iso=now_iso, limits=limits)
    # re-attach Lago reasons and raw bodies to the indexes rejected before mapping
    fixed = [Rejected(r.index, _raw_id(items[r.index]), early.get(r.index, r.reason), items[r.index])
             for r in rejected]
    return accepted, fixed


def lago_response_event(event: dict[str, Any], *, created_at_iso: str) -> dict[str, Any]:
    """The event as Lago's API answers it (lago_id is deterministic: the same event always has the same id)."""
    import uuid

    return {
        "lago_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"meterline:{event['project']}:{event['source']}:{event['id']}")),
        "transaction_id": event["id"],
        "lago_customer_id": None,
        "external_customer_id": event.get("externalcustomerid"),
        "code": event["type"],
        "timestamp": event["time"],
        "lago_subscription_id": None,
        "external_subscription_id": event.get("externalsubscriptionid"),
        "precise_total_amount_cents": event.get("precisetotalamountcents"),
        "properties": event.get("data") or {},
        "created_at": created_at_iso,
    }
