"""Outgoing email behind a small interface.

``OutboxEmailSender`` (the default) writes to ``email_outbox`` in the caller's transaction: an invitation
and its email commit together, so a rolled-back invitation never sends mail and a committed one always
has its message queued. With ``API_SMTP_URL`` set, the scheduler's ``deliver_emails`` job (api/tenancy/email_relay.py)
sends due rows over SMTP and sets ``sent_at`` (or ``failed_at``); without it (development) the outbox IS the
mailbox (read it with SQL or the tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Connection, text


@dataclass(frozen=True, slots=True)
class EmailMessage:
    to: str
    subject: str
    body_text: str
    kind: str  # e.g. "invitation"
    project_id: str | None = None
    invitation_id: str | None = None  # lets the relay skip it once the invitation is revoked or resent


class EmailSender(Protocol):
    def send(self, conn: Connection, message: EmailMessage) -> int:
        """Queue ``message`` in the caller's transaction; return its outbox id."""
        ...


class OutboxEmailSender:
    def send(self, conn: Connection, message: EmailMessage) -> int:
        return int(conn.execute(text("""
            INSERT INTO email_outbox (to_address, subject, body_text, kind, project_id, invitation_id)
            VALUES (:to, :subject, :body, :kind, :project_id, :invitation_id) RETURNING id"""),
            {"to": message.to, "subject": message.subject, "body": message.body_text, "kind": message.kind,
             "project_id": message.project_id, "invitation_id": message.invitation_id}).scalar_one())


def default_sender() -> EmailSender:
    return OutboxEmailSender()
