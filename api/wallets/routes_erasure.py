"""Erasing an end user's account (app-store account deletion): request (closes the wallet at once), read, cancel
within the grace period. The erasure itself is the scheduler's ``erase_accounts`` job; api/wallets/erasure.py documents
what is erased and what is kept."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import ConnectionDep, SettingsDep
from api.errors import NotFound
from api.tenancy.auth import ProjectAccess, require_project
from api.validation import RequestModel
from api.wallets import erasure
from api.wallets.erasure_analytics import EmbeddedErasurePass
from api.wallets.routes_wallets import wallet_in_project

router = APIRouter(prefix="/api/v1/projects/{project_id}/wallets/{wallet_id}/erasure", tags=["account erasure"])
Read = Annotated[ProjectAccess, require_project("read")]
Admin = Annotated[ProjectAccess, require_project("admin")]

EXAMPLE: dict[str, Any] = {"id": 12, "wallet_id": "9b1c...", "status": "pending", "reason": "user deleted their account in the app",
           "requested_at": "2026-12-01T10:00:00Z", "erase_after": "2026-12-31T10:00:00Z", "cancelled_at": None,
           "erased_at": None, "forfeited_minor": None, "forfeit_transaction_id": None, "subject_keys_held": 1}


class ErasureRequest(RequestModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"reason": "user deleted their account in the app"}, {}]})
    reason: str | None = Field(default=None, max_length=500,
                               description="why (kept with the request; do not put personal data here)")


class ErasureOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE]})
    id: int
    wallet_id: str
    status: str = Field(description="pending (wallet closed, cancellable until erase_after), cancelled, erased")
    reason: str | None
    requested_at: datetime
    erase_after: datetime = Field(description="the scheduler erases the data after this; cancel works before it")
    cancelled_at: datetime | None
    erased_at: datetime | None
    forfeited_minor: int | None = Field(description="the balance posted as a forfeiture (adjustment) at erasure")
    forfeit_transaction_id: int | None
    subject_keys_held: int = Field(description="subject keys taken out at the request (restored by a cancel)")

    @classmethod
    def of(cls, e: erasure.ErasureRow) -> ErasureOut:
        return cls(id=e.id, wallet_id=e.wallet_id, status=e.status, reason=e.reason, requested_at=e.requested_at,
                   erase_after=e.erase_after, cancelled_at=e.cancelled_at, erased_at=e.erased_at,
                   forfeited_minor=e.forfeited_minor, forfeit_transaction_id=e.forfeit_transaction_id,
                   subject_keys_held=e.subjects_held)


@router.post("", status_code=202, response_model=ErasureOut,
             responses={200: {"model": ErasureOut, "description": "an erasure was already requested (or done)"},
                        422: {"description": "not an end user's (subject) wallet"}},
             summary="Request erasure of the wallet's end user (admin): the wallet closes now, personal data is "
                     "erased after API_ERASURE_GRACE_S")
def request_erasure(wallet_id: str, access: Admin, conn: ConnectionDep, settings: SettingsDep, response: Response,
                    body: ErasureRequest | None = None) -> ErasureOut:
    wallet = wallet_in_project(conn, project_id=access.project_id, wallet_id=wallet_id)
    row, created = erasure.request_erasure(conn, access, wallet, reason=body.reason if body else None,
                                           grace_s=settings.erasure_grace_s)
    if not created:
        response.status_code = 200
    return ErasureOut.of(row)


@router.get("", response_model=ErasureOut, summary="The wallet's latest erasure request")
def read_erasure(wallet_id: str, access: Read, conn: ConnectionDep) -> ErasureOut:
    wallet_in_project(conn, project_id=access.project_id, wallet_id=wallet_id)
    row = erasure.latest(conn, project_id=access.project_id, wallet_id=wallet_id)
    if row is None:
        raise NotFound("no erasure was requested for this wallet", extra={"wallet_id": wallet_id})
    return ErasureOut.of(row)


@router.post("/cancel", response_model=ErasureOut,
             responses={404: {"description": "no pending erasure"},
                        409: {"description": "already erased, or the grace period is over"}},
             summary="Cancel a pending erasure within the grace period (admin): subject keys restored, wallet "
                     "reopened")
def cancel_erasure(wallet_id: str, access: Admin, conn: ConnectionDep) -> ErasureOut:
    wallet = wallet_in_project(conn, project_id=access.project_id, wallet_id=wallet_id)
    return ErasureOut.of(erasure.cancel_erasure(conn, access, wallet))


#: how often the api, when it owns an embedded chDB (its analytics sink runs in-process), runs the ClickHouse pass
EMBEDDED_ERASURE_EVERY_S = 30.0


async def startup(app: FastAPI) -> None:
    """Start the ClickHouse pass of erasure for an embedded chDB this api owns (the scheduler runs it for a server).
    Decided per round: analytics starts after this router, and may be down."""
    def clients() -> Any:
        analytics, sink = getattr(app.state, "analytics", None), getattr(app.state, "analytics_sink", None)
        if analytics is None or sink is None:  # no analytics here, or a ClickHouse server (the scheduler's job)
            return None
        return analytics.pool.client(), analytics.db

    every_s = getattr(app.state, "embedded_erasure_every_s", EMBEDDED_ERASURE_EVERY_S)
    app.state.embedded_erasure = EmbeddedErasurePass(app.state.engine, clients, every_s=every_s)
    app.state.embedded_erasure.start()


async def shutdown(app: FastAPI) -> None:
    running: EmbeddedErasurePass | None = getattr(app.state, "embedded_erasure", None)
    if running is not None:
        running.stop()
