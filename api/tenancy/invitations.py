"""Invitations by email: create, resend, peek (by token, no login), accept, revoke, expire.

Invariants:
- the token is shown once (in the email) and stored only as a sha256 hash; resending issues a NEW token, so
  an older email's link stops working;
- at most one pending invitation per (project, email) (a unique partial index), so the same person is never
  invited twice in parallel;
- an invitation is accepted at most once, by a signed-in user whose email is the invited one, and only while
  pending and unexpired; the row is locked while accepting so two accepts cannot both add the member;
- a pending invitation past ``expires_at`` is expired (marked when touched; the list shows it as expired).
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError

from api.errors import ApiError, Conflict, Forbidden, NotFound
from api.tenancy.auth import ROLE_RANK, sha256_hex
from api.tenancy.email import EmailMessage, EmailSender
from api.tenancy.projects import AlreadyMember, _check_assignable, get_project

TOKEN_PREFIX = "mli_"


class InvitationPending(Conflict):
    code = "api.invitation_pending"


class InvitationClosed(ApiError):
    """Accepted, revoked or expired: the link no longer works."""

    status = 410
    code = "api.invitation_closed"


class InvitationEmailMismatch(Forbidden):
    code = "api.invitation_email_mismatch"


@dataclass(frozen=True, slots=True)
class Invitation:
    id: str
    project_id: str
    email: str
    role: str
    status: str
    invited_by: str | None
    created_at: datetime
    expires_at: datetime
    last_sent_at: datetime
    send_count: int
    accepted_at: datetime | None
    accepted_by: str | None
    revoked_at: datetime | None

    @classmethod
    def from_mapping(cls, row: Any) -> Invitation:
        values = {name: row[name] for name in cls.__slots__}
        if values["status"] == "pending" and row["is_expired"]:
            values["status"] = "expired"
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


_COLUMNS = """id, project_id, email, role, status, invited_by, created_at, expires_at, last_sent_at, send_count,
              accepted_at, accepted_by, revoked_at, expires_at <= now() AS is_expired"""


def _new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _send(conn: Connection, sender: EmailSender, *, invitation: Invitation, token: str, project_name: str,
          base_url: str) -> None:
    link = f"{base_url.rstrip('/')}/invitations/{token}"
    sender.send(conn, EmailMessage(
        to=invitation.email, kind="invitation", project_id=invitation.project_id, invitation_id=invitation.id,
        subject=f"You are invited to {project_name} on Meterline",
        body_text=(f"You have been invited to join the project \"{project_name}\" as {invitation.role}.\n\n"
                   f"Accept the invitation: {link}\n"
                   f"(API: POST /api/v1/invitations/{token}/accept with your access token)\n\n"
                   f"The invitation expires at {invitation.expires_at.isoformat()}.\n")))


def create_invitation(conn: Connection, sender: EmailSender, *, project_id: str, email: str, role: str,
                      invited_by: str | None, actor_role: str, ttl_s: int, base_url: str,
                      ) -> tuple[Invitation, str]:
    """Return (invitation, token). The token is in the email; the API returns it only to tests/dev."""
    _check_assignable(role, actor_role=actor_role)
    member = conn.execute(text("""
        SELECT 1 FROM project_members m JOIN users u ON u.id = m.user_id WHERE m.project_id = :p AND u.email = :e"""),
                          {"p": project_id, "e": email}).first()
    if member:
        raise AlreadyMember("this person is already a member of the project")
    _expire_stale(conn, project_id=project_id, email=email)
    token = _new_token()
    try:
        with conn.begin_nested():
            row = conn.execute(text(f"""
                INSERT INTO invitations (id, project_id, email, role, token_hash, invited_by, expires_at)
                VALUES (:id, :p, :e, :r, :h, :by, now() + make_interval(secs => :ttl))
                RETURNING {_COLUMNS}"""),
                {"id": "inv_" + uuid.uuid4().hex[:20], "p": project_id, "e": email, "r": role,
                 "h": sha256_hex(token), "by": invited_by, "ttl": ttl_s}).mappings().one()
    except IntegrityError as exc:
        open_id = conn.execute(text("SELECT id FROM invitations WHERE project_id = :p AND email = :e "
                                    "AND status = 'pending'"), {"p": project_id, "e": email}).scalar()
        raise InvitationPending("this email already has a pending invitation; resend it instead",
                                extra={"invitation_id": open_id}) from exc
    invitation = Invitation.from_mapping(row)
    _send(conn, sender, invitation=invitation, token=token,
          project_name=get_project(conn, project_id=project_id).name, base_url=base_url)
    return invitation, token


def _expire_stale(conn: Connection, *, project_id: str, email: str) -> None:
    conn.execute(text("""
        UPDATE invitations SET status = 'expired' WHERE project_id = :p AND email = :e AND status = 'pending'
        AND expires_at <= now()"""), {"p": project_id, "e": email})


def get_invitation(conn: Connection, *, project_id: str, invitation_id: str, lock: bool = False) -> Invitation:
    row = conn.execute(text(f"SELECT {_COLUMNS} FROM invitations WHERE id = :id AND project_id = :p"
                            + (" FOR UPDATE" if lock else "")),
                       {"id": invitation_id, "p": project_id}).mappings().first()
    if row is None:
        raise NotFound("invitation not found")
    return Invitation.from_mapping(row)


def list_invitations(conn: Connection, *, project_id: str, status: str | None = None) -> list[Invitation]:
    rows = conn.execute(text(f"SELECT {_COLUMNS} FROM invitations WHERE project_id = :p ORDER BY created_at DESC"),
                        {"p": project_id}).mappings().all()
    invitations = [Invitation.from_mapping(r) for r in rows]
    return [i for i in invitations if status is None or i.status == status]


def resend_invitation(conn: Connection, sender: EmailSender, *, project_id: str, invitation_id: str,
                      ttl_s: int, base_url: str) -> tuple[Invitation, Invitation, str]:
    """New token, new expiry, one more email. Returns (before, after, token). Expired ones may be resent."""
    before = get_invitation(conn, project_id=project_id, invitation_id=invitation_id, lock=True)
    if before.status not in ("pending", "expired"):
        raise InvitationClosed(f"the invitation is {before.status}; create a new one")
    token = _new_token()
    try:
        with conn.begin_nested():
            row = conn.execute(text(f"""
                UPDATE invitations SET token_hash = :h, status = 'pending', last_sent_at = now(),
                    send_count = send_count + 1, expires_at = now() + make_interval(secs => :ttl)
                WHERE id = :id RETURNING {_COLUMNS}"""),
                {"h": sha256_hex(token), "ttl": ttl_s, "id": invitation_id}).mappings().one()
    except IntegrityError as exc:  # an expired one revived while a newer invitation is pending
        raise InvitationPending("this email already has a newer pending invitation") from exc
    after = Invitation.from_mapping(row)
    _send(conn, sender, invitation=after, token=token,
          project_name=get_project(conn, project_id=project_id).name, base_url=base_url)
    return before, after, token


def revoke_invitation(conn: Connection, *, project_id: str, invitation_id: str) -> tuple[Invitation, Invitation]:
    before = get_invitation(conn, project_id=project_id, invitation_id=invitation_id, lock=True)
    if before.status != "pending":
        raise InvitationClosed(f"the invitation is already {before.status}")
    row = conn.execute(text(f"""
        UPDATE invitations SET status = 'revoked', revoked_at = now() WHERE id = :id RETURNING {_COLUMNS}"""),
                       {"id": invitation_id}).mappings().one()
    return before, Invitation.from_mapping(row)


@dataclass(frozen=True, slots=True)
class InvitationPeek:
    invitation_id: str
    project_id: str
    project_name: str
    email: str
    role: str
    status: str
    expires_at: datetime
    invited_by_name: str | None


def peek_invitation(conn: Connection, *, token: str) -> InvitationPeek:
    """What the link holder may see before signing in (no ids of people, the inviter's name only)."""
    row = conn.execute(text("""
        SELECT i.id, i.project_id, i.email, i.role, i.status, i.invited_by, i.created_at, i.expires_at,
               i.last_sent_at, i.send_count, i.accepted_at, i.accepted_by, i.revoked_at,
               i.expires_at <= now() AS is_expired,
               p.name AS project_name, coalesce(u.display_name, u.email) AS invited_by_name
        FROM invitations i JOIN projects p ON p.id = i.project_id LEFT JOIN users u ON u.id = i.invited_by
        WHERE i.token_hash = :h"""), {"h": sha256_hex(token)}).mappings().first()
    if row is None:
        raise NotFound("invitation not found")
    inv = Invitation.from_mapping(row)
    return InvitationPeek(inv.id, inv.project_id, row["project_name"], inv.email, inv.role, inv.status,
                          inv.expires_at, row["invited_by_name"])


def accept_invitation(conn: Connection, *, token: str, user_id: str, user_email: str) -> tuple[Invitation, str]:
    """Add the signed-in user with the invited role. Returns (accepted invitation, role)."""
    row = conn.execute(text(f"SELECT {_COLUMNS} FROM invitations WHERE token_hash = :h FOR UPDATE"),
                       {"h": sha256_hex(token)}).mappings().first()
    if row is None:
        raise NotFound("invitation not found")
    inv = Invitation.from_mapping(row)
    if inv.status != "pending":
        raise InvitationClosed(f"the invitation is {inv.status}")
    if inv.email != user_email.lower():
        raise InvitationEmailMismatch("this invitation was sent to a different email address")
    existing = conn.execute(text("SELECT role FROM project_members WHERE project_id = :p AND user_id = :u"),
                            {"p": inv.project_id, "u": user_id}).scalar()
    if existing is not None and ROLE_RANK[existing] >= ROLE_RANK[inv.role]:
        role = existing  # accepting never demotes
    else:
        conn.execute(text("""
            INSERT INTO project_members (project_id, user_id, role) VALUES (:p, :u, :r)
            ON CONFLICT (project_id, user_id) DO UPDATE SET role = excluded.role, updated_at = now()"""),
                     {"p": inv.project_id, "u": user_id, "r": inv.role})
        role = inv.role
    after = conn.execute(text(f"""
        UPDATE invitations SET status = 'accepted', accepted_at = now(), accepted_by = :u WHERE id = :id
        RETURNING {_COLUMNS}"""), {"u": user_id, "id": inv.id}).mappings().one()
    return Invitation.from_mapping(after), role
