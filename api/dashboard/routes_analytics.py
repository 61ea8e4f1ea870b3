"""Analytics endpoints: /api/v1/projects/{project_id}/analytics/... (role viewer+, or an API key with read).

Every query is scoped to the path's project (analytics/queries.py binds it in every WHERE clause).

Who owns ClickHouse (analytics/README.md): with an embedded chDB path the api process is the only process
that may open it, so ``startup`` also starts the sink in a background thread (ANALYTICS_EMBEDDED_SINK_OWNER=
auto); with an http(s) ClickHouse the sink is its own process and this module only queries."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import anyio
import structlog
from fastapi import APIRouter, Depends, FastAPI, Query, Request

from analytics.client import ClientPool
from analytics.migrate import migrate
from analytics.queries import Analytics, window
from analytics.settings import AnalyticsSettings
from analytics.settings import get_settings as get_analytics_settings
from analytics.sink import SinkThread, sink_runs_in_api
from api.errors import Unavailable
from api.tenancy.auth import ProjectAccess, require_project

log = structlog.get_logger("api.analytics")

router = APIRouter(prefix="/api/v1/projects/{project_id}/analytics", tags=["analytics"])

ReadAccess = Annotated[ProjectAccess, require_project("read")]
From = Annotated[datetime | None, Query(alias="from", description="window start (ISO 8601 with zone); default to − 30 days")]
To = Annotated[datetime | None, Query(alias="to", description="window end, exclusive (ISO 8601 with zone); default now")]
GranularityQ = Annotated[str, Query(pattern="^(minute|hour|day|month)$")]
WalletQ = Annotated[str | None, Query(max_length=200, description="only this wallet")]


def _setup(settings: AnalyticsSettings) -> tuple[Analytics | None, SinkThread | None]:
    if not settings.clickhouse_url:
        log.warning("CLICKHOUSE_URL is not set: analytics endpoints answer 503")
        return None, None
    if settings.embedded and settings.embedded_sink_owner == "process":
        log.warning("embedded ClickHouse is owned by `meterline run analytics`: this api cannot query it")
        return None, None
    pool = ClientPool(settings.clickhouse_url, size=settings.query_clients_max)
    try:
        with pool.client() as client:
            migrate(client, database=settings.database)
    except Exception as exc:
        # e.g. a second api process on the same chdb:// path (chDB: one process per path), or a server that
        # is down. The rest of the api keeps serving; analytics answers 503 with the reason in the log.
        pool.close()
        log.error("analytics unavailable: cannot open ClickHouse", error=str(exc),
                  clickhouse=settings.clickhouse_url.split("@")[-1])
        return None, None
    sink = None
    if sink_runs_in_api(settings):
        sink = SinkThread(settings)
        sink.start()
        log.info("analytics sink runs in the api process (embedded ClickHouse)")
    return Analytics(settings, pool), sink


async def startup(app: FastAPI) -> None:
    settings = getattr(app.state, "analytics_settings", None) or get_analytics_settings()
    app.state.analytics_settings = settings
    app.state.analytics, app.state.analytics_sink = await anyio.to_thread.run_sync(_setup, settings)


async def shutdown(app: FastAPI) -> None:
    sink: SinkThread | None = getattr(app.state, "analytics_sink", None)
    if sink is not None:
        await anyio.to_thread.run_sync(sink.stop)
    service: Analytics | None = getattr(app.state, "analytics", None)
    if service is not None:
        service.pool.close()


def get_analytics(request: Request) -> Analytics:
    service: Analytics | None = getattr(request.app.state, "analytics", None)
    if service is None:
        raise Unavailable("analytics is not available in this process (no CLICKHOUSE_URL, or another process "
                          "owns the embedded ClickHouse)")
    return service


AnalyticsDep = Annotated[Analytics, Depends(get_analytics)]


@router.get("/usage", summary="Events and units per time bucket, by meter, subject or a data key")
def usage(access: ReadAccess, service: AnalyticsDep, granularity: GranularityQ = "hour", start: From = None,
          end: To = None, meter: Annotated[str | None, Query(max_length=256)] = None,
          subject: Annotated[str | None, Query(max_length=256)] = None,
          group_by: Annotated[str, Query(pattern=r"^(meter|subject|data\.[A-Za-z0-9_.\-]{1,200})$")] = "meter",
          value_key: Annotated[str | None, Query(max_length=200, description="sum this data key instead of units")]
          = None) -> dict[str, Any]:
    return service.usage(project_id=access.project_id, win=window(start, end), granularity=granularity,
                         meter=meter, subject=subject, group_by=group_by, value_key=value_key)


@router.get("/usage/totals", summary="Events and units per meter over the window")
def usage_totals(access: ReadAccess, service: AnalyticsDep, start: From = None, end: To = None) -> dict[str, Any]:
    return service.usage_totals(project_id=access.project_id, win=window(start, end))


@router.get("/usage/top-consumers", summary="Subjects with the most units of a meter (or events overall)")
def top_consumers(access: ReadAccess, service: AnalyticsDep, start: From = None, end: To = None,
                  meter: Annotated[str | None, Query(max_length=256)] = None,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 10) -> dict[str, Any]:
    return service.top_consumers(project_id=access.project_id, win=window(start, end), meter=meter, limit=limit)


@router.get("/wallets/summary", summary="Net movement, utilization and expiration rates, source breakdown")
def wallet_summary(access: ReadAccess, service: AnalyticsDep, start: From = None, end: To = None,
                   wallet_id: WalletQ = None) -> dict[str, Any]:
    return service.wallet_summary(project_id=access.project_id, win=window(start, end), wallet_id=wallet_id)


@router.get("/credit-flow", summary="Credits issued, spent and expired per time bucket")
def credit_flow(access: ReadAccess, service: AnalyticsDep, granularity: GranularityQ = "day", start: From = None,
                end: To = None, wallet_id: WalletQ = None) -> dict[str, Any]:
    return service.credit_flow(project_id=access.project_id, win=window(start, end), granularity=granularity,
                               wallet_id=wallet_id)


@router.get("/credit-sources", summary="Issued credits by source (top-ups, subscriptions, bonuses, ...)")
def credit_sources(access: ReadAccess, service: AnalyticsDep, start: From = None, end: To = None,
                   wallet_id: WalletQ = None) -> dict[str, Any]:
    return service.source_breakdown(project_id=access.project_id, win=window(start, end), wallet_id=wallet_id)


@router.get("/wallets/top", summary="Wallets that spent the most in the window")
def top_wallets(access: ReadAccess, service: AnalyticsDep, start: From = None, end: To = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 10) -> dict[str, Any]:
    return service.top_wallets(project_id=access.project_id, win=window(start, end), limit=limit)


@router.get("/wallets/{wallet_id}", summary="One wallet: its flows in the window and its latest transactions")
def wallet_detail(access: ReadAccess, service: AnalyticsDep, wallet_id: str, start: From = None, end: To = None,
                  limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
    win = window(start, end)
    summary = service.wallet_summary(project_id=access.project_id, win=win, wallet_id=wallet_id)
    transactions = service.wallet_transactions(project_id=access.project_id, wallet_id=wallet_id, limit=limit)
    return {**summary, **transactions}


@router.get("/wallets/{wallet_id}/transactions", summary="A wallet's transactions, newest first")
def wallet_transactions(access: ReadAccess, service: AnalyticsDep, wallet_id: str,
                        limit: Annotated[int, Query(ge=1, le=500)] = 100,
                        before_id: Annotated[int | None, Query(ge=1)] = None) -> dict[str, Any]:
    return service.wallet_transactions(project_id=access.project_id, wallet_id=wallet_id, limit=limit,
                                       before_id=before_id)


@router.get("/revenue", summary="Credits sold per pack and plan (top-ups and subscription grants)")
def revenue(access: ReadAccess, service: AnalyticsDep, start: From = None, end: To = None) -> dict[str, Any]:
    return service.revenue(project_id=access.project_id, win=window(start, end))


@router.get("/paywall-funnel", summary="Access requested -> paywalled -> purchased -> allowed again")
def paywall_funnel(access: ReadAccess, service: AnalyticsDep, start: From = None, end: To = None) -> dict[str, Any]:
    return service.paywall_funnel(project_id=access.project_id, win=window(start, end))


@router.get("/dead-letters", summary="Recent dead-lettered usage messages of this project (kept 30 days)")
def dead_letters(access: ReadAccess, service: AnalyticsDep,
                 limit: Annotated[int, Query(ge=1, le=200)] = 50) -> dict[str, Any]:
    return service.dead_letters(project_id=access.project_id, limit=limit)
