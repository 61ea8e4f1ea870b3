"""The latest continuous-reconciliation report of a project (ledger/reconciliation.py, written by the scheduler's
``reconcile_usage`` job): when the four records of the project's usage — the usage log, the ledger, ClickHouse usage
and ClickHouse credit flow — were last compared, up to where, the drift per wallet and every mismatched key with
WHICH records disagree."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import ConnectionDep
from api.tenancy.auth import ProjectAccess, require_project
from ledger.reconcile_compare import RECORDS
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
    records_compared: list[str] = Field(description="of usage_log, ledger, clickhouse_usage, clickhouse_flow")
    coverage: dict[str, dict[str, Any]] = Field(
        description="per record: compared or why not, and up to where (ledger marks, the ClickHouse sink's "
                    "watermark per partition, the settle cut-off of postings)")
    drift_minor: int = Field(description="net amount a repair would post for this project (+ = charge)")
    differences: list[dict[str, Any]] = Field(description="log vs ledger replay, per wallet, meter, period and "
                                                          "price version (what `meterline replay --apply` repairs)")
    drift_wallets: list[dict[str, Any]] = Field(description="per wallet: the records that disagree on it, its "
                                                            "mismatched keys, the absolute money drift")
    mismatches: list[dict[str, Any]] = Field(description="per wallet, meter, period, price version and measure: "
                                                         "every record's value and which records disagree")


class ReconciliationOut(BaseModel):
    report: ReportOut | None = Field(description="null until the scheduler's first reconciliation finished")


@router.get("", response_model=ReconciliationOut, summary="Latest reconciliation of the four usage records")
def get_reconciliation(access: Annotated[ProjectAccess, require_project("read")],
                       conn: ConnectionDep) -> ReconciliationOut:
    report = latest_report(conn, access.project_id)
    if report is None:
        return ReconciliationOut(report=None)
    return ReconciliationOut(report=ReportOut(
        id=report.id, source_topic=report.source_topic, replay_id=report.replay_id, started_at=report.started_at,
        finished_at=report.finished_at, messages=report.messages, complete=report.complete,
        records_compared=[r for r in RECORDS if (report.coverage.get(r) or {}).get("compared")]
        or ["usage_log", "ledger"], coverage=report.coverage, drift_minor=report.drift_minor,
        differences=report.differences, drift_wallets=report.drift_by_wallet(), mismatches=report.mismatches))
