"""The SMTP relay for ``email_outbox`` (api/tenancy/email_relay.py) against a real SMTP server in this process (aiosmtpd)
and the real scheduler: an invitation made over HTTP is delivered once and marked sent, a rolled-back one never; a
451 is retried after the backoff and delivered once; a 550 fails at once with the server's reply; a server that is
down costs attempts, then the email goes out; two runs at once send each row once; STARTTLS with a login; a bad
SMTP URL stops the scheduler's start with what to fix, and no URL is development (nothing sent, said once)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from email.message import EmailMessage as MimeMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SmtpServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from structlog.testing import capture_logs
from tenancy_testkit import (
    add_member,
    api_client,
    create_project,
    outbox_token,
    scheduler_round,
    signup,
    sql,
    team,
)

from api.settings import IdempotencySettings
from api.tenancy.email import EmailMessage, OutboxEmailSender
from api.tenancy.email_relay import deliver_due, relay_for
from api.tenancy.email_settings import EmailDeliverySettings
from api.tenancy.invitations import create_invitation
from ledger.db import make_engine
from meterline import scheduler as meterline_scheduler
from meterline.scheduler import email_jobs, jobs
from meterline.services import free_port

pytestmark = pytest.mark.integration

SENDER = "no-reply@meterline.test"
RETRY_BASE_S = 60.0


class Mailbox:
    """An aiosmtpd handler that keeps what it accepted; ``data_replies`` answer the next DATA commands instead of
    250, ``refuse`` maps recipients to a RCPT reply, ``data_delay_s`` slows every message down."""

    def __init__(self, *, data_replies: list[str] | None = None, refuse: dict[str, str] | None = None,
                 data_delay_s: float = 0.0) -> None:
        self.data_replies = list(data_replies or [])
        self.refuse = refuse or {}
        self.data_delay_s = data_delay_s
        self.received: list[tuple[str, list[str], MimeMessage]] = []

    async def handle_RCPT(self, server: SmtpServer, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SmtpServer, session: Session, envelope: Envelope) -> str:
        if self.data_delay_s:
            await asyncio.sleep(self.data_delay_s)
        if self.data_replies:
            return self.data_replies.pop(0)
        message = email.message_from_bytes(envelope.original_content or b"", policy=email.policy.default)
        assert isinstance(message, MimeMessage)
        self.received.append((str(envelope.mail_from), list(envelope.rcpt_tos), message))
        return "250 2.0.0 Message accepted for delivery"

    def message_ids(self) -> list[str]:
        return [str(m["Message-ID"]) for _, _, m in self.received]


@contextmanager
def smtp_server(mailbox: Mailbox, port: int | None = None, **options: Any) -> Iterator[int]:
    controller = Controller(mailbox, hostname="127.0.0.1", port=port or free_port(), **options)
    controller.start()
    try:
        yield controller.port
    finally:
        controller.stop()


def email_settings(port: int, **overrides: Any) -> EmailDeliverySettings:
    return EmailDeliverySettings(**{
        "smtp_url": f"smtp://127.0.0.1:{port}", "email_from": f"Meterline <{SENDER}>", "smtp_timeout_s": 5,
        "email_retry_base_s": RETRY_BASE_S, "email_retry_max_s": 600, "email_max_attempts": 5, **overrides})


def queue(database_url: str, *addresses: str) -> list[int]:
    """Outbox rows written the way the API writes them (one committed transaction)."""
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            return [OutboxEmailSender().send(conn, EmailMessage(
                to=address, subject=f"Hello {address}", body_text=f"Hi {address}\n", kind="test"))
                for address in addresses]
    finally:
        engine.dispose()


def rows(database_url: str) -> dict[str, tuple[Any, ...]]:
    """to_address -> (attempts, sent?, failed?, last_error, next_attempt_at)"""
    return {r[0]: r[1:] for r in sql(database_url, """
        SELECT to_address, attempts, sent_at IS NOT NULL, failed_at IS NOT NULL, last_error, next_attempt_at
        FROM email_outbox ORDER BY id""")}


def sent_token(message: MimeMessage) -> str:
    """The invitation token in a delivered message (the outbox's copy is redacted once sent)."""
    match = re.search(r"/invitations/(mli_[A-Za-z0-9_-]+)", message.get_content())
    assert match, message.get_content()
    return match.group(1)


def db_now(database_url: str) -> datetime:
    value = sql(database_url, "SELECT now()")[0][0]
    assert isinstance(value, datetime)
    return value


def deliver(database_url: str, settings: EmailDeliverySettings, *, now: datetime | None = None) -> int:
    """One round of the real scheduler with the ``deliver_emails`` job; rows tried."""
    return scheduler_round(database_url, email_jobs(settings), now=now)["deliver_emails"]


def test_an_invitation_made_over_http_is_delivered_once_and_a_rolled_back_one_never(database_url: str,
                                                                                     engines: Any) -> None:
    mailbox = Mailbox()
    with smtp_server(mailbox) as port, api_client(database_url, engines,
                                                  public_base_url="https://meterline.example") as client:
        owner = signup(client, "owner")
        t = team(client, {"owner": owner, "admin": signup(client, "admin"), "member": signup(client, "member"),
                          "viewer": signup(client, "viewer")})
        invited = client.post(f"/api/v1/projects/{t.project_id}/invitations",
                              json={"email": "Grace@Example.com", "role": "member"}, headers=owner.headers)
        assert invited.status_code == 201, invited.text
        # the same operation, rolled back after its email was queued: the email goes with it
        engine = make_engine(database_url, pool_size=1)
        try:
            with engine.connect() as conn, conn.begin() as tx:
                create_invitation(conn, OutboxEmailSender(), project_id=t.project_id, email="never@example.com",
                                  role="viewer", invited_by=owner.user_id, actor_role="owner", ttl_s=3600,
                                  base_url="https://meterline.example")
                tx.rollback()
        finally:
            engine.dispose()

        token = outbox_token(database_url, "grace@example.com")  # read before sending: sending removes it
        settings = email_settings(port)
        for _ in range(2):  # the scheduler's whole job list, twice: one message
            scheduler_round(database_url, jobs(IdempotencySettings(), settings))
        assert len(mailbox.received) == 1
        envelope_from, recipients, message = mailbox.received[0]
        assert envelope_from == SENDER and recipients == ["grace@example.com"]
        assert message["To"] == "grace@example.com" and message["From"] == f"Meterline <{SENDER}>"
        assert message["Subject"] == "You are invited to Acme on Meterline"
        body = message.get_content().replace("\r\n", "\n")  # CRLF on the wire
        token = sent_token(message)
        assert f"Accept the invitation: https://meterline.example/invitations/{token}\n" in body
        # once sent, the stored copy no longer holds the link in clear
        (stored,) = sql(database_url, "SELECT body_text FROM email_outbox WHERE to_address = 'grace@example.com'")
        assert token not in stored[0] and "[link removed after sending]" in stored[0]
        assert rows(database_url)["grace@example.com"][:4] == (1, True, False, None)
        assert "never@example.com" not in rows(database_url)
        # the accept link (a bearer credential) is not kept in clear once the mail has left
        stored = sql(database_url, "SELECT body_text FROM email_outbox WHERE to_address = 'grace@example.com'")
        assert token not in stored[0][0] and "[link removed after sending]" in stored[0][0]

        # a resend queues a new email with a new link; the delivered one is not sent again
        invitation_id = invited.json()["id"]
        resent = client.post(f"/api/v1/projects/{t.project_id}/invitations/{invitation_id}/resend",
                             headers=owner.headers)
        assert resent.status_code == 200, resent.text
        new_token = outbox_token(database_url, "grace@example.com")
        assert deliver(database_url, settings) == 1
        assert len(mailbox.received) == 2
        assert new_token != token and new_token in mailbox.received[1][2].get_content()


def test_a_451_is_retried_after_the_backoff_and_delivered_once(database_url: str) -> None:
    mailbox = Mailbox(data_replies=["451 4.7.1 Greylisted, try again later"])
    with smtp_server(mailbox) as port:
        settings = email_settings(port)
        queue(database_url, "ada@example.com")
        start = db_now(database_url)
        assert deliver(database_url, settings, now=start) == 1
        attempts, sent, failed, error, next_at = rows(database_url)["ada@example.com"]
        assert (attempts, sent, failed) == (1, False, False) and mailbox.received == []
        assert error == "451 4.7.1 Greylisted, try again later"
        assert next_at == start + timedelta(seconds=RETRY_BASE_S)

        assert deliver(database_url, settings, now=start + timedelta(seconds=RETRY_BASE_S - 1)) == 0  # not yet due
        assert deliver(database_url, settings, now=start + timedelta(seconds=RETRY_BASE_S)) == 1
        assert deliver(database_url, settings, now=start + timedelta(hours=1)) == 0
        assert rows(database_url)["ada@example.com"][:4] == (2, True, False, None)
        assert [r for _, r, _ in mailbox.received] == [["ada@example.com"]]


def test_a_550_fails_at_once_with_the_reply_and_the_batch_goes_on(database_url: str) -> None:
    mailbox = Mailbox(refuse={"gone@example.com": "550 5.1.1 <gone@example.com>: Recipient address rejected"})
    with smtp_server(mailbox) as port:
        settings = email_settings(port)
        queue(database_url, "gone@example.com", "here@example.com")
        assert deliver(database_url, settings) == 2
        for later in (timedelta(hours=1), timedelta(days=29)):  # (sent rows are purged after 30 days)
            assert deliver(database_url, settings, now=db_now(database_url) + later) == 0  # never tried again
        state = rows(database_url)
        assert state["gone@example.com"][:4] == (
            1, False, True, "550 5.1.1 <gone@example.com>: Recipient address rejected")
        assert state["here@example.com"][:3] == (1, True, False)
        assert [r for _, r, _ in mailbox.received] == [["here@example.com"]]


def test_a_server_that_is_down_costs_attempts_then_the_email_goes_out_once(database_url: str) -> None:
    port = free_port()  # nothing listens here yet
    settings = email_settings(port, email_max_attempts=3)
    queue(database_url, "a@example.com", "b@example.com")
    start = db_now(database_url)
    assert deliver(database_url, settings, now=start) == 2
    assert deliver(database_url, settings, now=start + timedelta(seconds=RETRY_BASE_S)) == 2
    for attempts, sent, failed, error, next_at in rows(database_url).values():
        assert (attempts, sent, failed) == (2, False, False)
        assert error.startswith("ConnectionRefusedError")
        assert next_at == start + timedelta(seconds=RETRY_BASE_S * 3)  # 60 s, then 120 s

    mailbox = Mailbox()
    with smtp_server(mailbox, port=port):
        assert deliver(database_url, settings, now=start + timedelta(seconds=RETRY_BASE_S * 2)) == 0
        assert deliver(database_url, settings, now=start + timedelta(seconds=RETRY_BASE_S * 3)) == 2
        assert deliver(database_url, settings, now=start + timedelta(days=1)) == 0
    assert {a: r[:4] for a, r in rows(database_url).items()} == {
        "a@example.com": (3, True, False, None), "b@example.com": (3, True, False, None)}
    assert sorted(r[0] for _, r, _ in mailbox.received) == ["a@example.com", "b@example.com"]


def test_two_runs_at_once_send_each_row_once(database_url: str) -> None:
    """Two runners (a lease takeover overlapping the old holder, say) claim with SKIP LOCKED: no row twice."""
    mailbox = Mailbox(data_delay_s=0.02)
    count = 40
    with smtp_server(mailbox) as port:
        settings = email_settings(port)
        relay = relay_for(settings)
        assert relay is not None
        ids = queue(database_url, *(f"user{i}@example.com" for i in range(count)))
        engine = make_engine(database_url, pool_size=2)
        start = threading.Barrier(2)
        tried: dict[str, int] = {}

        def runner(name: str) -> None:
            start.wait()
            total = 0
            while True:
                with engine.begin() as conn:
                    done = deliver_due(conn, now=db_now(database_url), relay=relay, policy=settings.retry_policy)
                if done == 0:
                    break
                total += done
            tried[name] = total

        threads = [threading.Thread(target=runner, args=(name,)) for name in ("one", "two")]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
        finally:
            engine.dispose()
    assert sum(tried.values()) == count and min(tried.values()) > 0, tried  # both ran, no row tried twice
    assert len(mailbox.received) == count and len(set(mailbox.message_ids())) == count
    assert sorted(int(i.split(".")[2]) for i in mailbox.message_ids()) == ids
    assert {r[:3] for r in rows(database_url).values()} == {(1, True, False)}


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (made by the openssl command line)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_starttls_and_login_and_wrong_credentials_cost_an_attempt(database_url: str, certificate: tuple[Path, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl

    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the relay trusts it as a private CA, host name checked

    def authenticator(server: SmtpServer, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (b"relay", b"p@ss:1")
        return AuthResult(success=ok, handled=False)  # a failure answers 535

    mailbox = Mailbox()
    with smtp_server(mailbox, tls_context=server_tls, require_starttls=True, auth_required=True,
                     authenticator=authenticator) as port:
        queue(database_url, "tls@example.com")
        start = db_now(database_url)
        wrong = email_settings(port, smtp_url=f"smtp://relay:nope@127.0.0.1:{port}?starttls=true")
        assert deliver(database_url, wrong, now=start) == 1
        attempts, sent, _failed, error, _next = rows(database_url)["tls@example.com"]
        assert (attempts, sent) == (1, False) and error.startswith("SMTPAuthenticationError: 535")

        right = email_settings(port, smtp_url=f"smtp://relay:p%40ss%3A1@127.0.0.1:{port}?starttls=true")
        assert deliver(database_url, right, now=start + timedelta(seconds=RETRY_BASE_S)) == 1
    assert rows(database_url)["tls@example.com"][:3] == (2, True, False)
    assert [r for _, r, _ in mailbox.received] == [["tls@example.com"]]


def test_a_bad_smtp_url_stops_the_scheduler_start_and_no_url_is_development(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_SMTP_URL", "http://relay:topsecret@mail.example.com")
    monkeypatch.setenv("API_EMAIL_FROM", SENDER)
    with capture_logs() as logs, pytest.raises(SystemExit) as stopped:
        meterline_scheduler.main()
    assert stopped.value.code == 2
    [refusal] = [e for e in logs if e["event"] == "scheduler_refused_to_start"]
    assert "API_SMTP_URL has scheme 'http'" in refusal["error"] and "smtps://" in refusal["error"]
    assert "topsecret" not in str(logs)

    monkeypatch.delenv("API_SMTP_URL")
    with capture_logs() as logs:
        names = [job.name for job in jobs()]
    assert "deliver_emails" not in names and "erase_accounts" in names
    assert [e["event"] for e in logs] == ["email_delivery_off"]
    assert "development" in logs[0]["detail"]


def _invite(client: Any, project_id: str, owner: Any, address: str) -> str:
    r = client.post(f"/api/v1/projects/{project_id}/invitations", json={"email": address, "role": "member"},
                    headers=owner.headers)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _outbox(database_url: str, address: str) -> list[tuple[Any, ...]]:
    """(id, sent?, failed?, last_error) of every row to ``address``, oldest first."""
    return sql(database_url, """SELECT id, sent_at IS NOT NULL, failed_at IS NOT NULL, last_error FROM email_outbox
                               WHERE to_address = %s ORDER BY id""", address)


def test_revoked_and_resent_invitations_old_emails_are_not_sent(database_url: str, engines: Any) -> None:
    mailbox = Mailbox()
    with smtp_server(mailbox) as port, api_client(database_url, engines) as client:
        owner = signup(client, "owner")
        project_id = create_project(client, owner, "Acme")
        base = f"/api/v1/projects/{project_id}/invitations"
        # queued while SMTP was off (development): one resent, one revoked
        resent_id = _invite(client, project_id, owner, "resent@example.com")
        first_token = outbox_token(database_url, "resent@example.com")
        assert client.post(f"{base}/{resent_id}/resend", headers=owner.headers).status_code == 200
        new_token = outbox_token(database_url, "resent@example.com")
        revoked_id = _invite(client, project_id, owner, "revoked@example.com")
        assert client.delete(f"{base}/{revoked_id}", headers=owner.headers).status_code == 200
        # SMTP is turned on: only the live email goes out
        deliver(database_url, email_settings(port))
        assert [r for _, r, _ in mailbox.received] == [["resent@example.com"]]
        assert sent_token(mailbox.received[0][2]) == new_token != first_token
        old, new = _outbox(database_url, "resent@example.com")
        assert old[1:] == (False, True, "not sent: superseded by a newer email of the invitation (resent)")
        assert new[1:3] == (True, False)
        (revoked,) = _outbox(database_url, "revoked@example.com")
        assert revoked[1:] == (False, True, "not sent: the invitation is revoked")
        # neither the skipped rows nor the sent one keep a link in clear
        assert not sql(database_url, "SELECT 1 FROM email_outbox WHERE body_text ~ 'mli_'")
        # the old email cannot be retried into sending a dead link
        retried = client.post(f"/api/v1/projects/{project_id}/emails/{old[0]}/retry", headers=owner.headers)
        assert retried.status_code == 409 and "superseded" in retried.json()["detail"], retried.text


def test_rows_due_longer_than_the_cutoff_are_not_sent_when_smtp_is_enabled(database_url: str) -> None:
    mailbox = Mailbox()
    with smtp_server(mailbox) as port:
        queue(database_url, "ancient@example.com")
        later = db_now(database_url) + timedelta(days=8)  # the outbox waited 8 days for SMTP (cutoff: 7)
        assert deliver(database_url, email_settings(port), now=later) == 0
        assert mailbox.received == []
        ((_, sent, failed, error),) = _outbox(database_url, "ancient@example.com")
        assert (sent, failed) and error.startswith("not sent: due since ") and "API_EMAIL_MAX_AGE_S" in error


def test_a_failed_email_is_retried_through_the_admin_api(database_url: str, engines: Any) -> None:
    mailbox = Mailbox(refuse={"bounce@example.com": "550 5.1.1 mailbox unavailable"})
    with smtp_server(mailbox) as port, api_client(database_url, engines) as client:
        owner, member = signup(client, "owner"), signup(client, "member")
        project_id = create_project(client, owner, "Acme")
        add_member(client, project_id, owner, member, "member")
        _invite(client, project_id, owner, "bounce@example.com")
        settings = email_settings(port)
        deliver(database_url, settings)
        ((row_id, sent, failed, error),) = _outbox(database_url, "bounce@example.com")
        assert (sent, failed, error) == (False, True, "550 5.1.1 mailbox unavailable")
        emails = f"/api/v1/projects/{project_id}/emails"
        listed = client.get(emails, params={"state": "failed"}, headers=owner.headers)
        assert [e["id"] for e in listed.json()] == [row_id] and "body_text" not in listed.json()[0]
        assert client.post(f"{emails}/{row_id}/retry", headers=member.headers).status_code == 403
        assert client.post(f"{emails}/999999/retry", headers=owner.headers).status_code == 404
        mailbox.refuse.clear()  # the mailbox exists again
        retried = client.post(f"{emails}/{row_id}/retry", headers=owner.headers)
        assert retried.status_code == 200, retried.text
        assert (retried.json()["failed_at"], retried.json()["attempts"]) == (None, 0)
        assert deliver(database_url, settings) == 1
        assert [r for _, r, _ in mailbox.received] == [["bounce@example.com"]]
        assert client.post(f"{emails}/{row_id}/retry", headers=owner.headers).status_code == 404  # sent now
        audit = client.get(f"/api/v1/projects/{project_id}/audit-log", params={"action": "email.retry"},
                           headers=owner.headers).json()["items"]
        assert [a["target_id"] for a in audit] == [str(row_id)]


def test_sent_rows_are_purged_after_the_retention(database_url: str) -> None:
    mailbox = Mailbox()
    with smtp_server(mailbox) as port:
        settings = email_settings(port, email_sent_retention_s=24 * 3600)
        queue(database_url, "kept@example.com")
        start = db_now(database_url)
        assert deliver(database_url, settings, now=start) == 1
        deliver(database_url, settings, now=start + timedelta(hours=23))
        assert len(_outbox(database_url, "kept@example.com")) == 1
        deliver(database_url, settings, now=start + timedelta(hours=25))
        assert _outbox(database_url, "kept@example.com") == []
