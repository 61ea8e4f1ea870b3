"""The email relay's pure part (api/tenancy/email_policy.py): the SMTP URL, the message built from an outbox row, what each
SMTP outcome means, the backoff schedule, and the settings that refuse a relay they cannot run."""

from __future__ import annotations

import smtplib
from datetime import UTC, datetime, timedelta
from email.headerregistry import Address

import pytest
from pydantic import SecretStr, ValidationError

from api.tenancy.email_policy import (
    Accepted,
    EmailConfigError,
    OutboxMail,
    Refused,
    RetryPolicy,
    SmtpConfig,
    Unreachable,
    Unsendable,
    build_message,
    decide,
    outcome_of,
    parse_from_address,
    parse_smtp_url,
)
from api.tenancy.email_settings import EmailDeliverySettings

NOW = datetime(2026, 12, 8, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(max_attempts=4, base_s=30, max_s=100)


@pytest.mark.parametrize(("url", "expected"), [
    ("smtp://mail.example.com", SmtpConfig("mail.example.com", 25, "none")),
    ("smtp://127.0.0.1:2525/", SmtpConfig("127.0.0.1", 2525, "none")),
    ("smtp://apikey:s%40cret%3A1@smtp.example.com:587?starttls=true",
     SmtpConfig("smtp.example.com", 587, "starttls", "apikey", "s@cret:1")),
    ("smtp://u%40x.io:pw@h:25?starttls=false", SmtpConfig("h", 25, "none", "u@x.io", "pw")),
    ("smtps://u:pw@smtp.example.com", SmtpConfig("smtp.example.com", 465, "implicit", "u", "pw")),
    ("SMTPS://u@smtp.example.com:1465", SmtpConfig("smtp.example.com", 1465, "implicit", "u", None)),
])
def test_smtp_urls_parse(url: str, expected: SmtpConfig) -> None:
    assert parse_smtp_url(url) == expected


@pytest.mark.parametrize(("url", "says"), [
    ("mail.example.com:25", "scheme"),
    ("http://mail.example.com", "scheme 'http'"),
    ("smtp://", "no host"),
    ("smtp://h:port", "not a valid URL"),
    ("smtp://h:99999", "not a valid URL"),
    ("smtp://h/inbox", "path"),
    ("smtp://h?tls=yes", "unknown parameters ['tls']"),
    ("smtp://h?starttls=maybe", "true or false"),
    ("smtps://h?starttls=true", "drop ?starttls=true"),
    ("smtp://:pw@h", "password without a user"),
])
def test_bad_smtp_urls_say_what_to_fix(url: str, says: str) -> None:
    with pytest.raises(EmailConfigError, match="API_SMTP_URL") as raised:
        parse_smtp_url(url)
    assert says in str(raised.value)


def test_the_description_of_a_config_never_shows_the_password() -> None:
    config = parse_smtp_url("smtps://user:hunter2@h")
    assert "hunter2" not in config.describe() and "hunter2" not in repr(config)
    assert "hunter2" not in repr(EmailDeliverySettings(smtp_url=SecretStr("smtps://user:hunter2@h"),
                                                       email_from="a@b.example"))


def test_settings_without_a_url_are_development_and_bad_ones_fail_with_what_to_fix() -> None:
    assert EmailDeliverySettings().smtp is None
    ok = EmailDeliverySettings(smtp_url=SecretStr("smtp://u:p@h:587?starttls=true"),
                               email_from="Meterline <no-reply@x.io>")
    assert ok.smtp == SmtpConfig("h", 587, "starttls", "u", "p")
    assert ok.retry_policy == RetryPolicy(max_attempts=12, base_s=30.0, max_s=3600.0)
    for kwargs, says in (({"smtp_url": "http://u:topsecret@h", "email_from": "a@b.io"}, "API_SMTP_URL has scheme"),
                         ({"smtp_url": "smtp://u:topsecret@h"}, "API_EMAIL_FROM must be set"),
                         ({"smtp_url": "smtp://u:topsecret@h", "email_from": "nobody"}, "not an email address"),
                         ({"email_retry_base_s": 60, "email_retry_max_s": 30}, "API_EMAIL_RETRY_MAX_S")):
        with pytest.raises(ValidationError, match=says) as raised:
            EmailDeliverySettings(**kwargs)
        assert "topsecret" not in str(raised.value)  # errors never echo the URL (it carries the password)


def test_from_addresses() -> None:
    assert parse_from_address("Meterline <no-reply@example.com>") == Address("Meterline", "no-reply", "example.com")
    assert parse_from_address("ops@example.com").addr_spec == "ops@example.com"
    for bad in ("", "example.com", "Meterline <no-reply>", "a b@example.com"):
        with pytest.raises(EmailConfigError, match="API_EMAIL_FROM"):
            parse_from_address(bad)


def _mail(**changes: object) -> OutboxMail:
    values: dict[str, object] = {
        "id": 42, "to_address": "grace@example.com", "subject": "You are invited to Acme on Meterline",
        "body_text": "Accept: https://m.example/invitations/mli_abc\nÜnïcode too.\n", "kind": "invitation",
        "created_at": NOW - timedelta(minutes=5), "attempts": 0, **changes}
    return OutboxMail(**values)  # type: ignore[arg-type]


def test_the_message_is_the_same_on_every_try_and_says_who_and_what() -> None:
    sender = parse_from_address("Meterline <no-reply@meterline.example>")
    first, again = build_message(_mail(), sender=sender), build_message(_mail(attempts=3), sender=sender)
    assert first.as_bytes() == again.as_bytes()
    assert first["To"] == "grace@example.com" and first["From"] == "Meterline <no-reply@meterline.example>"
    assert first["Subject"] == "You are invited to Acme on Meterline"
    assert first["Message-ID"].endswith("@meterline.example>") and ".invitation.42." in first["Message-ID"]
    assert first["Date"] == "Tue, 08 Dec 2026 11:55:00 +0000"
    assert first.get_content() == _mail().body_text
    assert build_message(_mail(id=43), sender=sender)["Message-ID"] != first["Message-ID"]


def test_a_header_with_a_line_break_cannot_become_a_message() -> None:
    sender = parse_from_address("no-reply@meterline.example")
    with pytest.raises(ValueError, match="linefeed"):
        build_message(_mail(subject="hi\r\nBcc: everyone@example.com"), sender=sender)


def test_smtp_errors_map_to_outcomes() -> None:
    assert outcome_of(smtplib.SMTPRecipientsRefused({"g@x.io": (550, b"5.1.1 no such user")})) == \
        Refused(550, "5.1.1 no such user")
    assert outcome_of(smtplib.SMTPDataError(451, b"4.3.0 try later")) == Refused(451, "4.3.0 try later")
    assert outcome_of(smtplib.SMTPSenderRefused(553, b"5.7.1 not yours", "a@b")) == Refused(553, "5.7.1 not yours")
    assert isinstance(outcome_of(smtplib.SMTPNotSupportedError("SMTPUTF8 not supported")), Unsendable)
    assert outcome_of(smtplib.SMTPServerDisconnected("Connection unexpectedly closed")) == \
        Unreachable("SMTPServerDisconnected: Connection unexpectedly closed")
    assert outcome_of(ConnectionResetError(104, "reset")) == Unreachable("ConnectionResetError: [Errno 104] reset")


def test_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    policy = RetryPolicy(max_attempts=100, base_s=30, max_s=3600)
    assert [policy.delay_s(n) for n in range(1, 10)] == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert policy.delay_s(10_000) == 3600


def test_accepted_is_sent() -> None:
    assert decide(Accepted(), attempts_before=2, now=NOW, policy=POLICY).state == "sent"
    assert decide(Accepted(), attempts_before=2, now=NOW, policy=POLICY).attempts == 3


@pytest.mark.parametrize("outcome", [Refused(550, "5.1.1 no such user"), Refused(554, "5.7.1 rejected"),
                                     Unsendable("ValueError: bad header")])
def test_a_permanent_refusal_fails_at_once_with_the_reply(outcome: Refused | Unsendable) -> None:
    decision = decide(outcome, attempts_before=0, now=NOW, policy=POLICY)
    assert (decision.state, decision.attempts, decision.next_attempt_at) == ("failed", 1, None)
    assert decision.error == (f"{outcome.code} {outcome.reply}" if isinstance(outcome, Refused) else outcome.error)


@pytest.mark.parametrize("outcome", [Refused(451, "4.3.0 try later"), Refused(421, "4.4.2 closing"),
                                     Refused(-1, "unexpected"), Unreachable("ConnectionRefusedError: refused")])
def test_a_transient_failure_is_retried_after_the_backoff_until_the_last_attempt(
        outcome: Refused | Unreachable) -> None:
    schedule = []
    attempts = 0
    while (decision := decide(outcome, attempts_before=attempts, now=NOW, policy=POLICY)).state == "retry":
        assert decision.attempts == attempts + 1 and decision.error
        schedule.append((decision.next_attempt_at - NOW).total_seconds())  # type: ignore[operator]
        attempts = decision.attempts
    assert schedule == [30, 60, 100]
    assert decision.state == "failed" and decision.attempts == POLICY.max_attempts
    assert decision.error is not None and decision.error.startswith("gave up after 4 attempts: ")


def test_a_long_reply_is_cut() -> None:
    decision = decide(Refused(550, "x" * 5000), attempts_before=0, now=NOW, policy=POLICY)
    assert decision.error is not None and len(decision.error) == 1000
