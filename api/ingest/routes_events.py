"""Ingestion routes, OpenMeter- and Lago-compatible (see api/ingest/service.py for shapes and outcomes).

- POST /api/v1/events        CloudEvents (single, batch, JSON) → 204; Lago ``{"event": ...}`` → 200
- POST /api/v1/events/batch  Lago ``{"events": [...]}`` → 200
- GET  /api/v1/events        recently ingested events (OpenMeter's filters), newest first

``?backfill_session_id=bf_…`` on either POST holds the events in that open backfill session of the project
instead of producing them to usage.events.v1 (api/ingest/backfills.py): same validation, same responses, no
broker needed; they are charged only when the session is closed.

The project is the API key's (scope ingest/admin; read/admin for GET), or ``?project_id=`` with a user
token. Authentication uses a SHORT-lived database connection (``_access``) instead of the request-scoped
``ConnectionDep``: an ingest request then waits for the broker without holding a pooled connection, so a
slow broker cannot exhaust the pool that balances and debits need.

The Kafka edge starts in the background at application start-up (a missing topic is logged loudly and
answered 503 ``kafka.missing_topics`` until it exists), so the API never blocks on a broker at boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response

from api.deps import EngineDep, SettingsDep
from api.errors import ApiError, NotFound
from api.ingest import backfills
from api.ingest.log import IngestLog, LogQuery, list_ingested
from api.ingest.producer import KafkaEdge
from api.ingest.service import (
    CLOUDEVENTS,
    CLOUDEVENTS_BATCH,
    JSON,
    BatchTooLarge,
    BodyTooLarge,
    IngestService,
    InvalidBody,
    Outcome,
    Shape,
    binary_event,
    classify,
    lago_batch_items,
    media_type,
    parse_json,
    rejection,
    require_media_type,
)
from api.ingest.settings import IngestSettings
from api.ingest.settings import get_settings as get_ingest_settings
from api.ingest.validate import (
    Accepted,
    Limits,
    check_cloudevents,
    check_lago_events,
    lago_response_event,
    utc_iso,
)
from api.settings import ApiSettings
from api.tenancy.auth import ProjectAccess, get_principal, project_access
from api.tenancy.keys import TOKEN_PREFIX, KeyCache, key_expiry
from api.tenancy.principal import Principal
from ledger.kafka import MissingTopicsError, require_topics, topic_name
from streams.contracts import TOPIC_USAGE_EVENTS

log = logging.getLogger("meterline.api.ingest")
router = APIRouter(tags=["events"])

_RETRY_INIT_S = 2.0
STRUCTURED = (CLOUDEVENTS, CLOUDEVENTS_BATCH)


class IngestionUnavailable(ApiError):
    status = 503
    code = "kafka.missing_topics"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, extra={"retry_after_s": 5})
        self.headers = {"Retry-After": "5"}


# --------------------------------------------------------------------------- lifecycle


class _Ingestion:
    """The per-app ingestion resources, built lazily so a broker problem never blocks start-up."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        api_settings: ApiSettings = app.state.settings
        self.settings: IngestSettings = getattr(app.state, "ingest_settings", None) or get_ingest_settings()
        self.bootstrap = api_settings.kafka_bootstrap_servers
        self.topic = topic_name(TOPIC_USAGE_EVENTS, api_settings.topic_prefix)
        self.log = IngestLog(app.state.engine, mode=self.settings.log_mode,
                             queue_rows_max=self.settings.log_queue_rows_max,
                             retention_hours=self.settings.log_retention_hours, rows_max=self.settings.log_rows_max,
                             prune_interval_s=self.settings.log_prune_interval_s)
        self.service: IngestService | None = None
        self.error: str | None = None
        self._failed_at = 0.0
        self._lock = asyncio.Lock()

    def _build(self) -> IngestService:
        partitions = require_topics(self.bootstrap, [self.topic], timeout_s=5.0)[self.topic]
        s = self.settings
        edge = KafkaEdge(bootstrap=self.bootstrap, topic=self.topic, partitions=partitions,
                         ack_timeout_s=s.ack_timeout_s, broker_retry_after_s=s.broker_retry_after_s,
                         overload_retry_after_s=s.overload_retry_after_s, queue_messages_max=s.queue_messages_max,
                         linger_ms=s.linger_ms, message_bytes_max=s.message_bytes_max)
        edge.start()
        return IngestService(edge=edge, log=self.log, settings=s)

    async def get(self) -> IngestService:
        if self.service is not None:
            return self.service
        async with self._lock:
            if self.service is None:
                if self.error and time.monotonic() - self._failed_at < _RETRY_INIT_S:
                    raise IngestionUnavailable(self.error)
                try:
                    self.service = await asyncio.to_thread(self._build)
                    self.error = None
                except MissingTopicsError as exc:
                    self._fail(str(exc))
                except Exception as exc:  # broker unreachable at metadata time
                    self._fail(f"cannot reach the Kafka broker at {self.bootstrap}: {exc}")
            assert self.service is not None
            return self.service

    def _fail(self, message: str) -> None:
        self.error, self._failed_at = message, time.monotonic()
        log.error("ingestion unavailable: %s", message)
        raise IngestionUnavailable(message)

    def close(self) -> None:
        if self.service is not None:
            self.service.edge.close(flush_timeout_s=10.0)
        self.log.close()


