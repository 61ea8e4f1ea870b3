"""Continuous reconciliation: the ``reconcile_usage`` job compares the four records of the same usage —
the usage log, the ledger, ClickHouse usage and ClickHouse credit flow (meterline/reconcile_sources.py reads them,
ledger/reconcile_compare.py judges) — every ``METERLINE_RECONCILE_INTERVAL_S`` (1 h; 0 = never) and stores a report
(ledger/reconciliation.py) that ``GET /api/v1/projects/{id}/reconciliation`` and the dashboard's Reconciliation page
serve; the metrics ``meterline_reconciliation_*`` (ledger/metrics.py) feed the alert and ``meterline status``.

Who runs it depends on who may open ClickHouse:

* a ClickHouse server (``CLICKHOUSE_URL=http(s)://``), or none: the scheduler (``reconcile_jobs``);
* an embedded chDB path owned by the api (the default stack; ``ANALYTICS_EMBEDDED_SINK_OWNER=auto``): chDB allows
  one process per data path, so the api process runs it on a thread of its own with its own ClickHouse client
  (meterline/reconcile_embedded.py) and the scheduler leaves the job out;
* an embedded path owned by ``meterline run analytics`` (``…=process``): nobody else may open it; the scheduler runs
  the job and the report says the two ClickHouse records were not compared.

Either way a run first takes the lease row ``meterline.reconcile_usage`` (ledger/scheduler.py ``run_lease``), so a
scheduler run and an api run never overlap (e.g. while a deployment moves from one ClickHouse to the other); a run
that finds the lease held is skipped until the next interval.

A replay reads the whole current topic life (meterline/cli_replay.py ``run_replay``, read-only), which takes far
longer than the scheduler's per-job budget, so the job only STARTS it, on a thread, at most one at a time; the
job's round returns at once and the other jobs keep their rhythm. A drift is logged as
``reconciliation_drift`` (error: which records disagree on how many wallets, the drift per pair, the first
mismatch in words); a clean run as ``reconciliation_clean``.
The first replay runs one interval after the process starts (a restart does not trigger a full read)."""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import structlog
from sqlalchemy import Connection

from ledger.scheduler import Job
from ledger.settings import LedgerSettings

log = structlog.get_logger("meterline.reconcile")

#: how often the job looks whether a replay is due (cheap: no I/O)
CHECK_EVERY_S = 30.0
#: the scheduler_leases row a run holds (ledger/scheduler.py ``run_lease``): one run at a time across processes
RECONCILE_LEASE = "meterline.reconcile_usage"


def run_once(*, database_url: str, bootstrap: str, topic_prefix: str = "", timeout_s: float = 3_600.0,
             clickhouse: Any | None = None, clickhouse_database: str = "meterline",
             clickhouse_group: str | None = None, clickhouse_absent: str = "no ClickHouse configured",
             settle_s: float = 600.0) -> int:
    """One reconciliation of the four records, stored as a report; returns the report id.

    First the read-only replay of every partition (log vs ledger, with the amounts ``meterline replay --apply``
    would post), then the four-record comparison (meterline/reconcile_sources.py readers, ledger/reconcile_compare.py
    verdicts). ``clickhouse`` is a client of the analytics database (None: the two ClickHouse records are not
    compared, ``clickhouse_absent`` says why)."""
    from ledger.db import make_engine
    from ledger.kafka import require_topics, topic_name
    from ledger.metrics import record_reconciliation
    from ledger.reconciliation import record_report
    from meterline.cli_replay import run_replay
    from streams.contracts import TOPIC_USAGE_EVENTS

    topic = topic_name(TOPIC_USAGE_EVENTS, topic_prefix)
    partitions = require_topics(bootstrap, [topic])[topic]
    started = datetime.now(UTC)
    deadline = time.monotonic() + timeout_s
    t0 = time.monotonic()
    report = run_replay(database_url=database_url, bootstrap=bootstrap, topic=topic, partitions=partitions,
                        wanted=range(partitions), from_offset=None, to_offset=None, since=None, until=None,
                        project=None, subjects=[], meters=[], apply=False, timeout_s=timeout_s)
    engine = make_engine(database_url, pool_size=1, application_name="meterline-reconcile-job")
    seconds = {"replay": round(time.monotonic() - t0, 3)}
    try:
        t0 = time.monotonic()
        mismatches, coverage = four_records(engine, bootstrap=bootstrap, topic=topic, partitions=partitions,
                                            deadline=deadline, clickhouse=clickhouse, database=clickhouse_database,
                                            group=clickhouse_group, absent=clickhouse_absent, settle_s=settle_s,
                                            now=started)
        seconds["four_records"] = round(time.monotonic() - t0, 3)
        rows = [m.as_row() for m in mismatches]
        with engine.begin() as conn:
            report_id = record_report(conn, source_topic=report["source"], replay_id=report["replay_id"],
                                      marks=report["marks"], started_at=started, messages=report["messages"],
                                      incomplete=report["incomplete_partitions"],
                                      differences=report["differences"], drift_minor=report["amount_minor"],
                                      coverage=coverage, mismatches=rows)
    finally:
        engine.dispose()
    from ledger.reconcile_compare import drift_by_pair, drift_wallets

    wallets, pairs = drift_wallets(mismatches), drift_by_pair(mismatches)
    record_reconciliation(wallets, pairs, {r: bool(c.get("compared")) for r, c in coverage.items()})
    differences = report["differences"]
    if mismatches or differences or report["incomplete_partitions"]:
        first = rows[0] if rows else {}
        # the alert's log line: loud, and it names who disagrees on what
        log.error("reconciliation_drift", report_id=report_id, disagreeing={r: n for r, n in wallets.items() if n},
                  drift_minor=pairs, keys=len(rows), replay_keys=len(differences),
                  incomplete_partitions=report["incomplete_partitions"], replay_id=report["replay_id"], seconds=seconds,
                  first=f"{', '.join(first.get('disagreeing', []))} disagrees on wallet {first.get('wallet_id')} "
                        f"meter {first.get('meter_id')} period {first.get('period_start')} "
                        f"({first.get('measure')}: {first.get('values')})" if first else None)
    else:
        log.info("reconciliation_clean", report_id=report_id, messages=report["messages"], seconds=seconds,
                 compared=[r for r, c in coverage.items() if c.get("compared")])
    return report_id


