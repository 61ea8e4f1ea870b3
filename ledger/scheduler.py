"""The scheduler (``meterline run scheduler``): maintenance jobs, one runner at a time.

Single runner via a LEASE ROW in PostgreSQL (table scheduler_leases): a holder takes the lease when it is
free or expired and renews it every round; a holder that stops renewing (crash, pause, partition) loses
it after ``scheduler_lease_s``. A row rather than a pg advisory lock, because the lease survives
connection drops, is visible to operators (``SELECT * FROM scheduler_leases``) and needs no dedicated
connection held open. Each job transaction re-checks the lease (fencing), and every job is idempotent
anyway (conditional updates, idempotency keys), so an overlap during a takeover cannot double-post.

Jobs are a small registry (``JOBS``): name, period, function(conn, now, settings) -> rows affected.
Billing rules (ledger/billing.py) are one of the jobs.

Work that outlives a job's round (a replay of the whole usage log, on a thread) takes a lease row of its own
(``run_lease``: short TTL, renewed by a thread while the work runs, released at its end) so two processes that may
both start it — the scheduler, and the api when it owns an embedded ClickHouse — never run it at the same time.

Jobs are independent: a job that raises is logged (``scheduler_job_failed``) and retried next round, and
the jobs after it still run. A job with a backlog works it off in short transactions for at most
``scheduler_job_budget_s`` per round, then yields to the others and stays due, so one large purge cannot
hold back hold expiry or billing for minutes.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import FrameType

import structlog
from sqlalchemy import Connection, Engine, text

from ledger import metrics, schema_migrations
from ledger.billing import run_due
from ledger.consumer import MIGRATIONS, VERSION_TABLE, MigrationsPending
from ledger.db import make_engine
from ledger.expiry import expire_credits, expire_holds
from ledger.invariant_check import check_invariants
from ledger.probes import Check, database_check, start_probe_server
from ledger.settings import LedgerSettings, get_settings

__all__ = ["JOBS", "LEASE_NAME", "Job", "Scheduler", "main", "run_lease"]

log = structlog.get_logger("ledger.scheduler")

LEASE_NAME = "ledger.scheduler"

_ACQUIRE = text("""
    INSERT INTO scheduler_leases (name, holder, expires_at) VALUES (:name, :holder, now() + make_interval(secs => :ttl))
    ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at, renewed_at = now()
    WHERE scheduler_leases.holder = EXCLUDED.holder OR scheduler_leases.expires_at < now()
    RETURNING holder
""")
_STILL_HOLDER = text("""
    SELECT 1 FROM scheduler_leases WHERE name = :name AND holder = :holder AND expires_at > now() FOR SHARE
""")
_RELEASE = text("DELETE FROM scheduler_leases WHERE name = :name AND holder = :holder")


@contextmanager
def run_lease(engine: Engine, name: str, holder: str, *, ttl_s: float = 60.0) -> Iterator[bool]:
    """Hold the lease row ``name`` for the duration of the block; yields False (and holds nothing) when another live
    holder has it. While held, a thread renews it every ``ttl_s / 3``, so a holder that dies frees it within
    ``ttl_s`` while a long run keeps it. A renewal that finds the lease gone (this process paused past the TTL and
    another took it) is logged; the block is not interrupted — lease holders must do work an overlap cannot harm."""
    with engine.begin() as conn:
        taken = conn.execute(_ACQUIRE, {"name": name, "holder": holder, "ttl": ttl_s}).one_or_none() is not None
    if not taken:
        yield False
        return
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl_s / 3):
            try:
                with engine.begin() as conn:
                    if conn.execute(_ACQUIRE, {"name": name, "holder": holder, "ttl": ttl_s}).one_or_none() is None:
                        log.warning("run_lease_lost", lease=name, holder=holder)
            except Exception as exc:  # PostgreSQL away for a moment: the next renewal tries again
                log.warning("run_lease_renew_failed", lease=name, holder=holder, error=str(exc)[:200])

    renewer = threading.Thread(target=renew, name=f"lease-{name}", daemon=True)
    renewer.start()
    try:
        yield True
    finally:
        stop.set()
        renewer.join(10)
        try:
            with engine.begin() as conn:
                conn.execute(_RELEASE, {"name": name, "holder": holder})
        except Exception as exc:  # it expires by itself within ttl_s
            log.warning("run_lease_release_failed", lease=name, holder=holder, error=str(exc)[:200])


@dataclass(frozen=True)
class Job:
    name: str
    every_s: float
    run: Callable[[Connection, datetime, LedgerSettings], int]


def _expire_holds(conn: Connection, now: datetime, _settings: LedgerSettings) -> int:
    return expire_holds(conn, now=now)


def _expire_credits(conn: Connection, now: datetime, _settings: LedgerSettings) -> int:
    return expire_credits(conn, now=now)


def _purge_dedupe_keys(conn: Connection, now: datetime, settings: LedgerSettings) -> int:
    """Dedupe keys older than the horizon can no longer catch a duplicate streams would accept. A row holds one
    checkpoint's keys (hundreds to tens of thousands), so a round deletes at most 1,000 rows."""
    return conn.execute(text("""
        DELETE FROM dedupe_key_sets WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM dedupe_key_sets WHERE seen_at < :cutoff LIMIT 1000))
    """), {"cutoff": now - timedelta(seconds=settings.dedupe_horizon_s)}).rowcount


