"""Liveness and readiness: the supervisor and `meterline status` read this."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from api.deps import EngineDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Health of the API and its database")
def healthz(engine: EngineDep) -> dict[str, object]:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    return {"status": "ok", "database": "ok"}
