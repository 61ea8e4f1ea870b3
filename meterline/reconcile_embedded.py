"""The ``reconcile_usage`` job inside the api process, when it owns an embedded ClickHouse (chDB).

chDB allows one process per data path and on the default stack the api owns it (its analytics sink runs in-process,
api/dashboard/routes_analytics.py), so the scheduler cannot read the two ClickHouse records. The api therefore runs
the reconciliation itself, with a client of its own pool, on a thread — the same ``run_once`` under the same lease
(meterline/reconcile_job.py ``run_leased``), so it never overlaps a scheduler run — and the scheduler leaves the job
out (``reconcile_jobs``). Like the scheduler's job it checks every ``check_every_s`` whether
``METERLINE_RECONCILE_INTERVAL_S`` has passed since the last start, and never runs two at once.

Whether this api owns the path is decided once at startup from its analytics settings (``sink_runs_in_api``), the
same rule the scheduler applies, so exactly one of the two runs the job. If this api owns the path but could not
open it (analytics down), the run still compares the log and the ledger and the report says why ClickHouse was not
compared — the RecordNotCompared alert then points at the real problem."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import structlog
from fastapi import FastAPI

from meterline.reconcile_job import CHECK_EVERY_S, Reconciler, run_leased

log = structlog.get_logger("meterline.reconcile_embedded")

#: how long the api's shutdown waits for a running reconciliation before it closes ClickHouse under it (the run
#: then fails, is logged, and nothing is stored: a reconciliation only reads)
SHUTDOWN_WAIT_S = 10.0


class EmbeddedReconciliation:
    """An api lifecycle hook (api/main.py ``create_app(hooks=…)``): ``startup`` / ``shutdown`` after the routers'."""

    def __init__(self, *, interval_s: float, settle_s: float, check_every_s: float = CHECK_EVERY_S,
                 timeout_s: float = 3_600.0) -> None:
        self.interval_s, self.settle_s, self.check_every_s, self.timeout_s = (interval_s, settle_s, check_every_s,
                                                                              timeout_s)
        self.reconciler: Reconciler | None = None
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None

    @classmethod
    def from_settings(cls) -> EmbeddedReconciliation:
        from meterline.settings import get_settings

        settings = get_settings()
        return cls(interval_s=settings.reconcile_interval_s, settle_s=settings.reconcile_settle_s)

    async def startup(self, app: FastAPI) -> None:
        from analytics.sink import sink_runs_in_api

        settings = getattr(app.state, "analytics_settings", None)
        if self.interval_s <= 0 or settings is None or not sink_runs_in_api(settings):
            return  # the scheduler runs reconcile_usage (a ClickHouse server, none, or another owner)
        self.reconciler = Reconciler(self.interval_s, lambda: self.run(app))
        self._loop = threading.Thread(target=self._ticks, name="reconcile-usage-ticks", daemon=True)
        self._loop.start()
        log.info("reconcile_usage_in_api", interval_s=self.interval_s,
                 detail="this api owns the embedded ClickHouse, so it runs the reconciliation of the four records")

    async def shutdown(self, _app: FastAPI) -> None:
        self._stop.set()
        if self._loop is not None:
            self._loop.join(SHUTDOWN_WAIT_S)
        running = self.reconciler.thread if self.reconciler is not None else None
        if running is not None and running.is_alive():
            running.join(SHUTDOWN_WAIT_S)

    def _ticks(self) -> None:
        while not self._stop.wait(self.check_every_s):
            assert self.reconciler is not None
            self.reconciler.tick()

    def run(self, app: FastAPI) -> int | None:
        """One reconciliation now, with a client of this api's ClickHouse pool; the report id (None: another
        process holds the lease)."""
        analytics, sink = getattr(app.state, "analytics", None), getattr(app.state, "analytics_sink", None)
        settings = app.state.settings
        lease: Any = contextlib.nullcontext(None)
        database, group = "meterline", None
        absent = ("this api owns the embedded ClickHouse (chdb://) but could not open it: see its log line "
                  "'analytics unavailable'")
        if analytics is not None and sink is not None:
            lease, database = analytics.pool.client(), analytics.db
            group = app.state.analytics_settings.consumer_group
        with lease as client:
            return run_leased(database_url=settings.database_url, bootstrap=settings.kafka_bootstrap_servers,
                              topic_prefix=settings.topic_prefix, clickhouse=client, clickhouse_database=database,
                              clickhouse_group=group, clickhouse_absent=absent, settle_s=self.settle_s,
                              timeout_s=self.timeout_s)
