"""The request-level ingestion flow: parse → validate → pack → produce and await acks → log.

Body shapes on POST /api/v1/events (``classify``):

=====================================  ===========================  =========================
Content-Type                           body                         treated as
=====================================  ===========================  =========================
application/cloudevents+json           object                       one CloudEvent
application/cloudevents-batch+json     array                        CloudEvents batch
application/json                       array                        CloudEvents batch
application/json                       object with ``event``        one Lago event
application/json                       any other object             one CloudEvent
(none or application/json) + ce-* hdrs  data object                  one CloudEvent (binary mode)
=====================================  ===========================  =========================

POST /api/v1/events/batch takes Lago's ``{"events": [...]}``.

Outcomes (documented in api/ingest/README.md and tested):
- everything valid → OpenMeter shape 204 / Lago shape 200 with Lago's body, after the broker acked;
- some events invalid → the valid ones ARE produced (acked first), then 400 (CloudEvents) / 422 (Lago)
  problem+json ``ingest.events_rejected`` with ``accepted`` (count), ``rejected`` (index, id, reason) and
  Lago's ``error_details`` keyed by index. A 4xx (not a 2xx "multi-status") because a client that only checks
  for success must notice the rejected events; resending the whole batch is harmless (dedupe by id);
- broker did not ack in time / queue full → 503 + Retry-After and nothing is acknowledged.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from api.errors import ApiError
from api.ingest.log import IngestLog
from api.ingest.packing import pack
from api.ingest.producer import KafkaEdge, Overloaded
from api.ingest.settings import IngestSettings
from api.ingest.validate import Accepted, Limits, Rejected, check_cloudevents, check_lago_events, utc_iso
from api.metrics import INGEST_ACCEPTED, INGEST_REJECTED
from api.validation import JSON_DEPTH_MAX, InputRefused, check_json_body

Shape = Literal["cloudevents", "lago"]


class MalformedJson(ApiError):
    status = 400
    code = "ingest.malformed_json"


class InvalidBody(ApiError):
    status = 400
    code = "ingest.invalid_body"


class UnsupportedMediaType(ApiError):
    status = 415
    code = "ingest.unsupported_media_type"


class BatchTooLarge(ApiError):
    status = 413
    code = "ingest.batch_too_large"


class BodyTooLarge(ApiError):
    status = 413
    code = "ingest.body_too_large"


class EventsRejected(ApiError):
    status = 400
    code = "ingest.events_rejected"


CLOUDEVENTS = "application/cloudevents+json"
CLOUDEVENTS_BATCH = "application/cloudevents-batch+json"
JSON = "application/json"


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_json(body: bytes) -> Any:
    if not body:
        raise InvalidBody("the request body is empty")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedJson(f"the request body is not valid JSON: {exc}") from None
    try:  # a batch and its events' envelopes take two levels above `data`
        check_json_body(body, value, depth_max=JSON_DEPTH_MAX + 2)
    except InputRefused as exc:
        raise InvalidBody(f"the request body is refused: {exc}") from None
    return value


def require_media_type(content_type: str | None, allowed: tuple[str, ...]) -> None:
    """415 before the body is even parsed."""
    kind = media_type(content_type)
    if kind not in allowed:
        raise UnsupportedMediaType(f"Content-Type {kind or '(none)'} is not supported; use {', '.join(allowed)}",
                                   extra={"supported": list(allowed)})


def classify(content_type: str | None, payload: Any) -> tuple[Shape, list[Any], bool]:
    """(shape, items, batch?) for POST /api/v1/events, or raise 400/415."""
    kind = media_type(content_type)
    if kind == CLOUDEVENTS:
        if not isinstance(payload, dict):
            raise InvalidBody(f"{CLOUDEVENTS} carries one event object; send arrays as {CLOUDEVENTS_BATCH}")
        return "cloudevents", [payload], False
    if kind == CLOUDEVENTS_BATCH:
        if not isinstance(payload, list):
            raise InvalidBody(f"{CLOUDEVENTS_BATCH} carries a JSON array of events")
        return "cloudevents", payload, True
    if kind == JSON:
        if isinstance(payload, list):
            return "cloudevents", payload, True
        if isinstance(payload, dict):
            if "event" in payload and "id" not in payload and "specversion" not in payload:
                return "lago", [payload["event"]], False
            return "cloudevents", [payload], False
        raise InvalidBody("the body must be an event object, an array of events or {\"event\": {...}}")
    raise UnsupportedMediaType(
        f"Content-Type {kind or '(none)'} is not supported; use {CLOUDEVENTS}, {CLOUDEVENTS_BATCH} or {JSON}",
        extra={"supported": [CLOUDEVENTS, CLOUDEVENTS_BATCH, JSON]})


def binary_event(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """A CloudEvent in HTTP binary content mode: attributes in ``ce-*`` headers (percent-encoded), data in the
    body (a JSON object; the Content-Type header is the event's datacontenttype)."""
    from urllib.parse import unquote

    event: dict[str, Any] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered.startswith("ce-") and len(lowered) > 3:
            event[lowered[3:]] = unquote(value)
    kind = media_type(headers.get("content-type"))
    if kind and kind != JSON:
        raise UnsupportedMediaType(f"binary-mode CloudEvents carry JSON data; Content-Type {kind} is not supported",
                                   extra={"supported": [JSON]})
    if kind:
        event["datacontenttype"] = JSON
    if body:
        event["data"] = parse_json(body)
    return event


def lago_batch_items(content_type: str | None, payload: Any) -> list[Any]:
    require_media_type(content_type, (JSON,))
    if not isinstance(payload, dict) or not isinstance(payload.get("events"), list):
        raise InvalidBody("the body must be {\"events\": [ ...Lago events... ]}")
    return list(payload["events"])


@dataclass(frozen=True)
class Outcome:
    accepted: list[Accepted]
    rejected: list[Rejected]
    ingested_at_iso: str


class IngestService:
    def __init__(self, *, edge: KafkaEdge, log: IngestLog, settings: IngestSettings) -> None:
        self.edge = edge
        self.log = log
        self.settings = settings
        self.limits = Limits(field_chars_max=settings.field_chars_max, event_bytes_max=settings.event_bytes_max)

    async def ingest(self, *, project_id: str, shape: Shape, items: list[Any]) -> Outcome:
        """Validate, produce the valid events and wait for the broker; raises on broker trouble (nothing acked)."""
        if not items:
            raise InvalidBody("the batch is empty")
        if len(items) > self.settings.batch_events_max:
            raise BatchTooLarge(f"{len(items)} events in one request; at most {self.settings.batch_events_max}",
                                extra={"batch_events_max": self.settings.batch_events_max})
        now_iso = utc_iso(datetime.now(UTC))
        check = check_cloudevents if shape == "cloudevents" else check_lago_events
        accepted, rejected = check(items, project_id=project_id, now_iso=now_iso, limits=self.limits)
        for refused in rejected:
            INGEST_REJECTED.labels(refused.reason).inc()
        if accepted:
            messages = pack(accepted, partitions=self.edge.partitions,
                            message_bytes_max=self.settings.message_bytes_max)
            try:
                await self.edge.send(messages)
            except ApiError as error:  # 503: none of them counts as accepted (the client resends them)
                INGEST_REJECTED.labels("overloaded" if isinstance(error, Overloaded) else "unavailable").inc(
                    len(accepted))
                raise
            INGEST_ACCEPTED.inc(len(accepted))
        self.log.record(project_id, accepted, rejected, now_iso)
        return Outcome(accepted, rejected, now_iso)


def rejection(outcome: Outcome, *, shape: Shape) -> EventsRejected:
    """The 4xx for a request in which some (or all) events were rejected; the others were accepted."""
    rejected = [{"index": r.index, "id": r.id, "reason": r.reason} for r in outcome.rejected]
    n_ok, n_bad = len(outcome.accepted), len(outcome.rejected)
    detail = (f"{n_bad} of {n_ok + n_bad} events were rejected (listed by index); "
              f"the other {n_ok} were accepted. Fix and resend the rejected ones (resending is harmless).")
    extra: dict[str, Any] = {
        "accepted": n_ok,
        "rejected_count": n_bad,
        "rejected": rejected,
        # Lago clients read error_details keyed by the index in the batch
        "error": "Unprocessable Entity" if shape == "lago" else "Bad Request",
        "error_details": {str(r.index): {"reason": r.reason} for r in outcome.rejected},
    }
    return EventsRejected(detail, extra=extra, status=422 if shape == "lago" else 400)
