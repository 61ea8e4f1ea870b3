"""Who is calling and what they may do in a project.

- A JWT access token (HS256, short-lived, ``typ=access``) identifies a user; an opaque refresh token
  (``mlr_...``, stored as a sha256 hash, rotating, revocable by family) gets new access tokens.
- An API key (``mlk_<prefix>_<secret>``) identifies a project; ``api.tenancy.keys.authenticate_api_key`` checks
  it. Both modules share ``Principal`` from ``api.tenancy.principal`` (so ``keys`` never imports this module).
- ``require_project(action)`` turns a ``{project_id}`` path parameter into a ``ProjectAccess`` or refuses:
  401 without a valid token, 404 for a project the caller cannot see (existence never leaks), 403 for a
  visible project and too small a role or scope.

Roles rank owner > admin > member > viewer. Actions and what they need:

=========  =================  =========================
action     user role (min)    API key scope (any of)
=========  =================  =========================
read       viewer             read, admin
write      member (billable)  admin
admin      admin              admin
owner      owner              (never a key)
ingest     member             ingest, admin
=========  =================  =========================
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import jwt
from fastapi import Depends, Query, Request
from sqlalchemy import Connection, text
from starlette.concurrency import run_in_threadpool

from api.deps import ConnectionDep, SettingsDep
from api.errors import ApiError, Forbidden, NotFound, Unauthorized
from api.settings import ApiSettings
from api.tenancy import keys
from api.tenancy.principal import Principal

Action = Literal["read", "write", "admin", "owner", "ingest"]
Role = Literal["owner", "admin", "member", "viewer"]

ROLE_RANK: dict[str, int] = {"viewer": 1, "member": 2, "admin": 3, "owner": 4}
MIN_ROLE: dict[str, str] = {"read": "viewer", "write": "member", "admin": "admin", "owner": "owner",
                            "ingest": "member"}
KEY_SCOPES: dict[str, frozenset[str]] = {
    "read": frozenset({"read", "admin"}),
    "write": frozenset({"admin"}),
    "admin": frozenset({"admin"}),
    "owner": frozenset(),
    "ingest": frozenset({"ingest", "admin"}),
}
JWT_ALGORITHM = "HS256"
REFRESH_PREFIX = "mlr_"
API_KEY_PREFIX = "mlk_"


@dataclass(frozen=True, slots=True)
class ProjectAccess:
    project_id: str
    principal: Principal
    role: str | None  # the user's role; None for API keys
    request_id: str | None = None


def role_allows(role: str, action: str) -> bool:
    return ROLE_RANK[role] >= ROLE_RANK[MIN_ROLE[action]]


def scopes_allow(scopes: frozenset[str], action: str) -> bool:
    return bool(scopes & KEY_SCOPES[action])


# ----------------------------------------------------------------------------------------------- tokens


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def issue_access_token(settings: ApiSettings, *, user_id: str, now: datetime | None = None) -> str:
    issued = now or datetime.now(UTC)
    claims = {"sub": user_id, "typ": "access", "iat": issued,
              "exp": issued + timedelta(seconds=settings.access_token_ttl_s), "jti": uuid.uuid4().hex}
    return jwt.encode(claims, settings.jwt_secret.get_secret_value(), algorithm=JWT_ALGORITHM)


def verify_access_token(settings: ApiSettings, token: str) -> str:
    """Return the user id of a valid access token; raise Unauthorized otherwise."""
    try:
        claims = jwt.decode(token, settings.jwt_secret.get_secret_value(), algorithms=[JWT_ALGORITHM],
                            options={"require": ["exp", "sub", "typ"]})
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("the access token has expired; refresh it") from exc
    except jwt.PyJWTError as exc:
        raise Unauthorized("the access token is not valid") from exc
    if claims.get("typ") != "access":
        raise Unauthorized("the access token is not valid")
    return str(claims["sub"])


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in_s: int


def issue_refresh_token(conn: Connection, settings: ApiSettings, *, user_id: str,
                        family_id: str | None = None) -> tuple[str, str]:
    """Store a new refresh token (hash only) and return (token id, token)."""
    token = REFRESH_PREFIX + secrets.token_urlsafe(32)
    token_id = "rt_" + uuid.uuid4().hex
    conn.execute(text("""
        INSERT INTO refresh_tokens (id, user_id, family_id, token_hash, expires_at)
        VALUES (:id, :user_id, :family_id, :hash, now() + make_interval(secs => :ttl))"""),
                 {"id": token_id, "user_id": user_id, "family_id": family_id or token_id,
                  "hash": sha256_hex(token), "ttl": settings.refresh_token_ttl_s})
    return token_id, token


def issue_token_pair(conn: Connection, settings: ApiSettings, *, user_id: str,
                     family_id: str | None = None) -> TokenPair:
    _, refresh = issue_refresh_token(conn, settings, user_id=user_id, family_id=family_id)
    return TokenPair(issue_access_token(settings, user_id=user_id), refresh, settings.access_token_ttl_s)


class RefreshTokenReused(Unauthorized):
    """A rotated (already used) refresh token came back: someone holds a copy, so the family is revoked."""

    code = "api.refresh_token_reused"


def rotate_refresh_token(conn: Connection, settings: ApiSettings, *, token: str) -> tuple[str, TokenPair]:
    """Spend ``token`` and return (user id, a new pair in the same family).

    Invariant: a refresh token works once. The row is locked so two concurrent refreshes with one token
    cannot both succeed; presenting a revoked token revokes its whole family (theft detection).
    The caller must COMMIT even when this raises RefreshTokenReused, or the family revocation is lost."""
    row = conn.execute(text("""
        SELECT t.id, t.user_id, t.family_id, t.revoked_at, t.expires_at <= now() AS expired, u.disabled_at
        FROM refresh_tokens t JOIN users u ON u.id = t.user_id
        WHERE t.token_hash = :hash FOR UPDATE OF t"""), {"hash": sha256_hex(token)}).mappings().first()
    if row is None or row["expired"] or row["disabled_at"] is not None:
        raise Unauthorized("the refresh token is not valid")
    if row["revoked_at"] is not None:
        revoke_family(conn, family_id=row["family_id"])
        raise RefreshTokenReused("the refresh token was already used; every session of this login is revoked")
    new_id, new_token = issue_refresh_token(conn, settings, user_id=row["user_id"], family_id=row["family_id"])
    conn.execute(text("UPDATE refresh_tokens SET revoked_at = now(), replaced_by = :new WHERE id = :id"),
                 {"new": new_id, "id": row["id"]})
    pair = TokenPair(issue_access_token(settings, user_id=row["user_id"]), new_token, settings.access_token_ttl_s)
    return row["user_id"], pair


def revoke_family(conn: Connection, *, family_id: str) -> None:
    conn.execute(text("UPDATE refresh_tokens SET revoked_at = now() WHERE family_id = :f AND revoked_at IS NULL"),
                 {"f": family_id})


def revoke_refresh_token(conn: Connection, *, token: str) -> bool:
    """Log out: revoke the token's family. Returns False when the token is unknown."""
    row = conn.execute(text("SELECT family_id FROM refresh_tokens WHERE token_hash = :h"),
                       {"h": sha256_hex(token)}).first()
    if row is None:
        return False
    revoke_family(conn, family_id=row[0])
    return True


