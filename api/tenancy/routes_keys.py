"""API keys of a project: create (the token is shown once), list, read, rotate, revoke.

All routes need the ``admin`` action (project admin/owner, or a key with the admin scope). Every change is
audited (without the token: the audit log never holds a secret)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from api.deps import ConnectionDep
from api.tenancy.audit import audit
from api.tenancy.auth import ProjectAccess, require_project
from api.tenancy.keys import (
    ApiKey,
    create_api_key,
    get_api_key,
    list_api_keys,
    revoke_api_key,
    rotate_api_key,
)

router = APIRouter(prefix="/api/v1/projects/{project_id}/api-keys", tags=["api keys"])

Scope = Literal["ingest", "read", "admin"]
AdminAccess = Annotated[ProjectAccess, require_project("admin")]
KeyId = Annotated[str, Path(max_length=64)]


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "production ingest", "scopes": ["ingest"], "expires_in_s": 7_776_000}]})
    name: str = Field(min_length=1, max_length=200)
    scopes: list[Scope] = Field(default_factory=lambda: list[Scope](["ingest"]), min_length=1)
    expires_at: AwareDatetime | None = Field(default=None, description="absolute expiry (UTC offset required)")
    expires_in_s: int | None = Field(default=None, gt=0, description="expiry relative to now")


class ApiKeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_s: int = Field(default=0, ge=0, le=30 * 24 * 3600,
                         description="how long the old key keeps working (0: revoked at once)")


class ApiKeyOut(BaseModel):
    id: str
    project_id: str
    name: str
    prefix: str
    display: str
    scopes: list[str]
    status: Literal["active", "revoked", "expired"]
    created_at: str
    created_by_user_id: str | None
    expires_at: str | None
    revoked_at: str | None
    last_used_at: str | None
    rotated_from: str | None

    @classmethod
    def of(cls, key: ApiKey) -> ApiKeyOut:
        return cls(**key.to_json(now=datetime.now(UTC)))


class ApiKeyIssued(ApiKeyOut):
    token: str = Field(description="the secret token; shown only in this response")


class ApiKeyRotated(BaseModel):
    previous: ApiKeyOut
    key: ApiKeyIssued


def _forget(request: Request, key_id: str) -> None:
    """Drop the key from this process's authentication cache (other processes forget it within its TTL)."""
    cache = getattr(request.app.state, "key_cache", None)
    if cache is not None:
        cache.invalidate(key_id)


def _audit_view(key: ApiKey) -> dict[str, object]:
    return key.to_json(now=datetime.now(UTC))


@router.post("", status_code=201, response_model=ApiKeyIssued, summary="Create an API key (token shown once)")
def create_key(body: ApiKeyCreate, access: AdminAccess, conn: ConnectionDep) -> ApiKeyIssued:
    expires_at = body.expires_at
    if body.expires_in_s is not None:
        relative = datetime.now(UTC) + timedelta(seconds=body.expires_in_s)
        expires_at = min(expires_at, relative) if expires_at else relative
    issued = create_api_key(conn, project_id=access.project_id, name=body.name, scopes=frozenset(body.scopes),
                            expires_at=expires_at, created_by_user_id=access.principal.user_id)
    audit(conn, access, action="api_key.create", target_kind="api_key", target_id=issued.key.id,
          after=_audit_view(issued.key))
    return ApiKeyIssued(**ApiKeyOut.of(issued.key).model_dump(), token=issued.token)


@router.get("", response_model=list[ApiKeyOut], summary="List API keys (prefixes only)")
def list_keys(access: AdminAccess, conn: ConnectionDep) -> list[ApiKeyOut]:
    return [ApiKeyOut.of(k) for k in list_api_keys(conn, project_id=access.project_id)]


@router.get("/{key_id}", response_model=ApiKeyOut, summary="Read one API key")
def read_key(key_id: KeyId, access: AdminAccess, conn: ConnectionDep) -> ApiKeyOut:
    return ApiKeyOut.of(get_api_key(conn, project_id=access.project_id, key_id=key_id))


@router.post("/{key_id}/rotate", status_code=201, response_model=ApiKeyRotated,
             summary="Rotate: a new token with the same name and scopes; the old one ends now or after grace_s")
def rotate_key(key_id: KeyId, access: AdminAccess, conn: ConnectionDep, request: Request,
               body: ApiKeyRotate | None = None) -> ApiKeyRotated:
    grace = timedelta(seconds=(body.grace_s if body else 0))
    before = get_api_key(conn, project_id=access.project_id, key_id=key_id)
    previous, issued = rotate_api_key(conn, project_id=access.project_id, key_id=key_id, grace=grace,
                                      created_by_user_id=access.principal.user_id)
    _forget(request, key_id)
    audit(conn, access, action="api_key.rotate", target_kind="api_key", target_id=key_id,
          before=_audit_view(before), after={"previous": _audit_view(previous), "successor": _audit_view(issued.key)})
    return ApiKeyRotated(previous=ApiKeyOut.of(previous),
                         key=ApiKeyIssued(**ApiKeyOut.of(issued.key).model_dump(), token=issued.token))


@router.post("/{key_id}/revoke", response_model=ApiKeyOut, summary="Revoke an API key (final; idempotent)")
def revoke_key(key_id: KeyId, access: AdminAccess, conn: ConnectionDep, request: Request) -> ApiKeyOut:
    before = get_api_key(conn, project_id=access.project_id, key_id=key_id)
    key = revoke_api_key(conn, project_id=access.project_id, key_id=key_id)
    _forget(request, key_id)
    if before.revoked_at is None:
        audit(conn, access, action="api_key.revoke", target_kind="api_key", target_id=key_id,
              before=_audit_view(before), after=_audit_view(key))
    return ApiKeyOut.of(key)


@router.delete("/{key_id}", response_model=ApiKeyOut, summary="Revoke an API key (same as POST .../revoke)")
def delete_key(key_id: KeyId, access: AdminAccess, conn: ConnectionDep, request: Request) -> ApiKeyOut:
    return revoke_key(key_id, access, conn, request)
