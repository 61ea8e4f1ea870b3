"""Application factory. Routers are included here; resources are built in the lifespan."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from api.docs_ui import install_docs
from api.errors import install_error_handlers
from api.middleware import install_middleware
from api.settings import ApiSettings, get_settings
from api.wallets.fast_debit import FastDebitMiddleware
from ledger.db import make_engine
from ledger.runtime import freeze_startup_heap

#: Router modules, each exposing ``router`` (and optionally ``startup(app)`` / ``shutdown(app)``).
ROUTER_MODULES: list[str] = [
    "api.health",
    "api.tenancy.routes_auth",
    "api.tenancy.routes_projects",
    "api.tenancy.routes_members",
    "api.tenancy.routes_invitations",
    "api.tenancy.routes_audit",
    "api.tenancy.routes_email",
    "api.wallets.routes_wallets",
    "api.wallets.routes_wallet_ops",
    "api.wallets.routes_signup_bonus",
    "api.wallets.routes_erasure",
    "api.wallets.routes_feature_costs",
    "api.access.routes_access",
    "api.tenancy.routes_keys",
    "api.ingest.routes_events",
    "api.dashboard.routes_analytics",
    "api.ingest.routes_catalog",
    "api.payments.routes_payments",
    "api.payments.routes_webhooks",
    "api.payments.routes_reconciliation",
    "api.wallets.routes_billing_rules",
    "api.wallets.routes_ledger_chain",
    "api.wallets.routes_exports",
    "api.wallets.routes_reconciliation",
    "api.ingest.routes_dead_letters",
    "api.ingest.routes_backfills",
    "api.dashboard.routes_pages",
]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: ApiSettings = app.state.settings
    app.state.engine = make_engine(settings.database_url, pool_size=settings.db_pool_size,
                                   application_name="meterline-api", pre_ping=False)
    # the router modules, then the hooks of a composition root above the api (create_app ``hooks``)
    modules = [*(importlib.import_module(m) for m in ROUTER_MODULES), *getattr(app.state, "lifecycle_hooks", ())]
    for module in modules:
        if hasattr(module, "startup"):
            await module.startup(app)
    freeze_startup_heap()
    try:
        yield
    finally:
        for module in reversed(modules):
            if hasattr(module, "shutdown"):
                await module.shutdown(app)
        app.state.engine.dispose()


def create_app(settings: ApiSettings | None = None, *, hooks: Sequence[Any] = ()) -> FastAPI:
    """``hooks``: objects with ``async startup(app)`` / ``async shutdown(app)`` like the router modules, started after
    them (analytics is set up by then): how ``meterline`` adds work to the api process that the api may not import
    (meterline/api_process.py: the reconciliation against an embedded ClickHouse this process owns)."""
    app = FastAPI(
        title="Meterline API",
        version="0.1.0",
        summary="Usage metering, prepaid credit wallets, pricing, payments and analytics.",
        lifespan=lifespan,
        docs_url=None,  # api/docs_ui.py: offline Swagger UI under a CSP, with security schemes
        redoc_url=None,
    )
    app.state.settings = settings or get_settings()
    app.state.lifecycle_hooks = list(hooks)
    install_error_handlers(app)
    install_middleware(app, inner=(FastDebitMiddleware,))
    for module_name in ROUTER_MODULES:
        app.include_router(importlib.import_module(module_name).router)
    install_docs(app)
    return app