def _purge_outbox(conn: Connection, now: datetime, settings: LedgerSettings) -> int:
    """Published rows are only kept for inspection; unpublished rows are never purged."""
    return conn.execute(text("""
        DELETE FROM outbox WHERE id = ANY(ARRAY(
            SELECT id FROM outbox WHERE published_at < :cutoff ORDER BY published_at LIMIT 50000))
    """), {"cutoff": now - timedelta(seconds=settings.outbox_retention_s)}).rowcount


def _billing_rules(conn: Connection, now: datetime, _settings: LedgerSettings) -> int:
    return run_due(conn, now=now)


def _check_invariants(conn: Connection, _now: datetime, _settings: LedgerSettings) -> int:
    """Balance = Σ postings, the balance chain, bucket sums, allocations (ledger/invariant_check.py). One full pass
    per run (0 rows: never a backlog to continue); violations are logged and recorded, never repaired."""
    check_invariants(conn)
    return 0


JOBS: list[Job] = [
    Job("expire_holds", 1.0, _expire_holds),
    Job("billing_rules", 5.0, _billing_rules),
    Job("expire_credits", 5.0, _expire_credits),
    Job("purge_dedupe_keys", 300.0, _purge_dedupe_keys),
    Job("purge_outbox", 300.0, _purge_outbox),
    Job("check_invariants", 300.0, _check_invariants),
]


