"""The project's audit log (admin): newest first, filtered, cursor-paginated."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import text

from api.deps import ConnectionDep
from api.pagination import LIMIT_DEFAULT, LIMIT_MAX
from api.tenancy.audit import list_audit
from api.tenancy.auth import ProjectAccess, require_project

#: target kinds whose target_id is a user id
_USER_TARGETS = ("member", "user")
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
    actor_email: str | None = Field(default=None, description="the acting user's email (None: a key or the system)")
    target_email: str | None = Field(default=None, description="member and user targets: that user's email")


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
    actor_email: Annotated[str | None, Query(max_length=320, description="the acting user, by email")] = None,
    since: Annotated[datetime | None, Query(description="inclusive, ISO 8601 with offset")] = None,
    until: Annotated[datetime | None, Query(description="exclusive")] = None,
) -> AuditPage:
    if actor_email is not None:
        found = conn.execute(text("SELECT id FROM users WHERE email = lower(:e)"), {"e": actor_email.strip()}).scalar()
        if found is None:
            return AuditPage(items=[], next_cursor=None)
        if actor_user_id is not None and actor_user_id != found:
            return AuditPage(items=[], next_cursor=None)
        actor_user_id = str(found)
    entries, next_cursor = list_audit(conn, project_id=access.project_id, cursor=cursor, limit=limit,
                                      action=action, target_kind=target_kind, target_id=target_id,
                                      actor_user_id=actor_user_id, actor_key_id=actor_key_id,
                                      since=since, until=until)
    user_ids = {e.actor_user_id for e in entries if e.actor_user_id}
    user_ids |= {e.target_id for e in entries if e.target_kind in _USER_TARGETS and e.target_id}
    emails: dict[str, str] = {}
    if user_ids:
        emails = {str(i): str(e) for i, e in conn.execute(text("SELECT id, email FROM users WHERE id = ANY(:ids)"),
                                                          {"ids": sorted(user_ids)}).all()}
    fields = [k for k in AuditEntryOut.model_fields if k not in ("actor_email", "target_email")]
    return AuditPage(items=[AuditEntryOut(**{k: getattr(e, k) for k in fields},
                                          actor_email=emails.get(e.actor_user_id or ""),
                                          target_email=emails.get(e.target_id or "")
                                          if e.target_kind in _USER_TARGETS else None)
                            for e in entries], next_cursor=next_cursor)
