"""Invitations: admins invite by email (create, list, resend, revoke); the link holder peeks without signing in
and accepts with their access token."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from api.deps import ConnectionDep, SettingsDep
from api.errors import Unauthorized
from api.tenancy.audit import audit, record_audit
from api.tenancy.auth import AuthRateLimit, ProjectAccess, UserDep, require_project
from api.tenancy.email import default_sender
from api.tenancy.invitations import (
    Invitation,
    accept_invitation,
    create_invitation,
    list_invitations,
    peek_invitation,
    resend_invitation,
    revoke_invitation,
)
from api.tenancy.users import get_user, normalize_email

router = APIRouter(tags=["invitations"])
PROJECT_INVITES = "/api/v1/projects/{project_id}/invitations"
TOKEN = Path(min_length=8, max_length=200, description="the token from the invitation email")


class InvitationCreate(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"email": "grace@example.com", "role": "member"}]})
    email: str = Field(max_length=320)
    role: Literal["admin", "member", "viewer"] = "member"


class InvitationOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "inv_0a1b2c", "project_id": "prj_0123456789abcdef", "email": "grace@example.com", "role": "member",
        "status": "pending", "invited_by": "usr_0a1b2c", "created_at": "2026-01-01T00:00:00Z",
        "expires_at": "2026-01-08T00:00:00Z", "last_sent_at": "2026-01-01T00:00:00Z", "send_count": 1,
        "accepted_at": None, "accepted_by": None, "revoked_at": None}]})
    id: str
    project_id: str
    email: str
    role: str
    status: Literal["pending", "accepted", "revoked", "expired"]
    invited_by: str | None
    created_at: datetime
    expires_at: datetime
    last_sent_at: datetime
    send_count: int
    accepted_at: datetime | None
    accepted_by: str | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, inv: Invitation) -> InvitationOut:
        return cls(**inv.as_dict())


class InvitationPeekOut(BaseModel):
    invitation_id: str
    project_id: str
    project_name: str
    email: str
    role: str
    status: str
    expires_at: datetime
    invited_by_name: str | None


class AcceptOut(BaseModel):
    project_id: str
    role: str
    invitation: InvitationOut


def _audit_view(inv: Invitation) -> dict[str, object]:
    return {"email": inv.email, "role": inv.role, "status": inv.status, "expires_at": inv.expires_at,
            "send_count": inv.send_count}


@router.post(PROJECT_INVITES, status_code=201, response_model=InvitationOut,
             summary="Invite someone by email (admin); the email carries the accept link",
             responses={409: {"description": "already a member, or an invitation is pending (resend it)"}})
def invite(body: InvitationCreate, access: Annotated[ProjectAccess, require_project("admin")],
           conn: ConnectionDep, settings: SettingsDep) -> InvitationOut:
    invitation, _token = create_invitation(
        conn, default_sender(), project_id=access.project_id, email=normalize_email(body.email), role=body.role,
        invited_by=access.principal.user_id, actor_role=access.role or "admin",
        ttl_s=settings.invitation_ttl_s, base_url=settings.public_base_url)
    audit(conn, access, action="invitation.create", target_kind="invitation", target_id=invitation.id,
          after=_audit_view(invitation))
    return InvitationOut.of(invitation)


@router.get(PROJECT_INVITES, response_model=list[InvitationOut], summary="Invitations of the project (admin)")
def invitations(access: Annotated[ProjectAccess, require_project("admin")], conn: ConnectionDep,
                status: Annotated[Literal["pending", "accepted", "revoked", "expired"] | None, Query()] = None,
                ) -> list[InvitationOut]:
    return [InvitationOut.of(i) for i in list_invitations(conn, project_id=access.project_id, status=status)]


@router.post(PROJECT_INVITES + "/{invitation_id}/resend", response_model=InvitationOut,
             summary="Send the invitation again with a fresh link and expiry (the old link stops working)",
             responses={410: {"description": "accepted or revoked (api.invitation_closed)"}})
def resend(invitation_id: str, access: Annotated[ProjectAccess, require_project("admin")], conn: ConnectionDep,
           settings: SettingsDep) -> InvitationOut:
    before, after, _token = resend_invitation(conn, default_sender(), project_id=access.project_id,
                                              invitation_id=invitation_id, ttl_s=settings.invitation_ttl_s,
                                              base_url=settings.public_base_url)
    audit(conn, access, action="invitation.resend", target_kind="invitation", target_id=invitation_id,
          before=_audit_view(before), after=_audit_view(after))
    return InvitationOut.of(after)


@router.delete(PROJECT_INVITES + "/{invitation_id}", response_model=InvitationOut,
               summary="Revoke a pending invitation (admin)",
               responses={410: {"description": "not pending any more (api.invitation_closed)"}})
def revoke(invitation_id: str, access: Annotated[ProjectAccess, require_project("admin")],
           conn: ConnectionDep) -> InvitationOut:
    before, after = revoke_invitation(conn, project_id=access.project_id, invitation_id=invitation_id)
    audit(conn, access, action="invitation.revoke", target_kind="invitation", target_id=invitation_id,
          before=_audit_view(before), after=_audit_view(after))
    return InvitationOut.of(after)


@router.get("/api/v1/invitations/{token}", response_model=InvitationPeekOut, dependencies=[AuthRateLimit],
            summary="Look at an invitation by its token, without signing in",
            responses={404: {"description": "unknown token (or one replaced by a resend)"}})
def peek(conn: ConnectionDep, token: Annotated[str, TOKEN]) -> InvitationPeekOut:
    p = peek_invitation(conn, token=token)
    return InvitationPeekOut(invitation_id=p.invitation_id, project_id=p.project_id, project_name=p.project_name,
                             email=p.email, role=p.role, status=p.status, expires_at=p.expires_at,
                             invited_by_name=p.invited_by_name)


@router.post("/api/v1/invitations/{token}/accept", response_model=AcceptOut,
             summary="Accept an invitation as the signed-in user (the account's email must be the invited one)",
             responses={403: {"description": "signed in with another email (api.invitation_email_mismatch)"},
                        410: {"description": "accepted, revoked or expired (api.invitation_closed)"}})
def accept(principal: UserDep, conn: ConnectionDep, token: Annotated[str, TOKEN]) -> AcceptOut:
    assert principal.user_id is not None
    user = get_user(conn, user_id=principal.user_id)
    if user is None:
        raise Unauthorized("the account no longer exists")
    invitation, role = accept_invitation(conn, token=token, user_id=user.id, user_email=user.email)
    record_audit(conn, project_id=invitation.project_id, principal=principal, action="invitation.accept",
                 target_kind="invitation", target_id=invitation.id, after={"user_id": user.id, "role": role})
    return AcceptOut(project_id=invitation.project_id, role=role, invitation=InvitationOut.of(invitation))
