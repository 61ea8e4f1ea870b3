"""``meterline run scheduler``: the ledger's scheduler (ledger/scheduler.py) with the jobs of the layers above it.

The scheduler lives in ``ledger``, which may not import ``api``; the composition root hands it the ledger's
``JOBS`` plus the API's maintenance, so those run under the same lease, in bounded batches, and are logged like
every job (``scheduler_job_ran`` with the job's name and rows).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Connection

from api.erasure import erase_due
from api.idempotency import purge_older_than
from api.settings import IdempotencySettings
from ledger import scheduler
from ledger.scheduler import JOBS, Job
from ledger.settings import LedgerSettings

#: how often the API's purges run (like the ledger's purges)
PURGE_EVERY_S = 300.0
#: how often due account erasures are looked for (a grace period is days long; a minute late is fine)
ERASE_EVERY_S = 60.0


def api_jobs(settings: IdempotencySettings) -> list[Job]:
    retention = timedelta(seconds=settings.idempotency_retention_s)

    def purge_idempotency_records(conn: Connection, now: datetime, _settings: LedgerSettings) -> int:
        """Idempotency-Key records past ``API_IDEMPOTENCY_RETENTION_S`` (``now`` is the database's clock)."""
        return purge_older_than(conn, cutoff=now - retention)

    def erase_accounts(conn: Connection, now: datetime, _settings: LedgerSettings) -> int:
        """Account erasures whose grace period is over (api/erasure.py), a bounded batch per transaction."""
        return erase_due(conn, now=now)

    return [Job("purge_idempotency_records", PURGE_EVERY_S, purge_idempotency_records),
            Job("erase_accounts", ERASE_EVERY_S, erase_accounts)]


def jobs(settings: IdempotencySettings | None = None) -> list[Job]:
    """Everything ``meterline run scheduler`` runs: the ledger's jobs, then the API's."""
    return [*JOBS, *api_jobs(settings or IdempotencySettings())]


def main() -> None:
    scheduler.main(jobs=jobs())
