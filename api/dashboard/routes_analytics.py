"""Analytics endpoints: /api/v1/projects/{project_id}/analytics/... (role viewer+, or an API key with read).

Every query is scoped to the path's project (analytics/queries.py binds it in every WHERE clause).

Who owns ClickHouse (analytics/README.md): with an embedded chDB path the api process is the only process
that may open it, so ``startup`` also starts the sink in a background thread (ANALYTICS_EMBEDDED_SINK_OWNER=
auto); with an http(s) ClickHouse the sink is its own process and this module only queries."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import anyio
import structlog
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from sqlalchemy import Connection

from analytics.client import ClientPool
from analytics.meter_units import MeterSpec, MeterVersion
from analytics.migrate import migrate
from analytics.queries import Analytics, window
from analytics.settings import AnalyticsSettings
from analytics.settings import get_settings as get_analytics_settings
from analytics.sink import SinkThread, sink_runs_in_api
from api.deps import ConnectionDep
from api.errors import Unavailable
from api.tenancy.auth import ProjectAccess, require_project
from streams import catalog
from streams.errors import MeterNotFound

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


#: the first version of a meter counts events of any time: streams meters every event it reads once the meter
#: exists, including back-dated ones; later versions take over at their creation
_BEFORE_ANY_EVENT = datetime(1970, 1, 1, tzinfo=UTC)


def meter_specs(conn: Connection, project_id: str, meter: str | None = None) -> list[MeterSpec]:
    """The project's current meters (or the one named by slug or id) with every version's definition, for
    units computed as each meter defines them (analytics/meter_units.py)."""
    meter = meter or None  # an empty picker value means every meter
    histories = catalog.meter_histories(conn, project_id=project_id)
    price_versions: dict[str, list[tuple[str, datetime]]] = {}
    for price in catalog.list_prices(conn, project_id=project_id):  # active prices: one per meter
        price_versions.setdefault(price.meter_id, []).extend((v.id, v.effective_from) for v in price.versions)
    specs = []
    for meter_id, versions in histories.items():
        current = versions[-1]
        if current.archived_at is not None and meter is None:
            continue
        if meter is not None and meter not in (current.slug, meter_id):
            continue
        specs.append(MeterSpec(id=meter_id, slug=current.slug, group_by=tuple(current.group_by), priced=meter_id in price_versions,
                               price_versions=tuple(sorted(price_versions.get(meter_id, []), key=lambda v: v[1])),
                               event_type=current.event_type, versions=tuple(
                                   MeterVersion(event_type=v.event_type, aggregation=v.aggregation,
                                                value_property=v.value_property, filters=tuple(v.filters),
                                                valid_from=v.created_at if i else _BEFORE_ANY_EVENT,
                                                valid_to=v.superseded_at)
                                   for i, v in enumerate(versions))))
    if meter is not None and not specs:
        raise MeterNotFound(f"no meter {meter!r} in this project (GET /api/v1/projects/{{project}}/meters)")
    return sorted(specs, key=lambda m: m.slug)


MeterQ = Annotated[str | None, Query(max_length=100, description="a meter's slug or id (default: every meter)")]


@router.get("/meters", summary="The meters usage analytics can show (the dashboard's meter picker)")
def meters(access: ReadAccess, conn: ConnectionDep) -> dict[str, Any]:
    return {"meters": [{"meter": m.slug, "meter_id": m.id, "event_type": m.event_type, "aggregation": m.aggregation,
                        "group_by": list(m.group_by), "priced": m.priced} for m in meter_specs(conn, access.project_id)]}


@router.get("/usage", summary="Events, units (as each meter defines them) and rejected events per time bucket")
def usage(access: ReadAccess, service: AnalyticsDep, conn: ConnectionDep, granularity: GranularityQ = "hour",
          start: From = None, end: To = None, meter: MeterQ = None,
          subject: Annotated[str | None, Query(max_length=256)] = None,
          group_by: Annotated[str, Query(pattern=r"^(meter|subject|price_version|data\.[A-Za-z0-9_.\-]{1,200}|\$\.[A-Za-z0-9_.\[\]\-]{1,200})$",
                                         description="meter, subject, or (with ?meter=) price_version, one of "
                                                     "its group-by keys such as $.model, or data.<key>")] = "meter",
          ) -> dict[str, Any]:
    specs = meter_specs(conn, access.project_id, meter)
    return service.usage(project_id=access.project_id, win=window(start, end), granularity=granularity,
                         meters=specs, subject=subject, group_by=group_by)


@router.get("/usage/totals", summary="Per meter: units and rejected events beside the credits billed; dead letters")
def usage_totals(access: ReadAccess, service: AnalyticsDep, conn: ConnectionDep, start: From = None,
                 end: To = None) -> dict[str, Any]:
    return service.usage_totals(project_id=access.project_id, win=window(start, end),
                                meters=meter_specs(conn, access.project_id))


@router.get("/usage/top-consumers", summary="Subjects with the most units of a meter (or events overall)")
def top_consumers(access: ReadAccess, service: AnalyticsDep, conn: ConnectionDep, start: From = None,
                  end: To = None, meter: MeterQ = None,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 10) -> dict[str, Any]:
    spec = meter_specs(conn, access.project_id, meter)[0] if meter else None
    return service.top_consumers(project_id=access.project_id, win=window(start, end), meter=spec, limit=limit)


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
