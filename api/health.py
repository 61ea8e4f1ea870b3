"""Liveness, readiness and metrics of the api process: the supervisor, `meterline status`, Prometheus and compose
read these.

- ``GET /health``: alive (answers without touching anything);
- ``GET /ready``: can do its job — PostgreSQL answers, the broker answers the ingest producer, and with embedded
  ClickHouse the analytics sink running in this process is subscribed; 503 with every check's detail otherwise;
- ``GET /healthz``: the older probe (alive and the database answers), kept for existing clients, plus the money
  pipeline's state: ``status`` is ``degraded`` while a ledger lane is halted (a checkpoint that cannot be applied
  or decoded; ledger/halts.py — it resumes by itself once the cause is fixed) or the last scheduled invariant
  check found violations (ledger/invariant_check.py) or the latest reconciliation found records of the same usage
  disagreeing (``ledger.reconciliation``: which records, on how many wallets). It stays 200: the API itself is up, and the supervisor
  must not restart it for the ledger's sake;
- ``GET /metrics``: Prometheus text format (api/metrics.py and whatever else this process records).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from api.deps import EngineDep
from ledger import queries
from ledger.probes import Check, database_check, ready_report
from ledger.reconciliation import latest_summary

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Health of the API, its database and the money pipeline")
def healthz(engine: EngineDep) -> dict[str, object]:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        halts = queries.partition_halts(conn)
        check = queries.latest_invariant_check(conn)
        reconciliation = latest_summary(conn)
    ledger: dict[str, object] = {
        "halted_partitions": [
            {"scope": h.scope, "topic": h.topic, "partition": h.partition, "reason": h.reason, "error": h.error,
             "as_of_offset": h.as_of_offset, "pending_checkpoints": h.pending_checkpoints, "attempts": h.attempts,
             "halted_at": h.halted_at.isoformat(), "last_attempt_at": h.last_attempt_at.isoformat()}
            for h in halts],
        "invariant_check": None if check is None else {
            "checked_at": check.checked_at.isoformat(), "violation_count": check.violation_count,
            "violations": {name: v["count"] for name, v in check.violations.items()}},
        "reconciliation": None if reconciliation is None else {
            "report_id": reconciliation.id, "finished_at": reconciliation.finished_at.isoformat(),
            "ok": reconciliation.ok, "disagreeing_wallets": reconciliation.disagreeing_wallets},
    }
    degraded = (bool(halts) or (check is not None and not check.ok)
                or (reconciliation is not None and not reconciliation.ok))
    return {"status": "degraded" if degraded else "ok", "database": "ok", "ledger": ledger}


@router.get("/health", summary="Liveness: the api process answers")
async def health() -> dict[str, str]:
    return {"status": "ok", "component": "api"}


def _checks(request: Request) -> dict[str, Check]:
    state = request.app.state
    checks: dict[str, Check] = {"database": database_check(state.engine)}

    def broker() -> tuple[bool, str]:
        ingestion = getattr(state, "ingestion", None)
        service = getattr(ingestion, "service", None)
        if service is None:
            error = getattr(ingestion, "error", None)
            return False, f"ingestion not connected yet{': ' + error if error else ''}"
        ok, detail = service.edge.broker_answers()
        return bool(ok), str(detail)

    checks["broker"] = broker
    sink_thread = getattr(state, "analytics_sink", None)
    if sink_thread is not None:  # embedded ClickHouse: this process runs the sink (api/dashboard/routes_analytics.py)
        def analytics_sink() -> tuple[bool, str]:
            sink = sink_thread.sink
            if sink is None:
                return False, "analytics sink not started yet"
            return sink.readiness_checks()["sink"]()  # type: ignore[no-any-return]
        checks["analytics_sink"] = analytics_sink
    return checks


@router.get("/ready", summary="Readiness: PostgreSQL, the broker and (embedded) the analytics sink",
            responses={503: {"description": "not ready; the body lists each check"}})
async def ready(request: Request) -> JSONResponse:
    checks = _checks(request)
    is_ready, body = await run_in_threadpool(ready_report, checks)
    content: dict[str, Any] = {**body, "component": "api"}
    return JSONResponse(content, status_code=200 if is_ready else 503)


@router.get("/metrics", summary="Prometheus metrics of the api process", response_class=Response)
async def metrics() -> Response:
    body = await run_in_threadpool(generate_latest, REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
