"""Backfill sessions (api/ingest/backfills.py has the lifecycle and its invariants; api/README.md the contract).

- POST /api/v1/projects/{project_id}/backfills                  open a session (admin)
- GET  /api/v1/projects/{project_id}/backfills                  the project's sessions, newest first (read)
- GET  /api/v1/projects/{project_id}/backfills/{id}             one session (read)
- GET  /api/v1/projects/{project_id}/backfills/{id}/diff        dry-run: what close would post, per wallet, meter
                                                                and period (admin: it takes the ledger's row locks for
                                                                an instant; a closed session: what it posted)
- POST /api/v1/projects/{project_id}/backfills/{id}/close       post it, exactly once (admin; a retry returns the
                                                                same result and posts nothing)
- POST /api/v1/projects/{project_id}/backfills/{id}/revert      drop it, posting nothing (admin)

Events go in through the ingest API: ``POST /api/v1/events?backfill_session_id={id}`` (api/ingest/routes_events.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import ConnectionDep, EngineDep
from api.ingest import backfills
from api.tenancy.audit import audit
from api.tenancy.auth import ProjectAccess, require_project
from api.validation import RequestModel

router = APIRouter(prefix="/api/v1/projects/{project_id}/backfills", tags=["backfills"])

Read = Annotated[ProjectAccess, require_project("read")]
Admin = Annotated[ProjectAccess, require_project("admin")]
SESSION = Path(min_length=1, max_length=64, description="the session id (bf_…)")


class BackfillIn(RequestModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"description": "usage of 2026-11-28..30 from the old billing system"}]})
    description: str | None = Field(default=None, max_length=1_000)


class BackfillOut(BaseModel):
    id: str
    project_id: str
    status: str = Field(description="open | closed | reverted")
    description: str | None
    opened_by: str | None
    opened_at: datetime
    ended_by: str | None
    ended_at: datetime | None
    events: int = Field(description="events held (one per identity)")
    ingest_url: str = Field(description="where to send its events")


def _out(session: backfills.Session) -> BackfillOut:
    return BackfillOut(**session.to_json(), ingest_url=f"/api/v1/events?{backfills.SESSION_PARAM}={session.id}")


def _actor(access: ProjectAccess) -> str | None:
    return access.principal.user_id or access.principal.key_id


@router.post("", status_code=201, response_model=BackfillOut, summary="Open a backfill session (admin)")
def open_backfill(body: BackfillIn, access: Admin, conn: ConnectionDep) -> BackfillOut:
    session = backfills.open_session(conn, project_id=access.project_id, description=body.description,
                                     actor=_actor(access))
    audit(conn, access, action="backfill.open", target_kind="backfill", target_id=session.id,
          after={"description": body.description})
    return _out(session)


@router.get("", response_model=list[BackfillOut], summary="Backfill sessions of the project, newest first")
def list_backfills(access: Read, conn: ConnectionDep,
                   limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[BackfillOut]:
    return [_out(s) for s in backfills.list_sessions(conn, project_id=access.project_id, limit=limit)]


@router.get("/{session_id}", response_model=BackfillOut, summary="A backfill session")
def get_backfill(session_id: Annotated[str, SESSION], access: Read, conn: ConnectionDep) -> BackfillOut:
    return _out(backfills.get_session(conn, project_id=access.project_id, session_id=session_id))


@router.get("/{session_id}/diff", summary="Dry-run: the charges closing the session would post")
def diff_backfill(session_id: Annotated[str, SESSION], access: Admin, engine: EngineDep) -> dict[str, Any]:
    """Per wallet, meter, ORIGINAL period and price version: the session's units and ``charge_minor`` (positive
    charges the wallet), computed by the close's own code against the ledger's current counters, then rolled
    back. Admin only: the computation locks the wallets and counters it touches, like a close, for an instant.
    A closed session answers what its close posted (``dry_run: false``)."""
    return backfills.dry_run(engine, project_id=access.project_id, session_id=session_id)


@router.post("/{session_id}/close", summary="Post the session's charges, exactly once (admin)")
def close_backfill(session_id: Annotated[str, SESSION], access: Admin, conn: ConnectionDep,
                   response: Response) -> dict[str, Any]:
    """200 with what was posted. A retry (or a second close) posts nothing and answers the same result with
    ``Meterline-Replayed: true``."""
    result, now = backfills.close(conn, project_id=access.project_id, session_id=session_id, actor=_actor(access))
    if now:
        audit(conn, access, action="backfill.close", target_kind="backfill", target_id=session_id,
              after={"charge_minor": result["charge_minor"], "transactions": result["transactions"],
                     "events": result["events"]})
    else:
        response.headers["Meterline-Replayed"] = "true"
    return result


@router.post("/{session_id}/revert", response_model=BackfillOut, summary="Drop the session, posting nothing (admin)")
def revert_backfill(session_id: Annotated[str, SESSION], access: Admin, conn: ConnectionDep) -> BackfillOut:
    session = backfills.revert(conn, project_id=access.project_id, session_id=session_id, actor=_actor(access))
    audit(conn, access, action="backfill.revert", target_kind="backfill", target_id=session_id,
          after={"events": session.events})
    return _out(session)
