"""Project members: list, add a user (by id) or invite by email, change a role, remove (or leave).

Least privilege, stated: managing people needs a person. API keys (even admin-scope ones) cannot add, change or
remove members, so a leaked key cannot plant an admin who outlives the key's revocation. Adding by email always
sends an invitation and answers the same 202 whether or not an account has that address (no enumeration)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.deps import ConnectionDep, SettingsDep
from api.errors import NotFound
from api.tenancy.audit import audit
from api.tenancy.auth import ProjectAccess, people_only, require_project
from api.tenancy.email import default_sender
from api.tenancy.invitations import create_invitation
from api.tenancy.projects import Member, add_member, change_role, list_members, remove_member
from api.tenancy.users import get_user, normalize_email
from api.validation import RequestModel

router = APIRouter(prefix="/api/v1/projects/{project_id}/members", tags=["members"])


class MemberOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "user_id": "usr_0a1b2c", "email": "ada@example.com", "display_name": "Ada", "role": "admin",
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"}]})
    user_id: str
    email: str
    display_name: str | None
    role: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, m: Member) -> MemberOut:
        return cls(user_id=m.user_id, email=m.email, display_name=m.display_name, role=m.role,
                   created_at=m.created_at, updated_at=m.updated_at)


class MemberAdd(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"email": "grace@example.com", "role": "member"}]})
    email: str | None = Field(default=None, max_length=320)
    user_id: str | None = None
    role: Literal["admin", "member", "viewer"]

    @model_validator(mode="after")
    def _one_identity(self) -> MemberAdd:
        if (self.email is None) == (self.user_id is None):
            raise ValueError("give exactly one of email or user_id")
        return self


class RoleChange(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"role": "viewer"}]})
    role: Literal["admin", "member", "viewer"]


class MemberInvited(BaseModel):
    """The answer to adding by email, the same whether or not the address has an account."""
    status: Literal["invited"] = "invited"
    email: str
    role: str
    invitation_id: str
    expires_at: datetime


def _actor_role(access: ProjectAccess) -> str:
    """A user's role; an API key acts as an admin with the admin scope and as a viewer otherwise."""
    if access.role is not None:
        return access.role
    return "admin" if "admin" in access.principal.scopes else "viewer"


def _member_dict(m: Member) -> dict[str, object]:
    return {"user_id": m.user_id, "email": m.email, "role": m.role}


@router.get("", response_model=list[MemberOut], summary="Members and their roles")
def members(access: Annotated[ProjectAccess, require_project("read")], conn: ConnectionDep) -> list[MemberOut]:
    return [MemberOut.of(m) for m in list_members(conn, project_id=access.project_id)]


@router.post("", status_code=201, response_model=MemberOut,
             summary="Add a user by id (admin), or by email: an invitation is sent (202), account or not",
             responses={202: {"model": MemberInvited, "description": "by email: an invitation was sent (the same "
                                                                     "answer whether or not the address has an account)"},
                        403: {"description": "too small a role, or an API key (api.keys_cannot_manage_members)"},
                        404: {"description": "no user with that id"},
                        409: {"description": "already a member (api.already_member) or invited (pending)"}})
def add(body: MemberAdd, access: Annotated[ProjectAccess, require_project("admin")],
        conn: ConnectionDep, settings: SettingsDep) -> Any:
    people_only(access)
    if body.email is not None:
        invitation, _token = create_invitation(
            conn, default_sender(), project_id=access.project_id, email=normalize_email(body.email), role=body.role,
            invited_by=access.principal.user_id, actor_role=_actor_role(access), ttl_s=settings.invitation_ttl_s,
            base_url=settings.public_base_url)
        audit(conn, access, action="invitation.create", target_kind="invitation", target_id=invitation.id,
              after={"email": invitation.email, "role": invitation.role, "via": "members"})
        answer = MemberInvited(email=invitation.email, role=invitation.role, invitation_id=invitation.id,
                               expires_at=invitation.expires_at)
        return JSONResponse(answer.model_dump(mode="json"), status_code=202)
    user = get_user(conn, user_id=body.user_id or "")
    if user is None:
        raise NotFound("no user with that id; invite people by email instead")
    member = add_member(conn, project_id=access.project_id, user_id=user.id, role=body.role,
                        actor_role=_actor_role(access))
    audit(conn, access, action="member.add", target_kind="member", target_id=user.id, after=_member_dict(member))
    return MemberOut.of(member)


@router.patch("/{user_id}", response_model=MemberOut,
              summary="Change a member's role (admins manage lower roles; anyone may lower their own)",
              responses={409: {"description": "the owner's role changes only by transfer (api.owner_protected)"}})
def patch(user_id: str, body: RoleChange, access: Annotated[ProjectAccess, require_project("read")],
          conn: ConnectionDep) -> MemberOut:
    people_only(access)
    before, after = change_role(conn, project_id=access.project_id, user_id=user_id, role=body.role,
                                actor_user_id=access.principal.user_id, actor_role=_actor_role(access))
    audit(conn, access, action="member.role_change", target_kind="member", target_id=user_id,
          before=_member_dict(before), after=_member_dict(after))
    return MemberOut.of(after)


@router.delete("/{user_id}", status_code=204,
               summary="Remove a member (admin), or leave the project yourself; the owner cannot be removed",
               responses={409: {"description": "the owner cannot be removed (api.owner_protected)"}})
def delete(user_id: str, access: Annotated[ProjectAccess, require_project("read")],
           conn: ConnectionDep) -> Response:
    people_only(access)
    removed = remove_member(conn, project_id=access.project_id, user_id=user_id,
                            actor_user_id=access.principal.user_id, actor_role=_actor_role(access))
    audit(conn, access, action="member.remove", target_kind="member", target_id=user_id,
          before=_member_dict(removed))
    return Response(status_code=204)
