"""Prometheus metrics of the ledger process, the scheduler, and the consumer lag every consumer reports.

Definitions live per component (ledger/metrics.py, streams/metrics.py, analytics/metrics.py, api/metrics.py) in
the process-wide default registry; each process serves them at ``/metrics`` (ledger/probes.py; the API on its own
port). Names carry their unit (``_seconds``, ``_messages``, ``_rows``) and counters end in ``_total``.

Consumer lag (``meterline_consumer_lag_messages``) is defined here, once, because every consumer (streams,
ledger, analytics) reports it and two components can share a process (the embedded API runs the analytics sink).
What it means, given the local broker's bugs (DESIGN §5: ListOffsets LATEST and the high watermark are "start of
the last batch + 1"): ``max(0, high watermark from the consumer's latest fetch response − next offset the
process has finished with)``. The process never asks the broker for end offsets. On Apache Kafka this is the
usual lag; on Tansu the high watermark trails the real end by up to one producer batch, so the lag reads low by
at most that batch (and 0 once the process has finished its last fetched message). It is "work this process can
see and has not done", never proof that everything was consumed — that proof is the ledger's applied marks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "APPLY_SECONDS", "CHECKPOINTS", "CHECKPOINT_EMIT_TO_APPLY_SECONDS", "CHECKPOINT_QUEUE_SECONDS", "CONSUMER_LAG",
    "DB_RETRIES", "INVARIANT_CHECK_LAST_RUN", "INVARIANT_VIOLATIONS", "OUTBOX_BACKLOG", "OUTBOX_PUBLISHED",
    "QUEUE_CHECKPOINTS", "RECONCILIATION_DRIFT_MINOR", "RECONCILIATION_DRIFT_WALLETS", "RECONCILIATION_LAST_RUN",
    "SCHEDULER_JOB_RUNS", "SCHEDULER_JOB_SECONDS", "SETTLED_KEYS", "SETTLE_FAILURES", "SETTLE_SECONDS", "forget_lag", "record_invariant_check", "record_lag",
    "record_reconciliation",
]

#: latency buckets from 5 ms to 2 min: checkpoint latency is ~100 ms idle and seconds under a backlog
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

CONSUMER_LAG = Gauge(
    "meterline_consumer_lag_messages",
    "Messages behind the high watermark of the consumer's latest fetch (0 when caught up; see ledger/metrics.py "
    "for what it means on a broker whose high watermark is wrong)",
    ["group", "topic", "partition"])


def record_lag(group: str, topic: str, partition: int, *, next_offset: int, high_watermark: int) -> None:
    """Set the lag of one partition; an unknown watermark (< 0) leaves the last value."""
    if high_watermark < 0 or next_offset < 0:
        return
    CONSUMER_LAG.labels(group, topic, str(partition)).set(max(0, high_watermark - next_offset))


def forget_lag(group: str, topic: str, partition: int) -> None:
    """A revoked partition is no longer this process's lag (another member reports it)."""
    with contextlib.suppress(KeyError):
        CONSUMER_LAG.remove(group, topic, str(partition))


# -- the ledger consumer (ledger/consumer.py) -----------------------------------------------------------------
CHECKPOINTS = Counter("meterline_ledger_checkpoints_total",
                      "Checkpoints handled by the ledger consumer by outcome (applied, stale, undecodable)",
                      ["outcome"])
CHECKPOINT_EMIT_TO_APPLY_SECONDS = Histogram(
    "meterline_ledger_checkpoint_emit_to_apply_seconds",
    "From the worker emitting a checkpoint (its emitted_at) to the ledger's commit of it", buckets=_LATENCY_BUCKETS)
CHECKPOINT_QUEUE_SECONDS = Histogram(
    "meterline_ledger_checkpoint_queue_seconds",
    "From the worker emitting a checkpoint to the ledger starting to apply it (time in the queue)",
    buckets=_LATENCY_BUCKETS)
APPLY_SECONDS = Histogram("meterline_ledger_apply_seconds",
                          "One database transaction applying a partition's (merged) checkpoints",
                          buckets=_LATENCY_BUCKETS)
QUEUE_CHECKPOINTS = Gauge("meterline_ledger_queue_checkpoints",
                          "Checkpoints fetched by the ledger consumer and not yet applied and committed")
DB_RETRIES = Counter("meterline_ledger_db_retries_total", "Checkpoint applications retried after a database error")

# -- the outbox relay (ledger/outbox.py) ----------------------------------------------------------------------
OUTBOX_BACKLOG = Gauge("meterline_outbox_backlog_rows",
                       "Outbox rows committed and not yet published (counted at most every 2 s, capped at 1M)")
