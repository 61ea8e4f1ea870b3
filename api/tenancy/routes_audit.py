"""The project's audit log (admin): newest first, filtered, cursor-paginated."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from api.deps import ConnectionDep
from api.pagination import LIMIT_DEFAULT, LIMIT_MAX
from api.tenancy.audit import list_audit
from api.tenancy.auth import ProjectAccess, require_project

router = APIRouter(prefix="/api/v1/projects/{project_id}/audit-log", tags=["audit"])


class AuditEntryOut(BaseModel):
    id: int
    actor_kind: str
    actor_user_id: str | None
    actor_key_id: str | None
    action: str
    target_kind: str
    target_id: str | None
    before: Any
    after: Any
    request_id: str | None
    created_at: datetime


class AuditPage(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "items": [{"id": 42, "actor_kind": "user", "actor_user_id": "usr_0a1b2c", "actor_key_id": None,
                   "action": "member.role_change", "target_kind": "member", "target_id": "usr_9f8e7d",
                   "before": {"role": "member"}, "after": {"role": "viewer"}, "request_id": "4f1c...",
                   "created_at": "2026-01-01T00:00:00Z"}],
        "next_cursor": "eyJpZCI6NDJ9"}]})
    items: list[AuditEntryOut]
    next_cursor: str | None


@router.get("", response_model=AuditPage, summary="Who changed what, when (admin)")
def audit_log(
    access: Annotated[ProjectAccess, require_project("admin")], conn: ConnectionDep,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = LIMIT_DEFAULT,
    action: Annotated[str | None, Query(description="exact action, or a prefix ending in * (member.*)")] = None,
    target_kind: str | None = None, target_id: str | None = None,
    actor_user_id: str | None = None, actor_key_id: str | None = None,
    since: Annotated[datetime | None, Query(description="inclusive, ISO 8601 with offset")] = None,
    until: Annotated[datetime | None, Query(description="exclusive")] = None,
) -> AuditPage:
    entries, next_cursor = list_audit(conn, project_id=access.project_id, cursor=cursor, limit=limit,
                                      action=action, target_kind=target_kind, target_id=target_id,
                                      actor_user_id=actor_user_id, actor_key_id=actor_key_id,
                                      since=since, until=until)
    return AuditPage(items=[AuditEntryOut(**{k: getattr(e, k) for k in AuditEntryOut.model_fields})
                            for e in entries], next_cursor=next_cursor)