# ------------------------------------------------------------------------------------------ principals


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send an Authorization: Bearer <access token or API key> header",
                           extra={"hint": "POST /api/v1/auth/login for a token"})
    return token.strip()


def _authenticate_api_key(conn: Connection, token: str) -> Principal:
    principal: Principal | None = keys.authenticate_api_key(conn, token)
    if principal is None:
        raise Unauthorized("the API key is not valid")
    return principal


def get_principal(request: Request, conn: ConnectionDep, settings: SettingsDep) -> Principal:
    """Authenticate the bearer token and charge the caller's rate-limit bucket."""
    token = _bearer(request)
    if token.startswith(API_KEY_PREFIX):
        principal = _authenticate_api_key(conn, token)
    else:
        principal = Principal(kind="user", user_id=verify_access_token(settings, token))
    request.app.state.rate_limiter.check(principal.rate_key)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_user(principal: PrincipalDep) -> Principal:
    if principal.kind != "user":
        raise Forbidden("this endpoint needs a user's access token, not an API key")
    return principal


UserDep = Annotated[Principal, Depends(require_user)]


def project_access(conn: Connection, principal: Principal, project_id: str, action: str,
                   request_id: str | None = None) -> ProjectAccess:
    """The access check itself (routes use ``require_project``; services may call this directly)."""
    if principal.kind == "api_key":
        if principal.project_id != project_id:
            raise NotFound("project not found")
        if not scopes_allow(principal.scopes, action):
            raise Forbidden(f"this API key's scopes do not allow '{action}' in this project",
                            extra={"required_action": action})
        return ProjectAccess(project_id, principal, None, request_id)
    role = conn.execute(text("SELECT role FROM project_members WHERE project_id = :p AND user_id = :u"),
                        {"p": project_id, "u": principal.user_id}).scalar()
    if role is None:
        raise NotFound("project not found")
    if not role_allows(role, action):
        raise Forbidden(f"your role '{role}' does not allow '{action}' in this project",
                        extra={"role": role, "required_role": MIN_ROLE[action]})
    return ProjectAccess(project_id, principal, role, request_id)


