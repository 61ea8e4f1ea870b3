"""Pure conversion of Kafka message values into table rows (no I/O; the sink does the Kafka/ClickHouse edges).

Every row carries its Kafka identity ``(topic, partition, offset, index)`` — ``index`` is the event's position
inside a packed message (a usage message is ONE CloudEvent object or a JSON ARRAY of them). That identity
is what makes redelivery exact (analytics/sink.py).

Units are Decimal, never float: a JSON number that arrives as a float is converted through ``repr`` (the
shortest string that round-trips, i.e. the literal the producer wrote for up to 15 significant digits).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from pydantic import ValidationError

from ledger.contracts import TransactionPosted
from streams.contracts import DLQ_HEADER_PROJECT, DLQ_HEADER_REASON, UsageEvent, dead_letter_project

UNITS_SCALE = Decimal("0.000000001")  # Decimal(38, 9) in ClickHouse
UNITS_ABS_MAX = Decimal(10) ** 28

USAGE_COLUMNS = ("project_id", "event_type", "subject", "wallet_id", "time", "units", "event_id", "source",
                 "data", "ingested_at", "kafka_topic", "kafka_partition", "kafka_offset", "kafka_index")
TRANSACTION_COLUMNS = ("transaction_id", "project_id", "wallet_id", "kind", "amount_minor",
                       "balance_before_minor", "balance_after_minor", "bucket_source", "source_ref", "meter_id",
                       "related_transaction_id", "reason", "idempotency_key", "debt_settled_minor", "created_at",
                       "ingested_at", "kafka_topic", "kafka_partition", "kafka_offset", "kafka_index")
DECISION_COLUMNS = ("decision_id", "project_id", "subject", "wallet_id", "asset_id", "action", "allowed",
                    "reason", "policy_id", "cost_minor", "time", "ingested_at", "kafka_topic", "kafka_partition",
                    "kafka_offset", "kafka_index")
DEAD_LETTER_COLUMNS = ("project_id", "received_at", "reason", "payload", "headers", "kafka_topic",
                       "kafka_partition", "kafka_offset", "kafka_index")

DEAD_LETTER_PAYLOAD_BYTES_MAX = 64 * 1024


@dataclass(frozen=True)
class Origin:
    """Where a message came from, plus when the sink saw it."""

    topic: str
    partition: int
    offset: int
    ingested_at: datetime
    timestamp: datetime | None = None  # the Kafka message timestamp, if any


#: a Kafka message's headers as confluent-kafka hands them over (pairs; a mapping is accepted too)
Headers = Sequence[tuple[str, str | bytes | None]] | Mapping[str, str | bytes | None]


@dataclass
class Parsed:
    rows: list[tuple[Any, ...]]
    rejected: int = 0
    identities: list[bytes] | None = None  # usage only: event identity hashes, aligned with rows


def _elements(value: bytes | None) -> list[Any]:
    if not value:
        return []
    doc = orjson.loads(value)
    return doc if isinstance(doc, list) else [doc]


def event_identity(project: str, source: str, event_id: str) -> bytes:
    """The dedupe identity streams uses for an event: (project, source, id)."""
    return hashlib.blake2b(f"{project}\x1f{source}\x1f{event_id}".encode(), digest_size=8).digest()


def to_units(raw: Any) -> Decimal | None:
    if isinstance(raw, bool) or raw is None:
        return None
    if isinstance(raw, float):
        raw = repr(raw)
    if isinstance(raw, int | str):
        try:
            value = Decimal(raw)
        except InvalidOperation:
            return None
        if not value.is_finite() or abs(value) >= UNITS_ABS_MAX:
            return None
        return value.quantize(UNITS_SCALE)
    return None


def event_units(data: dict[str, Any] | None, units_keys: Sequence[str]) -> Decimal:
    """The event's units: the first numeric value under one of ``units_keys`` in ``data``; else 1 (a count)."""
    if data:
        for key in units_keys:
            if key in data:
                value = to_units(data[key])
                if value is not None:
                    return value
    return Decimal(1).quantize(UNITS_SCALE)


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def usage_rows(value: bytes | None, origin: Origin, *, units_keys: Sequence[str]) -> Parsed:
    """Rows for one usage message. Invalid events are counted and skipped: streams sends them to the DLQ
    with a reason, and analytics mirrors what streams accepts."""
    try:
        elements = _elements(value)
    except orjson.JSONDecodeError:
        return Parsed([], rejected=1, identities=[])
    rows: list[tuple[Any, ...]] = []
    identities: list[bytes] = []
    rejected = 0
    for index, element in enumerate(elements):
        try:
            event = UsageEvent.model_validate(element)
        except ValidationError:
            rejected += 1
            continue
        extra = event.model_extra or {}
        wallet = extra.get("wallet_id") or extra.get("walletid") or extra.get("wallet") or ""
        moment = event.time or origin.timestamp or origin.ingested_at
        rows.append((event.project, event.type, event.subject, str(wallet), _utc(moment),
                     event_units(event.data, units_keys), event.id, event.source,
                     orjson.dumps(event.data or {}).decode(), origin.ingested_at, origin.topic, origin.partition,
                     origin.offset, index))
        identities.append(event_identity(event.project, event.source, event.id))
    return Parsed(rows, rejected, identities)


