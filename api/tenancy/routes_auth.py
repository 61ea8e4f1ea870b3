"""Sign-up, login, token refresh (rotating), logout, and who-am-I."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Body, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import ConnectionDep, EngineDep, SettingsDep
from api.errors import NotFound, Unauthorized
from api.tenancy.auth import (
    AuthRateLimit,
    PrincipalDep,
    TokenPair,
    UserDep,
    issue_token_pair,
    revoke_refresh_token,
    rotate_refresh_token,
)
from api.tenancy.projects import list_projects_for_user
from api.tenancy.users import User, authenticate_password, create_user, get_user

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])


class SignupRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"email": "ada@example.com", "password": "correct horse battery", "display_name": "Ada"}]})
    email: str = Field(max_length=320)
    password: str = Field(min_length=1, max_length=1024)
    display_name: str | None = Field(default=None, max_length=200)


class LoginRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"email": "ada@example.com", "password": "correct horse battery"}]})
    email: str = Field(max_length=320)
    password: str = Field(max_length=1024)


class RefreshRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"refresh_token": "mlr_..."}]})
    refresh_token: str = Field(max_length=200)


class UserOut(BaseModel):
    id: str
    email: str
    display_name: str | None
    created_at: datetime

    @classmethod
    def of(cls, user: User) -> UserOut:
        return cls(id=user.id, email=user.email, display_name=user.display_name, created_at=user.created_at)


class TokenResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "user": {"id": "usr_0a1b2c", "email": "ada@example.com", "display_name": "Ada",
                 "created_at": "2026-01-01T00:00:00Z"},
        "access_token": "eyJ...", "refresh_token": "mlr_...", "token_type": "bearer", "expires_in_s": 900}]})
    user: UserOut
    access_token: str
    refresh_token: str
    token_type: str = "bearer"
    expires_in_s: int


class MembershipOut(BaseModel):
    project_id: str
    project_name: str
    role: str


class MeResponse(BaseModel):
    user: UserOut
    projects: list[MembershipOut]


def _tokens(user: User, pair: TokenPair) -> TokenResponse:
    return TokenResponse(user=UserOut.of(user), access_token=pair.access_token, refresh_token=pair.refresh_token,
                         expires_in_s=pair.expires_in_s)


@router.post("/signup", status_code=201, response_model=TokenResponse, dependencies=[AuthRateLimit],
             summary="Create an account and sign in",
             responses={409: {"description": "the email already has an account (api.email_taken)"},
                        422: {"description": "invalid email or too short a password"}})
def signup(body: SignupRequest, conn: ConnectionDep, settings: SettingsDep) -> TokenResponse:
    user = create_user(conn, email=body.email, password=body.password, display_name=body.display_name)
    return _tokens(user, issue_token_pair(conn, settings, user_id=user.id))


@router.post("/login", response_model=TokenResponse, dependencies=[AuthRateLimit],
             summary="Exchange email and password for an access and a refresh token",
             responses={401: {"description": "wrong email or password"}})
def login(body: LoginRequest, conn: ConnectionDep, settings: SettingsDep) -> TokenResponse:
    user = authenticate_password(conn, email=body.email, password=body.password)
    return _tokens(user, issue_token_pair(conn, settings, user_id=user.id))


@router.post("/refresh", response_model=TokenResponse, dependencies=[AuthRateLimit],
             summary="Rotate a refresh token: the old one stops working, a new pair is returned",
             responses={401: {"description": "unknown, expired or already-used refresh token (reuse revokes "
                                             "every token of that login)"}})
def refresh(body: RefreshRequest, engine: EngineDep, settings: SettingsDep) -> TokenResponse:
    # Own transaction: a reused token must revoke its family AND answer 401, so commit before raising.
    failure: Unauthorized | None = None
    with engine.begin() as conn:
        try:
            user_id, pair = rotate_refresh_token(conn, settings, token=body.refresh_token)
            user = get_user(conn, user_id=user_id)
        except Unauthorized as exc:
            failure = exc
    if failure is not None:
        raise failure
    if user is None:
        raise NotFound("user not found")
    return _tokens(user, pair)


@router.post("/logout", status_code=204, summary="Revoke a refresh token and every token rotated from it")
def logout(conn: ConnectionDep, body: RefreshRequest = Body()) -> Response:
    revoke_refresh_token(conn, token=body.refresh_token)
    return Response(status_code=204)


@router.get("/me", response_model=MeResponse, summary="The signed-in user and their projects with roles")
def me(principal: UserDep, conn: ConnectionDep) -> MeResponse:
    assert principal.user_id is not None
    user = get_user(conn, user_id=principal.user_id)
    if user is None:
        raise Unauthorized("the account no longer exists")
    projects = list_projects_for_user(conn, user_id=user.id)
    return MeResponse(user=UserOut.of(user), projects=[
        MembershipOut(project_id=p.id, project_name=p.name, role=role) for p, role in projects])


class KeySelfOut(BaseModel):
    key_id: str
    project_id: str
    scopes: list[str]


@router.get("/key", response_model=KeySelfOut,
            summary="The calling API key: its project and scopes (tools that hold only a key start here)")
def key_self(principal: PrincipalDep) -> KeySelfOut:
    if principal.kind != "api_key":
        raise NotFound("this route answers for an API key (Authorization: Bearer mlk_...)")
    assert principal.key_id is not None and principal.project_id is not None
    return KeySelfOut(key_id=principal.key_id, project_id=principal.project_id, scopes=sorted(principal.scopes))