async def startup(app: FastAPI) -> None:
    ingestion = _Ingestion(app)
    app.state.key_cache = KeyCache(ttl_s=ingestion.settings.auth_cache_s)
    app.state.ingestion = ingestion
    ingestion.log.start()

    async def warm_up() -> None:  # connect in the background; a failure is logged and retried per request
        with contextlib.suppress(IngestionUnavailable):
            await ingestion.get()

    app.state.ingestion_warm_up = asyncio.get_running_loop().create_task(warm_up())


async def shutdown(app: FastAPI) -> None:
    ingestion: _Ingestion | None = getattr(app.state, "ingestion", None)
    if ingestion is not None:
        task = getattr(app.state, "ingestion_warm_up", None)
        if task is not None and not task.done():
            task.cancel()
        await asyncio.to_thread(ingestion.close)


# --------------------------------------------------------------------------- dependencies


def _access(action: str) -> Any:
    """Authenticate and authorize for ``action`` on the key's project (or ``?project_id=`` for a user token).

    Hot path for API keys: a key authenticated within the last ``auth_cache_s`` seconds is taken from the
    per-app ``KeyCache`` without leaving the event loop; otherwise the full check (``get_principal``) runs in
    a worker thread on a short-lived connection."""

    async def dependency(request: Request,
                         project_id: Annotated[str | None, Query(description="the project (user tokens only; an "
                                                                             "API key implies its project)")] = None,
                         ) -> ProjectAccess:
        rid = getattr(request.state, "request_id", None)
        cache: KeyCache = request.app.state.key_cache
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        principal = cache.get(token, now_monotonic=time.monotonic()) \
            if scheme.lower() == "bearer" and token.startswith(TOKEN_PREFIX) else None
        if principal is not None:
            request.app.state.rate_limiter.check(principal.rate_key)
        else:
            principal = await asyncio.to_thread(_authenticate, request, token)
        if principal.kind == "api_key":
            assert principal.project_id is not None
            if project_id is not None and project_id != principal.project_id:
                raise NotFound("project not found")
            return project_access(None, principal, principal.project_id, action, rid)  # type: ignore[arg-type]
        if project_id is None:
            raise ApiError("a user token must name the project: ?project_id=...", status=422)
        return await asyncio.to_thread(_user_access, request, principal, project_id, action, rid)

    dependency.__name__ = f"events_access_{action}"
    return Depends(dependency)


