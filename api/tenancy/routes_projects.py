"""Projects: the tenant boundary. Create, list (optionally by external key), read, rename, transfer ownership."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from api.deps import ConnectionDep
from api.tenancy.audit import audit, record_audit
from api.tenancy.auth import PrincipalDep, ProjectAccess, UserDep, require_project, scopes_allow
from api.tenancy.projects import (
    Project,
    get_project,
    list_projects_for_user,
    transfer_ownership,
    update_project,
)
from api.tenancy.routes_members import MemberOut

router = APIRouter(prefix="/api/v1/projects", tags=["projects"])

EXTERNAL_KEY = Field(default=None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@/-]+$",
                     description="your own identifier for this tenant (unique across projects)")


class ProjectCreate(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "Acme AI", "external_key": "acme-42"}]})
    name: str = Field(min_length=1, max_length=200)
    external_key: str | None = EXTERNAL_KEY


class ProjectPatch(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "Acme AI (EU)"}]})
    name: str | None = Field(default=None, min_length=1, max_length=200)
    external_key: str | None = EXTERNAL_KEY


class ProjectOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "prj_0123456789abcdef", "name": "Acme AI", "external_key": "acme-42",
        "owner_user_id": "usr_0a1b2c", "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z", "role": "owner"}]})
    id: str
    name: str
    external_key: str | None
    owner_user_id: str
    created_at: datetime
    updated_at: datetime
    role: str | None = Field(default=None, description="the caller's role (None for API keys)")

    @classmethod
    def of(cls, project: Project, role: str | None) -> ProjectOut:
        return cls(**project.as_dict(), role=role)


class OwnershipTransfer(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"user_id": "usr_9f8e7d",
                                                               "previous_owner_role": "admin"}]})
    user_id: str = Field(description="an existing member who becomes the owner")
    previous_owner_role: Literal["admin", "member", "viewer"] = "admin"


class OwnershipTransferOut(BaseModel):
    previous_owner: MemberOut
    new_owner: MemberOut


@router.post("", status_code=201, response_model=ProjectOut, summary="Create a project; you become its owner",
             responses={409: {"description": "external key already used (api.external_key_taken)"}})
def create_project(body: ProjectCreate, principal: UserDep, conn: ConnectionDep) -> ProjectOut:
    from api.tenancy.projects import create_project as create

    assert principal.user_id is not None
    project = create(conn, name=body.name, owner_user_id=principal.user_id, external_key=body.external_key)
    record_audit(conn, project_id=project.id, principal=principal, action="project.create", target_kind="project",
                 target_id=project.id, after=project.as_dict())
    return ProjectOut.of(project, "owner")


@router.get("", response_model=list[ProjectOut], summary="Projects you can see (filter by external key)")
def list_projects(principal: PrincipalDep, conn: ConnectionDep,
                  external_key: Annotated[str | None, Query(max_length=200)] = None) -> list[ProjectOut]:
    if principal.kind == "api_key":
        assert principal.project_id is not None
        if not scopes_allow(principal.scopes, "read"):
            return []
        project = get_project(conn, project_id=principal.project_id)
        matches = external_key is None or project.external_key == external_key
        return [ProjectOut.of(project, None)] if matches else []
    assert principal.user_id is not None
    return [ProjectOut.of(p, role) for p, role in
            list_projects_for_user(conn, user_id=principal.user_id, external_key=external_key)]


@router.get("/{project_id}", response_model=ProjectOut, summary="One project",
            responses={404: {"description": "no such project, or not yours"}})
def read_project(access: Annotated[ProjectAccess, require_project("read")], conn: ConnectionDep) -> ProjectOut:
    return ProjectOut.of(get_project(conn, project_id=access.project_id), access.role)


@router.patch("/{project_id}", response_model=ProjectOut, summary="Rename a project or change its external key (admin)")
def patch_project(body: ProjectPatch, access: Annotated[ProjectAccess, require_project("admin")],
                  conn: ConnectionDep) -> ProjectOut:
    before, after = update_project(conn, project_id=access.project_id, changes=body.model_dump(exclude_unset=True))
    audit(conn, access, action="project.update", target_kind="project", target_id=access.project_id,
          before=before.as_dict(), after=after.as_dict())
    return ProjectOut.of(after, access.role)


@router.post("/{project_id}/ownership-transfer", response_model=OwnershipTransferOut,
             summary="Hand the project to another member (owner only); you keep the role you choose",
             responses={404: {"description": "the new owner is not a member"}})
def ownership_transfer(body: OwnershipTransfer, access: Annotated[ProjectAccess, require_project("owner")],
                       conn: ConnectionDep) -> OwnershipTransferOut:
    assert access.principal.user_id is not None
    previous, new = transfer_ownership(conn, project_id=access.project_id, from_user_id=access.principal.user_id,
                                       to_user_id=body.user_id, previous_owner_role=body.previous_owner_role)
    audit(conn, access, action="project.ownership_transfer", target_kind="project", target_id=access.project_id,
          before={"owner_user_id": previous.user_id}, after={"owner_user_id": new.user_id,
                                                             "previous_owner_role": previous.role})
    return OwnershipTransferOut(previous_owner=MemberOut.of(previous), new_owner=MemberOut.of(new))