def four_records(engine: Any, *, bootstrap: str, topic: str, partitions: int, deadline: float,
                 clickhouse: Any | None, database: str, group: str | None, absent: str,
                 settle_s: float, now: datetime) -> tuple[list[Any], dict[str, dict[str, Any]]]:
    """Read the four records (one reader each) and compare them; returns (mismatches, coverage per record)."""
    from datetime import timedelta

    from ledger import reconcile_compare as rc
    from ledger.pricing import price_minor
    from meterline import reconcile_sources as src
    from streams.catalog_model import ProjectPolicy
    from streams.replay import metering_limits
    from streams.settings import get_settings as streams_settings

    settings = streams_settings()
    limits = metering_limits(settings)
    cutoff = now - timedelta(seconds=settle_s)  # postings older than the settle delay when the run started
    state = src.read_ledger(engine, topic, partitions, default_policy=ProjectPolicy(
        settings.unknown_subjects, settings.allowed_lateness_s))  # type: ignore[arg-type]
    marks = state.marks
    watermarks: dict[int, int] = {}
    life = ""
    if clickhouse is not None:
        life = src.clickhouse_life(bootstrap, topic)
        watermarks = src.clickhouse_watermarks(clickhouse, database, life, bootstrap=bootstrap, topic=topic,
                                               group=group, partitions=partitions)
    cuts = {p: min(watermarks.get(p, -1), marks.get(p, -1)) for p in range(partitions)}
    log_at_cut, log_at_mark, incomplete, _read = src.read_usage_log(bootstrap, topic, state, partitions=partitions,
                                                                    cuts=cuts, limits=limits, deadline=deadline)
    complete = [p for p in range(partitions) if p not in incomplete]
    ledger = src.ledger_units(state)
    log_units = src.merged(log_at_mark[p] for p in complete)
    readings: list[rc.Reading] = []
    coverage: dict[str, dict[str, Any]] = {
        rc.USAGE_LOG: {"compared": True, "through": {str(p): marks[p] for p in complete},
                    "incomplete_partitions": incomplete},
        rc.LEDGER: {"compared": True, "marks": {str(p): m for p, m in marks.items()}, "source": state.source_id},
    }
    if clickhouse is None:
        coverage[rc.CLICKHOUSE_USAGE] = coverage[rc.CLICKHOUSE_FLOW] = {"compared": False, "why": absent}
        readings.append(rc.Reading("units", "ledger mark", {rc.USAGE_LOG: log_units, rc.LEDGER: ledger}))
    else:
        ch_cuts = src.read_clickhouse_usage(clickhouse, database, life, state, partitions=partitions, cuts=cuts,
                                            limits=limits)
        settled = [p for p in complete if cuts[p] >= 0 and cuts[p] >= marks[p]]  # the sink reached the mark
        lagging = [p for p in complete if 0 <= cuts[p] < marks[p]]
        # a key is compared three ways when every partition it has counters in is settled
        keys_of: dict[rc.Key, set[int]] = {}
        for p in complete:
            for key in log_at_mark[p]:
                keys_of.setdefault(key, set()).add(p)
        for c in state.life:
            if c.source_topic == state.source_id:
                keys_of.setdefault(c.key, set()).add(c.partition)
        for p, counters in ch_cuts.items():
            for key in counters:
                keys_of.setdefault(key, set()).add(p)
        whole = {k for k, ps in keys_of.items() if ps <= set(settled)}
        ch_units = src.merged(ch_cuts[p] for p in complete if p in ch_cuts)
        three = {rc.USAGE_LOG: {k: v for k, v in log_units.items() if k in whole},
                 rc.LEDGER: {k: v for k, v in ledger.items() if k in whole},
                 rc.CLICKHOUSE_USAGE: {k: v for k, v in ch_units.items() if k in whole}}
        two = {rc.USAGE_LOG: {k: v for k, v in log_units.items() if k not in whole},
               rc.LEDGER: {k: v for k, v in ledger.items() if k not in whole}}
        readings.append(rc.Reading("units", "ledger mark", three))
        readings.append(rc.Reading("units", "ledger mark", two))
        if lagging:  # the sink is behind the ledger there: ClickHouse against the log at its own watermark
            part = [p for p in lagging if p in ch_cuts]
            log_cut = src.merged(log_at_cut[p] for p in part)
            ch_cut = src.merged(ch_cuts[p] for p in part)
            readings.append(rc.Reading("units", "clickhouse watermark",
                                    {rc.USAGE_LOG: {k: v for k, v in log_cut.items() if k not in whole},
                                     rc.CLICKHOUSE_USAGE: {k: v for k, v in ch_cut.items() if k not in whole}}))
        coverage[rc.CLICKHOUSE_USAGE] = {
            "compared": True, "life": life, "watermarks": {str(p): w for p, w in watermarks.items()},
            "settled_partitions": settled, "lagging_partitions": lagging,
            "not_settled_partitions": [p for p in complete if cuts[p] < 0 and marks[p] >= 0]}
        flow_ledger = src.read_ledger_flow(engine, cutoff)
        flow_ch = src.read_clickhouse_flow(clickhouse, database, cutoff)
        readings.append(rc.Reading("charged_minor", f"posted before {cutoff.isoformat()}",
                                {rc.LEDGER: flow_ledger, rc.CLICKHOUSE_FLOW: flow_ch}))
        coverage[rc.CLICKHOUSE_FLOW] = {"compared": True, "posted_before": cutoff.isoformat(), "settle_s": settle_s}

    prices = {k: c.price for k, c in state.charges.items()}

    def price(key: rc.Key, units: Any) -> int | None:
        model = prices.get(key)
        return None if model is None else price_minor(model, Decimal(units))

    return rc.compare_readings(readings, price=price), coverage


