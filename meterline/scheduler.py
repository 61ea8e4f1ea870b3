"""``meterline run scheduler``: the ledger's scheduler (ledger/scheduler.py) with the jobs of the layers above it.

The scheduler lives in ``ledger``, which may not import ``api``; the composition root hands it the ledger's
``JOBS`` plus the API's maintenance, so those run under the same lease, in bounded batches, and are logged like
every job (``scheduler_job_ran`` with the job's name and rows).

``deliver_emails`` (api/tenancy/email_relay.py) runs only when ``API_SMTP_URL`` is set; without it the outbox stays the
mailbox (development) and the start says so once. A bad SMTP setting stops the start with what to fix.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import structlog
from pydantic import ValidationError
from sqlalchemy import Connection

from api.payments.dunning import DunningSettings, expire_past_due
from api.payments.webhooks import purge_unverified
from api.settings import IdempotencySettings
from api.tenancy import sessions
from api.tenancy.email_relay import deliver_due, relay_for
from api.tenancy.email_settings import EmailDeliverySettings
from api.wallets.erasure import erase_due
from api.wallets.idempotency import purge_older_than
from ledger import scheduler
from ledger.scheduler import JOBS, Job
from ledger.settings import LedgerSettings
from meterline.reconcile_job import Reconciler, reconcile_jobs

#: how often the API's purges run (like the ledger's purges)
PURGE_EVERY_S = 300.0
#: how often due account erasures are looked for (a grace period is days long; a minute late is fine)
ERASE_EVERY_S = 60.0
#: how often queued emails are looked for (an invitee waits for the email)
EMAIL_EVERY_S = 5.0
#: how often past_due subscriptions past their grace period are expired (the grace is days long)
DUNNING_EVERY_S = 60.0
#: how often the receipts reconciliation looks whether a run is due (cheap: no I/O)
RECEIPTS_CHECK_EVERY_S = 30.0

log = structlog.get_logger("meterline.scheduler")


def api_jobs(settings: IdempotencySettings) -> list[Job]:
    retention = timedelta(seconds=settings.idempotency_retention_s)
    webhook_retention = timedelta(seconds=settings.webhook_unverified_retention_s)

    def purge_idempotency_records(conn: Connection, now: datetime, _settings: LedgerSettings) -> int:
        """Idempotency-Key records past ``API_IDEMPOTENCY_RETENTION_S`` (``now`` is the database's clock)."""
        return purge_older_than(conn, cutoff=now - retention)

    erasure_key = settings.erasure_pseudonym_key.get_secret_value().encode()

    def erase_accounts(conn: Connection, now: datetime, _settings: LedgerSettings) -> int:
        """Account erasures whose grace period is over (api/wallets/erasure.py), a bounded batch per transaction."""
        return erase_due(conn, now=now, key=erasure_key)

    def purge_webhook_deliveries(conn: Connection, now: datetime, _settings: LedgerSettings) -> int:
        """Rejected and duplicate webhook deliveries past ``API_WEBHOOK_UNVERIFIED_RETENTION_S`` (api/payments)."""
        return purge_unverified(conn, cutoff=now - webhook_retention)

    def purge_session_revocations(conn: Connection, now: datetime, _settings: LedgerSettings) -> int:
        """Session revocations older than every access token they could stop (api/tenancy/sessions.py)."""
        return sessions.purge_older_than(conn, cutoff=now - sessions.RETENTION)

    return [Job("purge_idempotency_records", PURGE_EVERY_S, purge_idempotency_records),
            Job("purge_session_revocations", PURGE_EVERY_S, purge_session_revocations),
            Job("erase_accounts", ERASE_EVERY_S, erase_accounts),
            Job("purge_webhook_deliveries", PURGE_EVERY_S, purge_webhook_deliveries)]


def analytics_erasure_jobs() -> list[Job]:
    """``erase_analytics`` (the ClickHouse pass of account erasure) when ClickHouse is a server this process may
    connect to. With embedded chDB only the process owning the data path may open it: the api runs the pass there
    (api/wallets/routes_erasure.py ``startup``; docs/erasure.md)."""
    from analytics.settings import AnalyticsSettings

    analytics = AnalyticsSettings()
    if not analytics.clickhouse_url.startswith("http"):
        return []

    def erase_analytics(conn: Connection, _now: datetime, _settings: LedgerSettings) -> int:
        """Rewrite ClickHouse for erased accounts (api/wallets/erasure_analytics.py)."""
        from analytics.client import connect
        from api.wallets.erasure_analytics import erase_analytics_due

        client = connect(analytics.clickhouse_url)
        try:
            return erase_analytics_due(conn, client, database=analytics.database)
        finally:
            client.close()

    return [Job("erase_analytics", ERASE_EVERY_S, erase_analytics)]


def email_jobs(settings: EmailDeliverySettings) -> list[Job]:
    """``deliver_emails`` when SMTP is configured, else nothing (logged: the outbox is the mailbox)."""
    relay = relay_for(settings)
    if relay is None:
        log.warning("email_delivery_off", detail="API_SMTP_URL is not set: emails (invitations) stay in "
                    "email_outbox and are not sent (development mode); set API_SMTP_URL and API_EMAIL_FROM to send")
        return []
    policy = settings.retry_policy
    log.info("email_delivery_on", smtp=relay.config.describe(), sender=str(relay.sender),
             max_attempts=policy.max_attempts)
    if relay.config.username and relay.config.tls == "none":
        log.warning("email_credentials_unencrypted", detail="API_SMTP_URL logs in without TLS; use smtps:// or "
                    "?starttls=true unless the server is on this host")

    def deliver_emails(conn: Connection, now: datetime, _settings: LedgerSettings) -> int:
        """A batch of due ``email_outbox`` rows over SMTP (api/tenancy/email_relay.py)."""
        return deliver_due(conn, now=now, relay=relay, policy=policy, hygiene=settings.hygiene)

    return [Job("deliver_emails", EMAIL_EVERY_S, deliver_emails)]


def dunning_jobs(settings: DunningSettings) -> list[Job]:
    grace_s = settings.dunning_grace_s

    def expire_past_due_entitlements(conn: Connection, now: datetime, _settings: LedgerSettings) -> int:
        """Entitlements past_due longer than ``API_DUNNING_GRACE_S`` → expired (api/payments/dunning.py)."""
        return expire_past_due(conn, now=now, grace_s=grace_s)

    return [Job("expire_past_due", DUNNING_EVERY_S, expire_past_due_entitlements)]


def receipts_jobs() -> list[Job]:
    """``reconcile_receipts``: every ``API_PAYMENTS_RECONCILE_INTERVAL_S`` (1 h; 0 = never) read RevenueCat and
    Lemon Squeezy for every project with an API key and apply what no webhook brought
    (api/payments/reconciliation.py). Provider calls take seconds to minutes, far over a job's budget and never
    inside the lease's transaction: like ``reconcile_usage`` the job only STARTS a run on a thread, one at a time."""
    from api.payments.reconcile_settings import ReconcileSettings
    from api.payments.reconciliation import reconcile_all
    from ledger.db import make_engine
    from ledger.settings import get_settings as ledger_settings

    settings = ReconcileSettings()
    if settings.payments_reconcile_interval_s <= 0:
        return []
    database_url = ledger_settings().database_url

    def run() -> None:
        engine = make_engine(database_url, pool_size=2, application_name="meterline-reconcile-receipts")
        try:
            found = reconcile_all(engine, settings, trigger="scheduler")
        finally:
            engine.dispose()
        log.info("receipts_reconciled", runs=len(found), fixed=sum(r.fixed for r in found),
                 errors=sum(len(r.errors) for r in found))

    reconciler = Reconciler(settings.payments_reconcile_interval_s, run)

    def reconcile_receipts(_conn: Connection, _now: datetime, _settings: LedgerSettings) -> int:
        return reconciler.tick()

    return [Job("reconcile_receipts", RECEIPTS_CHECK_EVERY_S, reconcile_receipts)]


def jobs(settings: IdempotencySettings | None = None, email: EmailDeliverySettings | None = None,
         dunning: DunningSettings | None = None) -> list[Job]:
    """Everything ``meterline run scheduler`` runs: the ledger's jobs, then the API's."""
    return [*JOBS, *api_jobs(settings or IdempotencySettings()), *email_jobs(email or EmailDeliverySettings()),
            *dunning_jobs(dunning or DunningSettings()), *reconcile_jobs(), *receipts_jobs(),
            *analytics_erasure_jobs()]


def main() -> None:
    try:
        todo = jobs()
    except ValidationError as error:  # e.g. an unparsable API_SMTP_URL: refuse to start, saying what to fix
        problems = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in error.errors())
        log.error("scheduler_refused_to_start", code="api.settings_invalid", error=problems)
        raise SystemExit(2) from error
    scheduler.main(jobs=todo)