class Scheduler:
    def __init__(self, *, engine: Engine, settings: LedgerSettings, jobs: list[Job] | None = None,
                 holder: str | None = None) -> None:
        self._engine = engine
        self._settings = settings
        self._jobs = list(JOBS if jobs is None else jobs)
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._last_run: dict[str, float] = {}
        #: job name -> the error of its last failed run; cleared when it runs again without one
        self.failures: dict[str, str] = {}
        #: readiness: when the last round ended without a round error, and whether it held the lease
        self.round_at: float | None = None
        self.holding = False

    def acquire(self) -> bool:
        """Take or renew the lease; False when another live holder has it."""
        with self._engine.begin() as conn:
            row = conn.execute(_ACQUIRE, {"name": LEASE_NAME, "holder": self.holder,
                                          "ttl": self._settings.scheduler_lease_s}).one_or_none()
        return row is not None

    def release(self) -> None:
        with self._engine.begin() as conn:
            conn.execute(_RELEASE, {"name": LEASE_NAME, "holder": self.holder})

    def run_round(self, *, now: datetime | None = None, force: bool = False) -> dict[str, int] | None:
        """Run every due job (all of them with ``force``) while holding the lease; name -> rows affected by the
        jobs that ran without an error (failed ones are in ``failures``). None when another holder has the lease."""
        if not self.acquire():
            return None
        results: dict[str, int] = {}
        for job in self._jobs:
            due = force or time.monotonic() - self._last_run.get(job.name, float("-inf")) >= job.every_s
            if not due:
                continue
            started = time.monotonic()
            try:
                results[job.name] = self._run_job(job, now)
            except Exception as error:  # one job's failure must not starve the others
                self.failures[job.name] = f"{type(error).__name__}: {error}"
                metrics.SCHEDULER_JOB_RUNS.labels(job.name, "failed").inc()
                log.exception("scheduler_job_failed", job=job.name)
            else:
                self.failures.pop(job.name, None)
                metrics.SCHEDULER_JOB_RUNS.labels(job.name, "ok").inc()
            metrics.SCHEDULER_JOB_SECONDS.labels(job.name).observe(time.monotonic() - started)
        return results

    def readiness_checks(self) -> dict[str, Check]:
        """Rounds keep turning (a round waits ``scheduler_interval_s``; three missed = stuck). Whether this
        process holds the lease is a detail, not a failure: a standby is ready to take over."""
        def rounds() -> tuple[bool, str]:
            if self.round_at is None:
                return False, "no round yet"
            ago = time.monotonic() - self.round_at
            stale = ago > 3 * self._settings.scheduler_interval_s + self._settings.scheduler_job_budget_s * len(
                self._jobs)
            return not stale, f"last round {ago:.1f} s ago ({'holding the lease' if self.holding else 'standby'})"
        return {"rounds": rounds}

    def _run_job(self, job: Job, now: datetime | None) -> int:
        started = time.monotonic()
        total = 0
        backlog_left = False
        # work off a backlog in bounded batches, each its own short transaction, within the round's budget
        while True:
            with self._engine.begin() as conn:
                if conn.execute(_STILL_HOLDER, {"name": LEASE_NAME, "holder": self.holder}).first() is None:
                    log.warning("scheduler_lease_lost", job=job.name, holder=self.holder)
                    break
                moment = now or conn.execute(text("SELECT now()")).scalar_one()
                done = job.run(conn, moment, self._settings)
            total += done
            if done == 0:
                break
            if time.monotonic() - started >= self._settings.scheduler_job_budget_s:
                backlog_left = True
                break
        if not backlog_left:  # a job with work left stays due, so the next round continues it
            self._last_run[job.name] = time.monotonic()
        log.info("scheduler_job_ran", job=job.name, rows=total, backlog_left=backlog_left,
                 duration_ms=round((time.monotonic() - started) * 1000, 1))
        return total

    def run(self, stop: threading.Event) -> None:
        log.info("scheduler_started", holder=self.holder, jobs=[j.name for j in self._jobs])
        holding = False
        while not stop.is_set():
            try:
                results = self.run_round()
                self.round_at, self.holding = time.monotonic(), results is not None
                if (results is not None) != holding:
                    holding = results is not None
                    log.info("scheduler_lease_taken" if holding else "scheduler_lease_held_elsewhere",
                             holder=self.holder)
            except Exception:
                log.exception("scheduler_round_failed")
            stop.wait(self._settings.scheduler_interval_s)
        self.release()
        log.info("scheduler_stopped", holder=self.holder)


def main(jobs: list[Job] | None = None) -> None:
    """``jobs``: what to run (default ``JOBS``); the composition root adds the jobs of the layers above the
    ledger, which this package may not import (meterline/scheduler.py)."""
    settings = get_settings()
    todo = schema_migrations.pending(settings.database_url, script_location=MIGRATIONS, version_table=VERSION_TABLE)
    if todo:
        error = MigrationsPending(f"ledger migrations are pending ({', '.join(todo)}); run `meterline migrate`")
        log.error("scheduler_refused_to_start", code=error.code, error=str(error))
        raise SystemExit(2)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    engine = make_engine(settings.database_url, pool_size=2, application_name="meterline-scheduler")
    scheduler = Scheduler(engine=engine, settings=settings, jobs=jobs)
    probes = None
    if settings.scheduler_metrics_port >= 0:
        probes = start_probe_server("scheduler", host=settings.metrics_host, port=settings.scheduler_metrics_port,
                                    checks={"database": database_check(engine), **scheduler.readiness_checks()})
    try:
        scheduler.run(stop)
    finally:
        if probes is not None:
            probes.stop()
        engine.dispose()
