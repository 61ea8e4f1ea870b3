"""Project members: list, add an existing user, change a role, remove (or leave)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.deps import ConnectionDep
from api.errors import NotFound
from api.tenancy.audit import audit
from api.tenancy.auth import ProjectAccess, require_project
from api.tenancy.projects import Member, add_member, change_role, list_members, remove_member
from api.tenancy.users import find_user_by_email, get_user

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


class MemberAdd(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"email": "grace@example.com", "role": "member"}]})
    email: str | None = Field(default=None, max_length=320)
    user_id: str | None = None
    role: Literal["admin", "member", "viewer"]

    @model_validator(mode="after")
    def _one_identity(self) -> MemberAdd:
        if (self.email is None) == (self.user_id is None):
            raise ValueError("give exactly one of email or user_id")
        return self


class RoleChange(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"role": "viewer"}]})
    role: Literal["admin", "member", "viewer"]


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
             summary="Add an existing user directly (admin); invite people without an account instead",
             responses={404: {"description": "no user with that email/id"},
                        409: {"description": "already a member (api.already_member)"}})
def add(body: MemberAdd, access: Annotated[ProjectAccess, require_project("admin")],
        conn: ConnectionDep) -> MemberOut:
    user = find_user_by_email(conn, email=body.email) if body.email else get_user(conn, user_id=body.user_id or "")
    if user is None:
        raise NotFound("no user with that identity; send an invitation instead")
    member = add_member(conn, project_id=access.project_id, user_id=user.id, role=body.role,
                        actor_role=_actor_role(access))
    audit(conn, access, action="member.add", target_kind="member", target_id=user.id, after=_member_dict(member))
    return MemberOut.of(member)


@router.patch("/{user_id}", response_model=MemberOut,
              summary="Change a member's role (admins manage lower roles; anyone may lower their own)",
              responses={409: {"description": "the owner's role changes only by transfer (api.owner_protected)"}})
def patch(user_id: str, body: RoleChange, access: Annotated[ProjectAccess, require_project("read")],
          conn: ConnectionDep) -> MemberOut:
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
    removed = remove_member(conn, project_id=access.project_id, user_id=user_id,
                            actor_user_id=access.principal.user_id, actor_role=_actor_role(access))
    audit(conn, access, action="member.remove", target_kind="member", target_id=user_id,
          before=_member_dict(removed))
    return Response(status_code=204)
