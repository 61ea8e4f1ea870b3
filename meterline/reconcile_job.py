"""Continuous reconciliation: the scheduler's ``reconcile_usage`` job replays the usage log against the ledger
every ``METERLINE_RECONCILE_INTERVAL_S`` (1 h; 0 = never) and stores a report (ledger/reconciliation.py) that
``GET /api/v1/projects/{id}/reconciliation`` serves.

A replay reads the whole current topic life (meterline/cli_replay.py ``run_replay``, read-only), which takes far
longer than the scheduler's per-job budget, so the job only STARTS it, on a thread of the scheduler process, at
most one at a time; the job's round returns at once and the other jobs keep their rhythm. A drift is logged as
``reconciliation_drift`` (warning: wallet count, net amount) — the alert; a clean run as ``reconciliation_clean``.
The first replay runs one interval after the scheduler starts (a restart does not trigger a full read)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import Connection

from ledger.scheduler import Job
from ledger.settings import LedgerSettings

log = structlog.get_logger("meterline.reconcile")

#: how often the job looks whether a replay is due (cheap: no I/O)
CHECK_EVERY_S = 30.0


def run_once(*, database_url: str, bootstrap: str, topic_prefix: str = "", timeout_s: float = 3_600.0) -> int:
    """One read-only replay of every partition, stored as a report; returns the report id."""
    from ledger.db import make_engine
    from ledger.kafka import require_topics, topic_name
    from ledger.reconciliation import record_report
    from meterline.cli_replay import run_replay
    from streams.contracts import TOPIC_USAGE_EVENTS

    topic = topic_name(TOPIC_USAGE_EVENTS, topic_prefix)
    partitions = require_topics(bootstrap, [topic])[topic]
    started = datetime.now(UTC)
    report = run_replay(database_url=database_url, bootstrap=bootstrap, topic=topic, partitions=partitions,
                        wanted=range(partitions), from_offset=None, to_offset=None, since=None, until=None,
                        project=None, subjects=[], meters=[], apply=False, timeout_s=timeout_s)
    engine = make_engine(database_url, pool_size=1, application_name="meterline-reconcile-job")
    try:
        with engine.begin() as conn:
            report_id = record_report(conn, source_topic=report["source"], replay_id=report["replay_id"],
                                      marks=report["marks"], started_at=started, messages=report["messages"],
                                      incomplete=report["incomplete_partitions"],
                                      differences=report["differences"], drift_minor=report["amount_minor"])
    finally:
        engine.dispose()
    differences = report["differences"]
    if differences or report["incomplete_partitions"]:
        log.warning("reconciliation_drift", report_id=report_id, keys=len(differences),
                    wallets=len({d["wallet_id"] for d in differences}), drift_minor=report["amount_minor"],
                    incomplete_partitions=report["incomplete_partitions"], replay_id=report["replay_id"])
    else:
        log.info("reconciliation_clean", report_id=report_id, messages=report["messages"])
    return report_id


class Reconciler:
    """Starts ``run_once`` on a thread when due; never two at once."""

    def __init__(self, interval_s: float, run: Any) -> None:
        self.interval_s = interval_s
        self.run = run
        self.last_started = time.monotonic()
        self.thread: threading.Thread | None = None

    def tick(self) -> int:
        if self.interval_s <= 0 or (self.thread is not None and self.thread.is_alive()):
            return 0
        if time.monotonic() - self.last_started < self.interval_s:
            return 0
        self.last_started = time.monotonic()
        self.thread = threading.Thread(target=self._guarded, name="reconcile-usage", daemon=True)
        self.thread.start()
        return 1

    def _guarded(self) -> None:
        try:
            self.run()
        except Exception as exc:  # logged; the next interval tries again
            log.error("reconciliation_failed", error=str(exc)[:500])


def reconcile_jobs() -> list[Job]:
    """The ``reconcile_usage`` job, on the engines the scheduler itself uses (``LedgerSettings``)."""
    from ledger.settings import get_settings as ledger_settings
    from meterline.settings import get_settings

    interval_s = get_settings().reconcile_interval_s
    if interval_s <= 0:
        return []
    engines = ledger_settings()
    reconciler = Reconciler(interval_s, lambda: run_once(
        database_url=engines.database_url, bootstrap=engines.kafka_bootstrap_servers, topic_prefix=engines.topic_prefix))

    def reconcile_usage(_conn: Connection, _now: datetime, _settings: LedgerSettings) -> int:
        return reconciler.tick()

    return [Job("reconcile_usage", CHECK_EVERY_S, reconcile_usage)]
