"""The production relay for ``email_outbox``: the scheduler's ``deliver_emails`` job sends due rows over SMTP.

``OutboxEmailSender`` (api/tenancy/email.py) queues a row in the transaction of what it announces. ``deliver_due`` then,
in ONE short transaction per batch (the scheduler's job transaction, fenced by its lease):
1. claims up to ``BATCH`` due rows (unsent, not failed, ``next_attempt_at`` come) ``FOR UPDATE SKIP LOCKED`` —
   a second runner (a lease takeover overlapping, a second process) skips them and takes the next ones;
2. opens one SMTP session (``smtplib``; implicit TLS, STARTTLS or plain, login when the URL has a user) and sends
   each row as its own message (``api.tenancy.email_policy.build_message``);
3. writes each row's outcome (``api.tenancy.email_policy.decide``): ``sent_at`` once the server accepted it, else
   ``attempts``/``last_error``/``next_attempt_at`` (backoff) or ``failed_at``; the commit releases the rows.

Invariant: a committed row is sent at least once and, barring a crash (or a lost database connection) between
the server's acceptance and the commit of ``sent_at`` — at most one batch of ``BATCH`` rows — exactly once: a row
is locked from claim to commit, so no two runners hold it at once, and once ``sent_at`` is committed no runner
claims it again. A rolled-back invitation rolled back its row too, so nothing is ever sent for it.
If no session can be opened, every claimed row counts a transient attempt; if the connection drops mid-batch,
the row being sent counts one and the rest are left as they were (claimed again at once, by a fresh session).
"""

from __future__ import annotations

import contextlib
import smtplib
import ssl
from collections.abc import Iterator, Sequence
from datetime import datetime
from email.headerregistry import Address

import structlog
from sqlalchemy import Connection, text

from api.tenancy.email_outbox import REDACT_SQL, OutboxHygiene, purge_sent, skip_stale
from api.tenancy.email_policy import (
    Accepted,
    OutboxMail,
    Outcome,
    Refused,
    RetryPolicy,
    SmtpConfig,
    Unreachable,
    Unsendable,
    build_message,
    decide,
    describe_error,
    outcome_of,
    parse_from_address,
)
from api.tenancy.email_settings import EmailDeliverySettings

log = structlog.get_logger("api.email_relay")

#: rows per transaction (and per SMTP session); also the most a crash between acceptance and commit can resend
BATCH = 10

_CLAIM = text("""
    SELECT id, to_address, subject, body_text, kind, created_at, attempts FROM email_outbox
    WHERE sent_at IS NULL AND failed_at IS NULL AND next_attempt_at <= :now
    ORDER BY next_attempt_at, id LIMIT :limit FOR UPDATE SKIP LOCKED
""")
# Once a mail has left (or never will), its secrets have no business in the table: an invitation's accept link
# (a bearer credential until it expires) is replaced by a marker in the stored copy (api/tenancy/email_outbox.py).
# Unsent rows keep it: they are what the relay sends (and, without SMTP in development, the outbox is the mailbox).
_SENT = text(f"""
    UPDATE email_outbox SET attempts = :attempts, sent_at = :now, last_error = NULL, body_text = {REDACT_SQL}
    WHERE id = :id""")
_FAILED = text(f"""
    UPDATE email_outbox SET attempts = :attempts, failed_at = :now, last_error = :error, body_text = {REDACT_SQL}
    WHERE id = :id""")
_RETRY = text("""
    UPDATE email_outbox SET attempts = :attempts, next_attempt_at = :next, last_error = :error WHERE id = :id
""")