def _user_access(request: Request, principal: Principal, project_id: str, action: str,
                 rid: str | None) -> ProjectAccess:
    with request.app.state.engine.connect() as conn:
        return project_access(conn, principal, project_id, action, rid)


def _authenticate(request: Request, token: str) -> Principal:
    """The full check on a short connection (released before the request waits for the broker)."""
    engine = request.app.state.engine
    with engine.begin() as conn:
        principal = get_principal(request, conn, request.app.state.settings)
        if principal.kind == "api_key" and principal.key_id is not None:
            request.app.state.key_cache.put(token, principal, expires_at=key_expiry(conn, principal.key_id),
                                            now_monotonic=time.monotonic())
    return principal


IngestAccess = Annotated[ProjectAccess, _access("ingest")]
ReadAccess = Annotated[ProjectAccess, _access("read")]


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the request body is larger than {limit} bytes", extra={"body_bytes_max": limit})
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the request body is larger than {limit} bytes", extra={"body_bytes_max": limit})
        chunks.append(chunk)
    return b"".join(chunks)


def _json(body: Any, status: int) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


_INGEST_DOC: dict[str, Any] = {
    "requestBody": {"required": True, "content": {
        "application/cloudevents+json": {"schema": {"type": "object"}},
        "application/cloudevents-batch+json": {"schema": {"type": "array", "items": {"type": "object"}}},
        "application/json": {"schema": {"oneOf": [{"type": "object"}, {"type": "array"}]}},
    }},
}


# --------------------------------------------------------------------------- backfill sessions

BackfillParam = Annotated[str | None, Query(alias=backfills.SESSION_PARAM, min_length=1, max_length=64, description=(
    "hold the events in this open backfill session of the project instead of charging them live "
    "(POST /api/v1/projects/{project_id}/backfills opens one)"))]


async def _hold(request: Request, ingestion: _Ingestion, project_id: str, session_id: str, shape: Shape,
                items: list[Any]) -> Outcome:
    """Validate exactly as live ingestion does, then hold the valid events in the session (no broker)."""
    s = ingestion.settings
    if not items:
        raise InvalidBody("the batch is empty")
    if len(items) > s.batch_events_max:
        raise BatchTooLarge(f"{len(items)} events in one request; at most {s.batch_events_max}",
                            extra={"batch_events_max": s.batch_events_max})
    now_iso = utc_iso(datetime.now(UTC))
    check = check_cloudevents if shape == "cloudevents" else check_lago_events
    accepted, rejected = check(items, project_id=project_id, now_iso=now_iso,
                               limits=Limits(field_chars_max=s.field_chars_max, event_bytes_max=s.event_bytes_max))
    if accepted:
        await asyncio.to_thread(_hold_sync, request.app.state.engine, project_id, session_id, accepted)
    else:  # nothing to hold: still a clear 404/409 for a wrong session rather than a bare rejection
        await asyncio.to_thread(_check_session, request.app.state.engine, project_id, session_id)
    return Outcome(accepted, rejected, now_iso)


def _hold_sync(engine: Any, project_id: str, session_id: str, accepted: list[Accepted]) -> None:
    backfills.hold_events(engine, project_id=project_id, session_id=session_id, accepted=accepted)


def _check_session(engine: Any, project_id: str, session_id: str) -> None:
    with engine.connect() as conn:
        session = backfills.get_session(conn, project_id=project_id, session_id=session_id)
    if session.status != "open":
        raise backfills.BackfillNotOpen(f"backfill session {session_id} is {session.status}: cannot ingest into it",
                                        extra={"session_id": session_id, "session_status": session.status})


# --------------------------------------------------------------------------- routes


@router.post("/api/v1/events", status_code=204, openapi_extra=_INGEST_DOC, summary="Ingest events",
             responses={200: {"description": "Lago-shaped event accepted"},
                        204: {"description": "CloudEvents accepted (the broker acknowledged them)"},
                        400: {"description": "malformed body, or some events rejected (the rest accepted)"},
                        413: {"description": "body or batch too large"}, 415: {"description": "content type"},
                        503: {"description": "broker unavailable / overloaded; Retry-After"}})