OUTBOX_PUBLISHED = Counter("meterline_outbox_published_rows_total", "Outbox rows published and marked")

# -- usage settled later (ledger/settle.py) ---------------------------------------------------------------------
SETTLED_KEYS = Counter("meterline_ledger_settled_keys_total",
                       "Usage keys the settle pass posted (one usage transaction each)")
SETTLE_SECONDS = Histogram("meterline_ledger_settle_seconds", "Duration of one settle pass (every unsettled key)",
                           buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
SETTLE_FAILURES = Counter("meterline_ledger_settle_failures_total",
                          "Settle passes that failed (retried at the next interval; nothing is lost)")

# -- the scheduler (ledger/scheduler.py) ----------------------------------------------------------------------
SCHEDULER_JOB_RUNS = Counter("meterline_scheduler_job_runs_total", "Scheduler job runs by job and outcome (ok, failed)",
                             ["job", "outcome"])
SCHEDULER_JOB_SECONDS = Histogram("meterline_scheduler_job_seconds", "Duration of one scheduler job run", ["job"],
                                  buckets=_LATENCY_BUCKETS)

# -- the money invariant check ----------------------------------------------------------------------------------
#: Set by the invariant-check job (one label per check it runs; 0 = holds). ``meterline status`` reports any
#: non-zero value as unhealthy; never run = no samples, and status says "not run".
INVARIANT_VIOLATIONS = Gauge("meterline_invariant_check_violations",
                             "Violations found by the latest run of each money-invariant check (0 = holds)",
                             ["check"])
INVARIANT_CHECK_LAST_RUN = Gauge("meterline_invariant_check_last_run_timestamp_seconds",
                                 "Unix time of the latest completed invariant check run")


def record_invariant_check(violations: Mapping[str, int], *, now: float | None = None) -> None:
    """What the invariant-check job calls after each run: violations per check name (0 for a check that held)."""
    for check, count in violations.items():
        INVARIANT_VIOLATIONS.labels(check).set(count)
    INVARIANT_CHECK_LAST_RUN.set(time.time() if now is None else now)


# -- continuous reconciliation (meterline/reconcile_job.py) ------------------------------------------------------
#: Set by the reconcile_usage job after each finished report (in the scheduler, or in the api when it owns an
#: embedded ClickHouse: meterline/reconcile_embedded.py) (ledger/reconcile_compare.py): per record
#: (usage_log, ledger, clickhouse_usage, clickhouse_flow), the wallets on which it disagrees with the others; per
#: pair "reference/disagreeing", the absolute money drift. deploy/prometheus/rules/reconciliation.yml alerts on
#: any wallet; ``meterline status`` reports it as unhealthy like a violated invariant check.
RECONCILIATION_DRIFT_WALLETS = Gauge("meterline_reconciliation_drift_wallets",
                                     "Wallets on which a record disagrees with the others in the latest "
                                     "reconciliation (0 = agrees everywhere)", ["record"])
RECONCILIATION_DRIFT_MINOR = Gauge("meterline_reconciliation_drift_minor",
                                   "Absolute money drift (minor units) per record pair reference/disagreeing in the "
                                   "latest reconciliation", ["pair"])
RECONCILIATION_COMPARED = Gauge("meterline_reconciliation_record_compared",
                                "1 when the latest reconciliation compared the record, 0 when it could not "
                                "(not settled, or ClickHouse not reachable from the process that ran it)", ["record"])
RECONCILIATION_LAST_RUN = Gauge("meterline_reconciliation_last_run_timestamp_seconds",
                                "Unix time of the latest finished reconciliation report")
_DRIFT_PAIRS = ("usage_log/ledger", "usage_log/clickhouse_usage", "ledger/clickhouse_flow")


def record_reconciliation(wallets: Mapping[str, int], drift_minor: Mapping[str, int], compared: Mapping[str, bool],
                          *, now: float | None = None) -> None:
    """What the reconcile job calls after each report; pairs without drift this time are set back to 0."""
    for record, count in wallets.items():
        RECONCILIATION_DRIFT_WALLETS.labels(record).set(count)
    seen = {labels[0] for labels in RECONCILIATION_DRIFT_MINOR._metrics} | set(_DRIFT_PAIRS)
    for pair in seen:
        RECONCILIATION_DRIFT_MINOR.labels(pair).set(drift_minor.get(pair, 0))
    for pair, amount in drift_minor.items():
        RECONCILIATION_DRIFT_MINOR.labels(pair).set(amount)
    for record, ok in compared.items():
        RECONCILIATION_COMPARED.labels(record).set(1 if ok else 0)
    RECONCILIATION_LAST_RUN.set(time.time() if now is None else now)