class SmtpRelay:
    """Sends messages through one SMTP server; every session is opened for one batch and closed after it."""

    def __init__(self, config: SmtpConfig, *, sender: Address, timeout_s: float) -> None:
        self.config = config
        self.sender = sender
        self.timeout_s = timeout_s

    @staticmethod
    def _context() -> ssl.SSLContext:
        """Certificate and host name verified against the system's CAs (``SSL_CERT_FILE`` adds a private CA)."""
        return ssl.create_default_context()

    @contextlib.contextmanager
    def _session(self) -> Iterator[smtplib.SMTP]:
        c = self.config
        session: smtplib.SMTP = (
            smtplib.SMTP_SSL(c.host, c.port, timeout=self.timeout_s, context=self._context())
            if c.tls == "implicit" else smtplib.SMTP(c.host, c.port, timeout=self.timeout_s))
        try:
            session.ehlo()
            if c.tls == "starttls":
                session.starttls(context=self._context())
                session.ehlo()
            if c.username:
                session.login(c.username, c.password or "")
            yield session
        finally:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                session.quit()
            session.close()

    def deliver(self, mails: Sequence[OutboxMail]) -> list[tuple[OutboxMail, Outcome]]:
        """Try each mail in order over one session; the outcome of every mail tried (a dropped connection ends the
        batch: the mails after it are not tried and not in the result)."""
        results: list[tuple[OutboxMail, Outcome]] = []
        try:
            with self._session() as session:
                for mail in mails:
                    outcome = self._send_one(session, mail)
                    results.append((mail, outcome))
                    if isinstance(outcome, Unreachable) or (isinstance(outcome, Refused) and outcome.code == 421):
                        break  # the session is gone (421: the server closes it)
        except (smtplib.SMTPException, OSError) as error:  # no session: connect, TLS, EHLO or login failed
            if results:  # only from closing a session that delivered: the outcomes stand
                return results
            return [(mail, Unreachable(describe_error(error))) for mail in mails]
        return results

    def _send_one(self, session: smtplib.SMTP, mail: OutboxMail) -> Outcome:
        try:
            message = build_message(mail, sender=self.sender)
        except ValueError as error:
            return Unsendable(describe_error(error))
        try:
            session.send_message(message, from_addr=self.sender.addr_spec, to_addrs=[mail.to_address])
        except (smtplib.SMTPException, OSError, UnicodeError) as error:
            return Unsendable(describe_error(error)) if isinstance(error, UnicodeError) else outcome_of(error)
        return Accepted()


def deliver_due(conn: Connection, *, now: datetime, relay: SmtpRelay, policy: RetryPolicy,
                limit: int = BATCH, hygiene: OutboxHygiene | None = None) -> int:
    """The ``deliver_emails`` job: one batch in the caller's transaction; returns how many rows were tried (the
    scheduler calls it again, in a new transaction, while it returns more than 0 and its budget lasts). First the
    rows that must not be sent (revoked / resent / no longer pending invitations, rows due too long) are marked
    failed with the reason, and sent rows past their retention are purged (api/tenancy/email_outbox.py)."""
    hygiene = hygiene or OutboxHygiene()
    for outbox_id, kind, reason in skip_stale(conn, now=now, hygiene=hygiene):
        log.info("email_not_sent", outbox_id=outbox_id, kind=kind, reason=reason)
    purged = purge_sent(conn, now=now, hygiene=hygiene)
    if purged:
        log.info("email_sent_rows_purged", rows=purged)
    rows = conn.execute(_CLAIM, {"now": now, "limit": limit}).mappings().all()
    if not rows:
        return 0
    tried = relay.deliver([OutboxMail(**row) for row in rows])
    for mail, outcome in tried:
        decision = decide(outcome, attempts_before=mail.attempts, now=now, policy=policy)
        if decision.state == "sent":
            conn.execute(_SENT, {"id": mail.id, "attempts": decision.attempts, "now": now})
            continue
        if decision.state == "failed":
            conn.execute(_FAILED, {"id": mail.id, "attempts": decision.attempts, "now": now, "error": decision.error})
        else:
            conn.execute(_RETRY, {"id": mail.id, "attempts": decision.attempts, "next": decision.next_attempt_at,
                                  "error": decision.error})
        (log.error if decision.state == "failed" else log.warning)(
            "email_not_delivered", outbox_id=mail.id, kind=mail.kind, state=decision.state,
            attempts=decision.attempts, error=decision.error, next_attempt_at=decision.next_attempt_at)
    return len(tried)


def relay_for(settings: EmailDeliverySettings) -> SmtpRelay | None:
    """The relay the settings describe; None in development (no ``API_SMTP_URL``)."""
    config = settings.smtp
    if config is None:
        return None
    return SmtpRelay(config, sender=parse_from_address(settings.email_from), timeout_s=settings.smtp_timeout_s)
