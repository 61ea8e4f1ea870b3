"""The project's outgoing email (admin): list the outbox (never the bodies: they may hold a live accept link) and
retry a failed row. Logic: api/tenancy/email_outbox.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel

from api.deps import ConnectionDep
from api.errors import Conflict, NotFound
from api.pagination import LIMIT_DEFAULT, LIMIT_MAX
from api.tenancy.audit import audit
from api.tenancy.auth import ProjectAccess, require_project
from api.tenancy.email_outbox import NotRetryable, list_emails, retry_failed

router = APIRouter(prefix="/api/v1/projects/{project_id}/emails", tags=["email"])
Admin = Annotated[ProjectAccess, require_project("admin")]


class EmailOut(BaseModel):
    id: int
    to_address: str
    subject: str
    kind: str
    invitation_id: str | None
    created_at: datetime
    sent_at: datetime | None
    failed_at: datetime | None
    attempts: int
    next_attempt_at: datetime
    last_error: str | None


@router.get("", response_model=list[EmailOut], summary="The project's outgoing email, newest first (admin)")
def emails(access: Admin, conn: ConnectionDep, state: Literal["queued", "sent", "failed"] | None = None,
           limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = LIMIT_DEFAULT) -> list[EmailOut]:
    return [EmailOut(**r) for r in list_emails(conn, project_id=access.project_id, state=state, limit=limit)]


@router.post("/{outbox_id}/retry", response_model=EmailOut,
             summary="Send a failed email again: due now, attempts reset (admin)")
def retry(outbox_id: int, access: Admin, conn: ConnectionDep) -> EmailOut:
    try:
        row = retry_failed(conn, project_id=access.project_id, outbox_id=outbox_id, now=datetime.now(UTC))
    except NotRetryable as refused:
        raise Conflict(str(refused)) from refused
    if row is None:
        raise NotFound("no failed email with this id in this project")
    audit(conn, access, action="email.retry", target_kind="email", target_id=str(outbox_id),
          after={"kind": row["kind"], "invitation_id": row["invitation_id"]})
    return EmailOut(**row)
