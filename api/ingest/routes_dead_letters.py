"""Dead letters of a project: list them by reason, redrive a selection into usage.events.v1 (api/ingest/redrive.py).

The list reads usage.events.dlq.v1 itself (the source of truth, whatever reached ClickHouse); a dead letter
belongs to the project its refused event names."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from api.deps import ConnectionDep
from api.errors import ApiError
from api.ingest.redrive import read_letters, redrive, redriven_letters
from api.tenancy.audit import audit
from api.tenancy.auth import ProjectAccess, require_project
from ledger.kafka import require_topics, topic_name
from streams.contracts import TOPIC_USAGE_DLQ, TOPIC_USAGE_EVENTS
from streams.redrive import RedriveSelection, by_reason, select

router = APIRouter(prefix="/api/v1/projects/{project_id}/dead-letters", tags=["dead letters"])


class DeadLetterOut(BaseModel):
    id: str = Field(description="source partition:offset:index in usage.events.v1")
    reason: str
    detail: str
    dead_lettered_at: datetime
    event_source: str | None
    event_id: str | None
    event: dict[str, Any] | None
    redrive_id: str | None = Field(description="the redrive that sent this event again, if any")


class DeadLettersOut(BaseModel):
    by_reason: dict[str, int]
    items: list[DeadLetterOut]


class RedriveIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"reasons": ["unknown_meter"], "since": "2026-12-03T00:00:00Z"}, {"ids": ["2:1041:-"]}]})
    reasons: list[str] | None = Field(default=None, max_length=50)
    ids: list[str] | None = Field(default=None, max_length=10_000)
    since: datetime | None = None
    until: datetime | None = None


class RedriveOut(BaseModel):
    redrive_id: str
    selected: int
    redriven: list[str]
    already_redriven: list[str]
    not_redrivable: list[str]


def _letters(request: Request, project_id: str, selection: RedriveSelection) -> list[Any]:
    settings = request.app.state.settings
    topic = topic_name(TOPIC_USAGE_DLQ, settings.topic_prefix)
    return select(read_letters(settings.kafka_bootstrap_servers, topic), selection)


@router.get("", response_model=DeadLettersOut, summary="Dead letters of the project, by reason")
def list_dead_letters(
    request: Request, access: Annotated[ProjectAccess, require_project("read")], conn: ConnectionDep,
    reason: Annotated[list[str] | None, Query(description="only these reasons (repeatable)")] = None,
    since: Annotated[datetime | None, Query(description="dead-lettered at or after (ISO 8601)")] = None,
    until: Annotated[datetime | None, Query(description="dead-lettered before")] = None,
    limit: Annotated[int, Query(ge=1, le=1_000)] = 100,
) -> DeadLettersOut:
    letters = _letters(request, access.project_id, RedriveSelection(
        access.project_id, frozenset(reason) if reason else None, None, since, until))
    redriven = redriven_letters(conn, access.project_id)
    newest = sorted(letters, key=lambda letter: letter.dead_lettered_at, reverse=True)[:limit]
    return DeadLettersOut(by_reason=by_reason(letters), items=[
        DeadLetterOut(**{k: v for k, v in letter.to_json().items() if k != "project_id"},
                      redrive_id=redriven.get((letter.id, *letter.identity)) if letter.identity else None)
        for letter in newest])


@router.post("/redrive", response_model=RedriveOut, summary="Send selected dead letters through the pipeline again")
def redrive_dead_letters(request: Request, body: RedriveIn,
                         access: Annotated[ProjectAccess, require_project("admin")]) -> RedriveOut:
    """Fix the cause first (e.g. create the missing meter), then redrive: each dead letter is sent again at most
    once (a second redrive lists it under ``already_redriven``), and keeps its identity, so it is charged once."""
    if not (body.reasons or body.ids or body.since or body.until):
        raise ApiError("select dead letters by reasons, ids or a time range", status=422)
    selection = RedriveSelection(access.project_id, frozenset(body.reasons) if body.reasons else None,
                                 frozenset(body.ids) if body.ids else None, body.since, body.until)
    letters = _letters(request, access.project_id, selection)
    settings = request.app.state.settings
    usage_topic = topic_name(TOPIC_USAGE_EVENTS, settings.topic_prefix)
    partitions = require_topics(settings.kafka_bootstrap_servers, [usage_topic])[usage_topic]

    def audited(conn: Any, result: Any) -> None:
        audit(conn, access, action="dead_letters.redrive", target_kind="redrive", target_id=result.redrive_id,
              after={"selected": result.selected, "redriven": len(result.redriven),
                     "already_redriven": len(result.already_redriven), "selection": body.model_dump(mode="json")})

    result = redrive(request.app.state.engine, bootstrap=settings.kafka_bootstrap_servers, usage_topic=usage_topic,
                     partitions=partitions, project_id=access.project_id, letters=letters,
                     actor=access.principal.user_id or access.principal.key_id, audit=audited)
    return RedriveOut(**result.to_json())
