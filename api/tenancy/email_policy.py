"""The email relay's pure part: the SMTP URL, the message, what each SMTP outcome means, the retry schedule.

No I/O here (``api/tenancy/email_relay.py`` talks to the server and the database), so every decision is unit-tested.

Outcomes of one try, and what follows (``decide``):
- ``Accepted`` — the server answered 250 to the message: ``sent_at`` is set, never tried again.
- ``Refused`` with a 5xx reply to MAIL, RCPT or DATA — permanent (no such mailbox, policy): ``failed_at`` at once,
  ``last_error`` keeps the server's reply. Retrying would get the same answer.
- ``Refused`` with a 4xx (or any non-5xx) reply — transient (greylisting 451, mailbox busy 450, 421 closing).
- ``Unreachable`` — no session (connect, TLS, EHLO, login failed: a 5xx at login is our configuration, not the
  message's) or the connection was lost mid-message: transient.
- ``Unsendable`` — the row cannot become a message (a header with a line break, an address the server cannot
  take): permanent.
A transient outcome is retried after ``RetryPolicy.delay_s`` (doubling from ``API_EMAIL_RETRY_BASE_S`` up to
``API_EMAIL_RETRY_MAX_S``) until ``API_EMAIL_MAX_ATTEMPTS`` tries, then the row is failed ("gave up after …").
"""

from __future__ import annotations

import smtplib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.headerregistry import Address
from email.message import EmailMessage as MimeMessage
from email.utils import format_datetime, parseaddr
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

#: the longest ``last_error`` kept (server replies are short; a traceback would not be)
ERROR_CHARS_MAX = 1000

SMTP_URL_HELP = ("use smtp://[user:password@]host[:port] (plain, or STARTTLS with ?starttls=true) or "
                 "smtps://[user:password@]host[:port] (implicit TLS); percent-encode reserved characters in the "
                 "user and password, e.g. smtp://apikey:s%40cret@smtp.example.com:587?starttls=true")


class EmailConfigError(ValueError):
    """A setting the relay cannot work with; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    host: str
    port: int
    tls: Literal["none", "starttls", "implicit"]
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        """For logs: never the password."""
        user = f"{self.username}@" if self.username else ""
        return f"{user}{self.host}:{self.port} (tls: {self.tls})"


def parse_smtp_url(url: str) -> SmtpConfig:
    """``API_SMTP_URL`` → config, or ``EmailConfigError`` naming the problem and the expected form."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        raise EmailConfigError(f"API_SMTP_URL is not a valid URL ({error}); {SMTP_URL_HELP}") from error
    if parts.scheme not in ("smtp", "smtps"):
        raise EmailConfigError(f"API_SMTP_URL has scheme {parts.scheme or '(none)'!r}; {SMTP_URL_HELP}")
    if not parts.hostname:
        raise EmailConfigError(f"API_SMTP_URL names no host; {SMTP_URL_HELP}")
    if parts.path not in ("", "/") or parts.fragment:
        raise EmailConfigError(f"API_SMTP_URL has a path or fragment; {SMTP_URL_HELP}")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"starttls"})
    if unknown:
        raise EmailConfigError(f"API_SMTP_URL has unknown parameters {unknown} (only starttls=true|false)")
    starttls_value = query.get("starttls", ["false"])[-1].lower()
    if starttls_value not in ("true", "false"):
        raise EmailConfigError(f"API_SMTP_URL starttls must be true or false, not {starttls_value!r}")
    starttls = starttls_value == "true"
    if starttls and parts.scheme == "smtps":
        raise EmailConfigError("API_SMTP_URL: smtps:// is TLS from the first byte; drop ?starttls=true, or use "
                               "smtp://…?starttls=true for a server that upgrades (usually port 587)")
    if parts.password is not None and not parts.username:
        raise EmailConfigError(f"API_SMTP_URL has a password without a user; {SMTP_URL_HELP}")
    tls: Literal["none", "starttls", "implicit"] = (
        "implicit" if parts.scheme == "smtps" else "starttls" if starttls else "none")
    return SmtpConfig(host=parts.hostname, port=port or (465 if tls == "implicit" else 25), tls=tls,
                      username=unquote(parts.username) if parts.username else None,
                      password=unquote(parts.password) if parts.password is not None else None)


