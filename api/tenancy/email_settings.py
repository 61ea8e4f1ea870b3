"""The SMTP relay's settings (prefix ``API_``), read by the scheduler only (its ``deliver_emails`` job).

Beside the email code rather than in ``api.settings``: they need ``email_policy``'s parsers, and the shared
settings module imports no domain. (``API_SMTP_URL`` etc. are unchanged.)"""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from api.tenancy.email_outbox import OutboxHygiene
from api.tenancy.email_policy import (
    EmailConfigError,
    RetryPolicy,
    SmtpConfig,
    parse_from_address,
    parse_smtp_url,
)


class EmailDeliverySettings(BaseSettings):
    """The SMTP relay's settings (the scheduler's ``deliver_emails`` job, api/tenancy/email_relay.py): a class of their own,
    read by the scheduler only. ``API_SMTP_URL`` unset = development: ``email_outbox`` is the mailbox, nothing is
    sent. Set, it is checked when the scheduler starts (a bad URL or a missing ``API_EMAIL_FROM`` stops it with
    what to fix). Errors never echo the input: the URL carries the password."""

    model_config = SettingsConfigDict(env_prefix="API_", extra="ignore", populate_by_name=True,
                                      hide_input_in_errors=True)

    smtp_url: SecretStr = Field(
        default=SecretStr(""),
        description="smtp://user:password@host:587?starttls=true (STARTTLS), smtps://user:password@host:465 "
                    "(implicit TLS) or smtp://host:25 (plain); empty: nothing is sent (development)")
    email_from: str = Field(default="", description="the From of every email, e.g. 'Meterline <no-reply@example.com>'")
    smtp_timeout_s: float = Field(default=10.0, gt=0, le=300,
                                  description="per SMTP connect and command; a batch's transaction lasts one session")
    email_max_attempts: int = Field(default=12, ge=1, le=1000,
                                    description="tries before a transiently failing email is marked failed")
    email_retry_base_s: float = Field(default=30.0, ge=1, description="wait after the first transient failure; "
                                      "doubles after each further one")
    email_retry_max_s: float = Field(default=3600.0, ge=1, description="the longest wait between two tries")

    email_max_age_s: float = Field(default=7 * 24 * 3600.0, ge=3600,
                                   description="a row due for longer than this (nobody sent it, e.g. SMTP was "
                                               "off) is marked failed instead of sent; 7 days = the invitation TTL")
    email_sent_retention_s: float = Field(default=30 * 24 * 3600.0, ge=3600,
                                          description="sent rows are deleted this long after sending")

    @model_validator(mode="after")
    def _check_delivery(self) -> EmailDeliverySettings:
        if self.email_retry_max_s < self.email_retry_base_s:
            raise ValueError("API_EMAIL_RETRY_MAX_S must be at least API_EMAIL_RETRY_BASE_S")
        if self.smtp is not None:  # parses the URL: EmailConfigError (a ValueError) says what to fix
            if not self.email_from.strip():
                raise EmailConfigError("API_EMAIL_FROM must be set when API_SMTP_URL is: the From of the emails, "
                                       "e.g. 'Meterline <no-reply@example.com>'")
            parse_from_address(self.email_from)
        return self

    @property
    def smtp(self) -> SmtpConfig | None:
        """None in development (no URL)."""
        url = self.smtp_url.get_secret_value().strip()
        return parse_smtp_url(url) if url else None

    @property
    def hygiene(self) -> OutboxHygiene:
        return OutboxHygiene(max_age_s=self.email_max_age_s, sent_retention_s=self.email_sent_retention_s)

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(max_attempts=self.email_max_attempts, base_s=self.email_retry_base_s,
                           max_s=self.email_retry_max_s)