def run_leased(*, database_url: str, bootstrap: str, topic_prefix: str, clickhouse: Any | None,
               clickhouse_database: str, clickhouse_group: str | None, clickhouse_absent: str, settle_s: float,
               timeout_s: float = 3_600.0, holder: str | None = None) -> int | None:
    """``run_once`` under the lease ``RECONCILE_LEASE``; None (logged) when another process is running one."""
    from ledger.db import make_engine
    from ledger.scheduler import run_lease

    holder = holder or f"{socket.gethostname()}:{os.getpid()}:{threading.current_thread().name}"
    engine = make_engine(database_url, pool_size=2, application_name="meterline-reconcile-lease")
    try:
        with run_lease(engine, RECONCILE_LEASE, holder) as held:
            if not held:
                log.info("reconciliation_skipped", reason=f"another process holds the lease {RECONCILE_LEASE}")
                return None
            return run_once(database_url=database_url, bootstrap=bootstrap, topic_prefix=topic_prefix,
                            timeout_s=timeout_s, clickhouse=clickhouse, clickhouse_database=clickhouse_database,
                            clickhouse_group=clickhouse_group, clickhouse_absent=clickhouse_absent,
                            settle_s=settle_s)
    finally:
        engine.dispose()


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
    """The scheduler's ``reconcile_usage`` job, on the engines the scheduler itself uses (``LedgerSettings``) —
    none when the api owns an embedded ClickHouse (then the api runs it: meterline/reconcile_embedded.py)."""
    from analytics.settings import AnalyticsSettings
    from analytics.sink import sink_runs_in_api
    from ledger.settings import get_settings as ledger_settings
    from meterline.settings import get_settings

    interval_s = get_settings().reconcile_interval_s
    if interval_s <= 0:
        return []
    analytics = AnalyticsSettings()
    if sink_runs_in_api(analytics):  # chDB: one process per data path; the api owns it and logs that it runs the job
        return []
    engines = ledger_settings()
    settle_s = get_settings().reconcile_settle_s

    def run() -> None:
        client, absent = None, "no ClickHouse configured (CLICKHOUSE_URL)"
        if analytics.clickhouse_url and not analytics.embedded:
            from analytics.client import connect

            client = connect(analytics.clickhouse_url)
        elif analytics.embedded:
            absent = ("embedded ClickHouse (chdb://) is owned by another process (ANALYTICS_EMBEDDED_SINK_OWNER="
                      f"{analytics.embedded_sink_owner}); the scheduler cannot read it")
        try:
            run_leased(database_url=engines.database_url, bootstrap=engines.kafka_bootstrap_servers,
                       topic_prefix=engines.topic_prefix, clickhouse=client, clickhouse_database=analytics.database,
                       clickhouse_group=analytics.consumer_group, clickhouse_absent=absent, settle_s=settle_s)
        finally:
            if client is not None:
                client.close()

    reconciler = Reconciler(interval_s, run)

    def reconcile_usage(_conn: Connection, _now: datetime, _settings: LedgerSettings) -> int:
        return reconciler.tick()

    return [Job("reconcile_usage", CHECK_EVERY_S, reconcile_usage)]
