"""The latest continuous-reconciliation report of a project (ledger/reconciliation.py, written by the scheduler's
``reconcile_usage`` job): when the usage log was last replayed against the ledger and every key of the project
whose ledger counters differ from the log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import ConnectionDep
from api.tenancy.auth import ProjectAccess, require_project
from ledger.reconciliation import latest_report

router = APIRouter(prefix="/api/v1/projects/{project_id}/reconciliation", tags=["ledger audit"])


class ReportOut(BaseModel):
    id: int
    source_topic: str
    replay_id: str = Field(description="`meterline replay --apply` over the same state posts these drifts")
    started_at: datetime
    finished_at: datetime
    messages: int
    complete: bool = Field(description="false when a partition's log ended before the ledger's mark")
    records_compared: list[str] = ["usage.events.v1 (replayed)", "ledger counters and charges"]
    drift_minor: int = Field(description="net amount a repair would post for this project (+ = charge)")
    differences: list[dict[str, Any]] = Field(description="per wallet, meter, period and price version")


class ReconciliationOut(BaseModel):
    report: ReportOut | None = Field(description="null until the scheduler's first reconciliation finished")


@router.get("", response_model=ReconciliationOut, summary="Latest reconciliation of the usage log and the ledger")
def get_reconciliation(access: Annotated[ProjectAccess, require_project("read")],
                       conn: ConnectionDep) -> ReconciliationOut:
    report = latest_report(conn, access.project_id)
    if report is None:
        return ReconciliationOut(report=None)
    return ReconciliationOut(report=ReportOut(
        id=report.id, source_topic=report.source_topic, replay_id=report.replay_id, started_at=report.started_at,
        finished_at=report.finished_at, messages=report.messages, complete=report.complete,
        drift_minor=report.drift_minor, differences=report.differences))