async def ingest_events(request: Request, access: IngestAccess, settings: SettingsDep,
                        backfill_session_id: BackfillParam = None) -> Response:
    ingestion: _Ingestion = request.app.state.ingestion
    headers = request.headers
    binary = "ce-specversion" in headers and media_type(headers.get("content-type")) not in STRUCTURED
    if not binary:
        require_media_type(headers.get("content-type"), (*STRUCTURED, JSON))
    body = await _body(request, settings.request_body_bytes_max)
    shape: Shape
    if binary:
        shape, items = "cloudevents", [binary_event(dict(headers), body)]
    else:
        shape, items, _batch = classify(headers.get("content-type"), parse_json(body))
    if backfill_session_id is not None:
        outcome = await _hold(request, ingestion, access.project_id, backfill_session_id, shape, items)
    else:
        outcome = await (await ingestion.get()).ingest(project_id=access.project_id, shape=shape, items=items)
    if outcome.rejected:
        raise rejection(outcome, shape=shape)
    if shape == "lago":
        return _json({"event": lago_response_event(outcome.accepted[0].event, created_at_iso=outcome.ingested_at_iso)},
                     200)
    return Response(status_code=204)


@router.post("/api/v1/events/batch", summary="Ingest a batch of Lago events",
             responses={200: {"description": "every event accepted (Lago's body)"},
                        422: {"description": "some events rejected (the rest accepted)"}})
async def ingest_lago_batch(request: Request, access: IngestAccess, settings: SettingsDep,
                            backfill_session_id: BackfillParam = None) -> Response:
    ingestion: _Ingestion = request.app.state.ingestion
    require_media_type(request.headers.get("content-type"), (JSON,))
    body = await _body(request, settings.request_body_bytes_max)
    items = lago_batch_items(request.headers.get("content-type"), parse_json(body))
    if backfill_session_id is not None:
        outcome = await _hold(request, ingestion, access.project_id, backfill_session_id, "lago", items)
    else:
        outcome = await (await ingestion.get()).ingest(project_id=access.project_id, shape="lago", items=items)
    if outcome.rejected:
        raise rejection(outcome, shape="lago")
    return _json({"events": [lago_response_event(a.event, created_at_iso=outcome.ingested_at_iso)
                             for a in outcome.accepted]}, 200)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@router.get("/api/v1/events", summary="List ingested events")
def list_events(
    request: Request, access: ReadAccess, engine: EngineDep,
    ingested_at_from: Annotated[datetime | None, Query(alias="ingestedAtFrom")] = None,
    ingested_at_to: Annotated[datetime | None, Query(alias="ingestedAtTo")] = None,
    event_id: Annotated[str | None, Query(alias="id", max_length=256)] = None,
    subject: Annotated[str | None, Query(max_length=256)] = None,
    time_from: Annotated[datetime | None, Query(alias="from")] = None,
    time_to: Annotated[datetime | None, Query(alias="to")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 100,
    client_id: Annotated[str | None, Query(alias="clientId", max_length=36)] = None,
) -> Response:
    """Newest first. Without ``ingestedAtFrom`` the window is the last 72 hours (OpenMeter's default)."""
    ingestion: _Ingestion = request.app.state.ingestion
    ingestion.log.wait_written(timeout_s=0.5)  # read-your-writes for a caller that just ingested (bounded)
    query = LogQuery(project_id=access.project_id,
                     ingested_from=_utc(ingested_at_from) or datetime.now(UTC) - timedelta(hours=72),
                     ingested_to=_utc(ingested_at_to), id_contains=event_id, subject_contains=subject,
                     time_from=_utc(time_from), time_to=_utc(time_to), limit=limit)
    with engine.connect() as conn:
        return _json(list_ingested(conn, query), 200)
