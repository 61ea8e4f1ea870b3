"""The receipts reconciliation over HTTP (api/payments/reconciliation.py), under /api/v1/projects/{id}: its
stored reports (admin) and a run on demand (admin, audited)."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from api.deps import ConnectionDep, EngineDep
from api.payments import reconciliation
from api.payments.reconcile_settings import ReconcileSettings
from api.tenancy.audit import audit
from api.tenancy.auth import ProjectAccess, require_project

router = APIRouter(prefix="/api/v1/projects/{project_id}", tags=["payments"])
Admin = Annotated[ProjectAccess, require_project("admin")]
Provider = Literal["revenuecat", "lemonsqueezy"]


@lru_cache
def _settings() -> ReconcileSettings:
    return ReconcileSettings()


@router.get("/payments/reconciliation", summary="Receipts reconciliation reports, newest first (admin)")
def list_reports(access: Admin, conn: ConnectionDep, provider: Provider | None = None,
                 limit: Annotated[int, Query(ge=1, le=200)] = 20) -> list[dict[str, Any]]:
    return reconciliation.reports(conn, project_id=access.project_id, provider=provider, limit=limit)


@router.post("/payments/reconciliation",
             summary="Reconcile now: read RevenueCat / Lemon Squeezy and apply what no webhook brought (admin)")
async def run_now(access: Admin, engine: EngineDep, provider: Provider | None = None) -> list[dict[str, Any]]:
    providers = (provider,) if provider else reconciliation.PROVIDERS
    settings = _settings()

    def run() -> list[Any]:  # in a worker thread: the providers' HTTP and the database never block the event loop
        found = reconciliation.reconcile_all(engine, settings, trigger="api", project_id=access.project_id,
                                             providers=providers)
        with engine.begin() as conn:
            audit(conn, access, action="payments.reconcile", target_kind="project", target_id=access.project_id,
                  after={"reports": [r.id for r in found], "fixed": sum(r.fixed for r in found)})
        return found

    return [r.public() for r in await run_in_threadpool(run)]