def transaction_rows(value: bytes | None, origin: Origin) -> Parsed:
    rows = []
    rejected = 0
    try:
        elements = _elements(value)
    except orjson.JSONDecodeError:
        return Parsed([], rejected=1)
    for index, element in enumerate(elements):
        try:
            tx = TransactionPosted.model_validate(element)
        except ValidationError:
            rejected += 1
            continue
        rows.append((tx.transaction_id, tx.project_id, tx.wallet_id, tx.kind.value, tx.amount_minor,
                     tx.balance_before_minor, tx.balance_after_minor, tx.bucket_source or "", tx.source_ref or "",
                     tx.meter_id or "", tx.related_transaction_id, tx.reason or "", tx.idempotency_key,
                     tx.debt_settled_minor, _utc(tx.created_at), origin.ingested_at, origin.topic,
                     origin.partition, origin.offset, index))
    return Parsed(rows, rejected)


def _parse_time(raw: Any, fallback: datetime) -> datetime:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        # epoch milliseconds (the shape the access-decision examples use)
        return datetime.fromtimestamp(raw / 1000, tz=UTC)
    if isinstance(raw, str):
        try:
            moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            return fallback
        return _utc(moment) if moment.tzinfo else fallback
    return fallback


def decision_rows(value: bytes | None, origin: Origin) -> Parsed:
    """Access decisions: {decision_id|id, project_id|project, subject, wallet_id?, asset_id?, action?,
    allowed, reason?, policy_id?, cost_minor?, time?}. Rows without an id, project or ``allowed`` are
    rejected."""
    rows = []
    rejected = 0
    try:
        elements = _elements(value)
    except orjson.JSONDecodeError:
        return Parsed([], rejected=1)
    for index, item in enumerate(elements):
        if not isinstance(item, dict):
            rejected += 1
            continue
        decision_id = item.get("decision_id") or item.get("id")
        project = item.get("project_id") or item.get("project")
        allowed = item.get("allowed")
        cost = item.get("cost_minor", 0)
        if not decision_id or not project or not isinstance(allowed, bool) or not isinstance(cost, int):
            rejected += 1
            continue
        rows.append((str(decision_id), str(project), str(item.get("subject") or ""),
                     str(item.get("wallet_id") or ""), str(item.get("asset_id") or ""),
                     str(item.get("action") or ""), int(allowed), str(item.get("reason") or ""),
                     str(item.get("policy_id") or ""), cost,
                     _parse_time(item.get("time") or item.get("timestamp"), origin.timestamp or origin.ingested_at),
                     origin.ingested_at, origin.topic, origin.partition, origin.offset, index))
    return Parsed(rows, rejected)


def _find(doc: Any, *keys: str) -> str:
    """The first string found under one of ``keys`` at the top level or inside a nested event object."""
    if not isinstance(doc, dict):
        return ""
    for key in keys:
        if isinstance(doc.get(key), str):
            return str(doc[key])
    for nested in ("event", "original", "value", "payload"):
        inner = doc.get(nested)
        if isinstance(inner, dict):
            found = _find(inner, *keys)
            if found:
                return found
    return ""


def _dead_letter_project(header_map: Mapping[str, str], doc: Any) -> str:
    """The project of a dead letter, from (in order) its ``project`` header, the envelope's ``project``, the
    decoded ``event`` (DeadLetter since the header exists), the ``original`` TEXT of an older worker's
    envelope (the refused JSON as a string, no header, no ``project``), or any other shape's nested object."""
    project = header_map.get(DLQ_HEADER_PROJECT) or header_map.get("project_id")
    if project:
        return project
    if isinstance(doc, dict):
        if isinstance(doc.get("project"), str) and doc["project"]:
            return str(doc["project"])
        found = dead_letter_project(doc.get("event"))
        if found:
            return found
        original = doc.get("original")
        if isinstance(original, str):
            try:
                found = dead_letter_project(orjson.loads(original))
            except orjson.JSONDecodeError:
                found = None
            if found:
                return found
    return _find(doc, "project", "project_id")


def dead_letter_rows(value: bytes | None, headers: Headers | None, origin: Origin) -> Parsed:
    """One row per dead-letter message, whatever its shape: the viewer must show even unparseable input."""
    items = headers.items() if isinstance(headers, Mapping) else (headers or [])
    header_map = {k: v.decode(errors="replace") if isinstance(v, bytes) else (v or "") for k, v in items}
    payload = (value or b"")[:DEAD_LETTER_PAYLOAD_BYTES_MAX].decode(errors="replace")
    try:
        doc: Any = orjson.loads(value) if value else None
    except orjson.JSONDecodeError:
        doc = None
    project = _dead_letter_project(header_map, doc)
    reason = (header_map.get(DLQ_HEADER_REASON) or header_map.get("error")
              or _find(doc, "reason", "error", "error_code") or "unknown")
    row = (project, origin.timestamp or origin.ingested_at, reason, payload,
           orjson.dumps(header_map).decode(), origin.topic, origin.partition, origin.offset, 0)
    return Parsed([row])