def parse_from_address(value: str) -> Address:
    """``API_EMAIL_FROM`` (``no-reply@example.com`` or ``Meterline <no-reply@example.com>``) → an Address."""
    name, addr = parseaddr(value)
    local, _, domain = addr.rpartition("@")
    if not local or not domain or any(c.isspace() for c in addr):
        raise EmailConfigError(f"API_EMAIL_FROM {value!r} is not an email address; e.g. "
                               "'Meterline <no-reply@example.com>' (an address your SMTP server may send from)")
    return Address(display_name=name, username=local, domain=domain)


@dataclass(frozen=True, slots=True)
class OutboxMail:
    """One ``email_outbox`` row as the relay sees it."""

    id: int
    to_address: str
    subject: str
    body_text: str
    kind: str
    created_at: datetime
    attempts: int


def build_message(mail: OutboxMail, *, sender: Address) -> MimeMessage:
    """The MIME message for a row: the same bytes on every try (Date = when it was queued, a Message-ID derived
    from the row), so a resend after a crash is recognisably the same message. Raises ``ValueError`` for a row
    that cannot be a message (e.g. a line break in a header)."""
    message = MimeMessage()
    message["From"] = sender
    message["To"] = mail.to_address
    message["Subject"] = mail.subject
    message["Date"] = format_datetime(mail.created_at)
    message["Message-ID"] = f"<meterline.{mail.kind}.{mail.id}.{int(mail.created_at.timestamp() * 1e6)}" \
                            f"@{sender.domain}>"
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation auto-replies to a no-reply sender
    message.set_content(mail.body_text)
    return message


@dataclass(frozen=True, slots=True)
class Accepted:
    pass


@dataclass(frozen=True, slots=True)
class Refused:
    """The server's reply to MAIL, RCPT or DATA."""

    code: int
    reply: str

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600


@dataclass(frozen=True, slots=True)
class Unreachable:
    error: str


@dataclass(frozen=True, slots=True)
class Unsendable:
    error: str


Outcome = Accepted | Refused | Unreachable | Unsendable


def _reply(message: bytes | str) -> str:
    return message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)


def describe_error(error: BaseException) -> str:
    """One line for ``last_error`` and the logs: the exception's type and the server's reply when it has one."""
    if isinstance(error, smtplib.SMTPResponseException):
        return f"{type(error).__name__}: {error.smtp_code} {_reply(error.smtp_error)}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def outcome_of(error: Exception) -> Outcome:
    """What ``smtplib`` raising ``error`` while sending ONE message (one recipient) means. Session set-up errors
    (connect, STARTTLS, login) are not classified here: they are ``Unreachable`` whatever their code."""
    if isinstance(error, smtplib.SMTPRecipientsRefused) and error.recipients:
        code, reply = next(iter(error.recipients.values()))
        return Refused(code, _reply(reply))
    if isinstance(error, smtplib.SMTPResponseException):  # sender refused (MAIL), data refused (DATA)
        return Refused(error.smtp_code, _reply(error.smtp_error))
    if isinstance(error, smtplib.SMTPNotSupportedError):  # e.g. a non-ASCII address and no SMTPUTF8 support
        return Unsendable(describe_error(error))
    return Unreachable(describe_error(error))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    base_s: float
    max_s: float

    def delay_s(self, failed_attempts: int) -> float:
        """Wait after the ``failed_attempts``-th transient failure: base, 2×base, 4×base … capped at max_s."""
        return min(self.max_s, self.base_s * 2.0 ** min(failed_attempts - 1, 62))


@dataclass(frozen=True, slots=True)
class Decision:
    """The row after one try: ``attempts`` and exactly one of sent / failed / retry at ``next_attempt_at``."""

    attempts: int
    state: Literal["sent", "failed", "retry"]
    next_attempt_at: datetime | None = None
    error: str | None = None


def decide(outcome: Outcome, *, attempts_before: int, now: datetime, policy: RetryPolicy) -> Decision:
    attempts = attempts_before + 1
    if isinstance(outcome, Accepted):
        return Decision(attempts, "sent")
    if isinstance(outcome, Refused):
        error = f"{outcome.code} {outcome.reply}".strip()
        permanent = outcome.permanent
    else:
        error = outcome.error
        permanent = isinstance(outcome, Unsendable)
    if permanent:
        return Decision(attempts, "failed", error=error[:ERROR_CHARS_MAX])
    if attempts >= policy.max_attempts:
        return Decision(attempts, "failed", error=f"gave up after {attempts} attempts: {error}"[:ERROR_CHARS_MAX])
    return Decision(attempts, "retry", next_attempt_at=now + timedelta(seconds=policy.delay_s(attempts)),
                    error=error[:ERROR_CHARS_MAX])