def require_project(action: Action) -> Any:
    """``Depends`` for routes with a ``{project_id}`` path parameter; yields a ``ProjectAccess``."""

    def dependency(project_id: str, request: Request, principal: PrincipalDep,
                   conn: ConnectionDep) -> ProjectAccess:
        return project_access(conn, principal, project_id, action, getattr(request.state, "request_id", None))

    dependency.__name__ = f"require_project_{action}"
    return Depends(dependency)


def require_ingest_project() -> Any:
    """``Depends`` for ingest routes without a project in the path: the key's project, or ``?project_id=``."""

    def dependency(request: Request, principal: PrincipalDep, conn: ConnectionDep,
                   project_id: Annotated[str | None, Query(description="the project (user tokens only; an "
                                                                       "API key implies its project)")] = None,
                   ) -> ProjectAccess:
        rid = getattr(request.state, "request_id", None)
        if principal.kind == "api_key":
            assert principal.project_id is not None
            if project_id is not None and project_id != principal.project_id:
                raise NotFound("project not found")
            return project_access(conn, principal, principal.project_id, "ingest", rid)
        if project_id is None:
            raise ApiError("a user token must name the project: ?project_id=...", status=422)
        return project_access(conn, principal, project_id, "ingest", rid)

    return Depends(dependency)


# ------------------------------------------------------------------------ the money hot path (async, no DB)


@dataclass(frozen=True, slots=True)
class DeferredAccess:
    """An authenticated caller whose project check may still need the database (a user's role).

    API keys are checked completely in the dependency (the key names its project and scopes). A user's role
    is read by ``resolve`` on the operation's own connection, in its transaction, BEFORE anything is locked:
    the hot routes then need one thread hop and no extra connection checkout."""

    principal: Principal
    project_id: str
    action: str
    request_id: str | None
    access: ProjectAccess | None  # already complete (API keys)

    def resolve(self, conn: Connection) -> ProjectAccess:
        if self.access is not None:
            return self.access
        return project_access(conn, self.principal, self.project_id, self.action, self.request_id)


def _authenticate_key_and_cache(request: Request, token: str) -> Principal:
    """The full API-key check on a short transaction; the principal is cached per app (``KeyCache``)."""
    with request.app.state.engine.begin() as conn:
        principal = get_principal(request, conn, request.app.state.settings)
        cache = getattr(request.app.state, "key_cache", None)
        if cache is not None and principal.kind == "api_key" and principal.key_id is not None:
            cache.put(token, principal, expires_at=keys.key_expiry(conn, principal.key_id),
                      now_monotonic=time.monotonic())
    return principal


def require_project_deferred(action: Action) -> Any:
    """``Depends`` for the hot money routes: like ``require_project``, but async and without a database round
    trip for a recently seen API key.

    Revocation, stated: API keys come from the same per-app ``KeyCache`` as ingestion (``app.state.key_cache``,
    TTL ``API_INGEST_AUTH_CACHE_S``, 5 s). Revoking or rotating a key through THIS process drops it at once
    (api/tenancy/routes_keys.py); another API process keeps accepting it for at most the TTL. Expiry is re-checked on
    every hit. User tokens are verified here (signature, expiry) and their role is read in the operation's
    transaction (``DeferredAccess.resolve``), so a role change applies to the next request."""

    async def dependency(project_id: str, request: Request) -> DeferredAccess:
        rid = getattr(request.state, "request_id", None)
        token = _bearer(request)
        if token.startswith(API_KEY_PREFIX):
            cache = getattr(request.app.state, "key_cache", None)
            cached: Principal | None = cache.get(token, now_monotonic=time.monotonic()) if cache is not None else None
            if cached is None:
                key_principal = await run_in_threadpool(_authenticate_key_and_cache, request, token)
            else:
                key_principal = cached
                request.app.state.rate_limiter.check(key_principal.rate_key)
            access = project_access(None, key_principal, project_id, action, rid)  # type: ignore[arg-type]
            return DeferredAccess(key_principal, project_id, action, rid, access)
        principal = Principal(kind="user", user_id=verify_access_token(request.app.state.settings, token))
        request.app.state.rate_limiter.check(principal.rate_key)
        return DeferredAccess(principal, project_id, action, rid, None)

    dependency.__name__ = f"require_project_deferred_{action}"
    return Depends(dependency)


def auth_rate_limit(request: Request) -> None:
    """Per-client-address bucket for the anonymous endpoints (signup, login, refresh, invitation peek)."""
    client = request.client.host if request.client else "unknown"
    request.app.state.auth_rate_limiter.check(f"ip:{client}")


AuthRateLimit = Depends(auth_rate_limit)
