"""Keeping ``email_outbox`` honest: what must not be sent, what is kept how long, and retrying a failed row.

Run by the relay's ``deliver_emails`` job (api/tenancy/email_relay.py ``deliver_due``) before it claims rows, and by
the admin routes (api/tenancy/routes_email.py):
- **stale rows are not sent** (``skip_stale``): a due invitation email whose invitation is no longer pending
  (revoked, accepted, expired) or that a newer email of the same invitation superseded (resent: its link no longer
  works), and any row due for longer than ``API_EMAIL_MAX_AGE_S`` (``next_attempt_at`` that long ago: nobody sent it —
  turning SMTP on after a long development period must not send every old row; a retried row is due from its
  retry), is marked ``failed_at`` with the reason in ``last_error`` and its accept
  link removed. Rows are taken ``FOR UPDATE SKIP LOCKED``, like the claim, so a runner never waits on another.
- **no link in clear after sending** (``REDACT_SQL``): the ``sent_at`` update replaces the invitation token in the
  body; the row keeps who was mailed what and when. (The invitation stores only the token's hash; the body was the
  one clear copy.)
- **sent rows are purged** (``purge_sent``) ``API_EMAIL_SENT_RETENTION_S`` after sending, in batches.
- **retry** (``retry_failed``): an admin puts a failed row back to due (attempts 0) unless it is stale — then 409
  with the reason (a revoked or resent invitation's old email must stay unsent; resend the invitation instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, text

#: the invitation token (api/tenancy/invitations.py TOKEN_PREFIX + token_urlsafe) as a POSIX regex
TOKEN_PATTERN = "mli_[A-Za-z0-9_-]+"
REDACTED = "[link removed after sending]"
#: SQL expression: ``body_text`` without the invitation token (used where a row is sent or given up on)
REDACT_SQL = f"regexp_replace(body_text, '{TOKEN_PATTERN}', '{REDACTED}', 'g')"
PURGE_BATCH = 500

#: why a row must not be sent now (NULL: it may); ``o`` is the email_outbox row
_STALE_REASON = """
    CASE
      WHEN o.next_attempt_at < :cutoff
        THEN 'not sent: due since ' || o.next_attempt_at || ', longer than API_EMAIL_MAX_AGE_S (was SMTP off?)'
      WHEN i.id IS NOT NULL AND i.status <> 'pending'
        THEN 'not sent: the invitation is ' || i.status
      WHEN i.id IS NOT NULL AND i.expires_at <= :now
        THEN 'not sent: the invitation expired at ' || i.expires_at
      WHEN EXISTS (SELECT 1 FROM email_outbox n WHERE n.invitation_id = o.invitation_id AND n.id > o.id)
        THEN 'not sent: superseded by a newer email of the invitation (resent)'
    END"""

_SKIP_STALE = text(f"""
    WITH stale AS (
        SELECT o.id, {_STALE_REASON} AS reason
        FROM email_outbox o LEFT JOIN invitations i ON i.id = o.invitation_id
        WHERE o.sent_at IS NULL AND o.failed_at IS NULL AND o.next_attempt_at <= :now
          AND ({_STALE_REASON}) IS NOT NULL  -- lock ONLY stale rows: a live row stays free for another runner
        FOR UPDATE OF o SKIP LOCKED
    )
    UPDATE email_outbox e SET failed_at = :now, last_error = stale.reason, body_text = {REDACT_SQL.replace(
        'body_text', 'e.body_text')}
    FROM stale WHERE e.id = stale.id
    RETURNING e.id, e.kind, stale.reason
""")

_PURGE = text("""
    DELETE FROM email_outbox WHERE id IN (
        SELECT id FROM email_outbox WHERE sent_at < :before ORDER BY sent_at LIMIT :limit FOR UPDATE SKIP LOCKED)
""")


@dataclass(frozen=True, slots=True)
class OutboxHygiene:
    """``API_EMAIL_MAX_AGE_S`` and ``API_EMAIL_SENT_RETENTION_S`` (api/tenancy/email_settings.py)."""

    max_age_s: float = 7 * 24 * 3600.0
    sent_retention_s: float = 30 * 24 * 3600.0


def skip_stale(conn: Connection, *, now: datetime, hygiene: OutboxHygiene) -> list[tuple[int, str, str]]:
    """Mark the due rows that must not be sent failed, with the reason; returns (id, kind, reason) of each."""
    cutoff = now - timedelta(seconds=hygiene.max_age_s)
    return [(int(r.id), str(r.kind), str(r.reason))
            for r in conn.execute(_SKIP_STALE, {"now": now, "cutoff": cutoff}).all()]


def purge_sent(conn: Connection, *, now: datetime, hygiene: OutboxHygiene, limit: int = PURGE_BATCH) -> int:
    """Delete up to ``limit`` rows sent longer than the retention ago; how many."""
    before = now - timedelta(seconds=hygiene.sent_retention_s)
    return conn.execute(_PURGE, {"before": before, "limit": limit}).rowcount or 0


class NotRetryable(Exception):
    """The failed row must stay unsent (its invitation was revoked, accepted, expired or resent)."""


def list_emails(conn: Connection, *, project_id: str, state: str | None, limit: int) -> list[dict[str, Any]]:
    """A project's outbox rows, newest first, without their body (it may hold a live link)."""
    condition = {"failed": "failed_at IS NOT NULL", "sent": "sent_at IS NOT NULL",
                 "queued": "sent_at IS NULL AND failed_at IS NULL", None: "TRUE"}[state]
    rows = conn.execute(text(f"""
        SELECT id, to_address, subject, kind, invitation_id, created_at, sent_at, failed_at, attempts,
               next_attempt_at, last_error
        FROM email_outbox WHERE project_id = :p AND {condition} ORDER BY id DESC LIMIT :limit"""),
                        {"p": project_id, "limit": limit}).mappings().all()
    return [dict(r) for r in rows]


def retry_failed(conn: Connection, *, project_id: str, outbox_id: int, now: datetime) -> dict[str, Any] | None:
    """Put a failed row of the project back to due (attempts 0, tried at once). None: no failed row with this id
    in the project; ``NotRetryable``: it must stay unsent (the reason)."""
    row = conn.execute(text(f"""
        SELECT o.id, {_STALE_REASON} AS reason
        FROM email_outbox o LEFT JOIN invitations i ON i.id = o.invitation_id
        WHERE o.id = :id AND o.project_id = :p AND o.failed_at IS NOT NULL
        FOR UPDATE OF o"""), {"id": outbox_id, "p": project_id, "now": now,
                              "cutoff": datetime.min.replace(tzinfo=now.tzinfo)}).first()
    if row is None:
        return None
    if row.reason is not None:
        raise NotRetryable(f"{row.reason}; resend the invitation instead")
    conn.execute(text("""
        UPDATE email_outbox SET failed_at = NULL, attempts = 0, next_attempt_at = :now, last_error = NULL
        WHERE id = :id"""), {"id": outbox_id, "now": now})
    return list_emails_by_id(conn, outbox_id)


def list_emails_by_id(conn: Connection, outbox_id: int) -> dict[str, Any]:
    return dict(conn.execute(text("""
        SELECT id, to_address, subject, kind, invitation_id, created_at, sent_at, failed_at, attempts,
               next_attempt_at, last_error
        FROM email_outbox WHERE id = :id"""), {"id": outbox_id}).mappings().one())
