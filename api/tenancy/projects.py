"""Projects (the tenant boundary) and their members.

Invariants (each function keeps them inside the caller's transaction):
- every project has exactly one member with role 'owner', and ``projects.owner_user_id`` names that member;
- the owner is never removed or demoted except by ``transfer_ownership``, which swaps both in one
  transaction (so a project always has its owner, the last owner included);
- nobody changes or removes a member who ranks at or above them (an admin cannot touch another admin or
  the owner), and nobody grants a role above their own; anyone but the owner may leave on their own.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError

from api.errors import ApiError, Conflict, Forbidden, NotFound
from api.tenancy.auth import ROLE_RANK

ASSIGNABLE_ROLES = ("admin", "member", "viewer")


class ExternalKeyTaken(Conflict):
    code = "api.external_key_taken"


class AlreadyMember(Conflict):
    code = "api.already_member"


class OwnerProtected(Conflict):
    """The owner can only change through an ownership transfer."""

    code = "api.owner_protected"


class InvalidRole(ApiError):
    status = 422
    code = "api.invalid_role"


@dataclass(frozen=True, slots=True)
class Project:
    id: str
    name: str
    external_key: str | None
    owner_user_id: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_mapping(cls, row: Any) -> Project:
        return cls(**{name: row[name] for name in cls.__slots__})

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class Member:
    project_id: str
    user_id: str
    email: str
    display_name: str | None
    role: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_mapping(cls, row: Any) -> Member:
        return cls(**{name: row[name] for name in cls.__slots__})


_PROJECT_COLUMNS = "id, name, external_key, owner_user_id, created_at, updated_at"


def new_project_id() -> str:
    return "prj_" + uuid.uuid4().hex[:16]


def create_project(conn: Connection, *, name: str, owner_user_id: str, external_key: str | None = None,
                   project_id: str | None = None) -> Project:
    try:
        with conn.begin_nested():
            row = conn.execute(text(f"""
                INSERT INTO projects (id, name, external_key, owner_user_id) VALUES (:id, :name, :ek, :owner)
                RETURNING {_PROJECT_COLUMNS}"""),
                {"id": project_id or new_project_id(), "name": name, "ek": external_key,
                 "owner": owner_user_id}).mappings().one()
    except IntegrityError as exc:
        raise ExternalKeyTaken("another project already uses this external key") from exc
    conn.execute(text("INSERT INTO project_members (project_id, user_id, role) VALUES (:p, :u, 'owner')"),
                 {"p": row["id"], "u": owner_user_id})
    return Project.from_mapping(row)


def get_project(conn: Connection, *, project_id: str) -> Project:
    row = conn.execute(text(f"SELECT {_PROJECT_COLUMNS} FROM projects WHERE id = :id"),
                       {"id": project_id}).mappings().first()
    if row is None:
        raise NotFound("project not found")
    return Project.from_mapping(row)


def list_projects_for_user(conn: Connection, *, user_id: str, external_key: str | None = None,
                           ) -> list[tuple[Project, str]]:
    """The user's projects with their role in each (only projects the user is a member of)."""
    rows = conn.execute(text(f"""
        SELECT {', '.join('p.' + c.strip() for c in _PROJECT_COLUMNS.split(','))}, m.role
        FROM projects p JOIN project_members m ON m.project_id = p.id
        WHERE m.user_id = :u AND (CAST(:ek AS text) IS NULL OR p.external_key = :ek)
        ORDER BY p.created_at, p.id"""), {"u": user_id, "ek": external_key}).mappings().all()
    return [(Project.from_mapping(r), r["role"]) for r in rows]


def update_project(conn: Connection, *, project_id: str, changes: dict[str, Any]) -> tuple[Project, Project]:
    """Apply ``changes`` (name, external_key); return (before, after)."""
    before = get_project(conn, project_id=project_id)
    allowed = {k: v for k, v in changes.items() if k in ("name", "external_key")}
    if not allowed:
        return before, before
    sets = ", ".join(f"{k} = :{k}" for k in allowed)
    try:
        with conn.begin_nested():
            row = conn.execute(text(f"""
                UPDATE projects SET {sets}, updated_at = now() WHERE id = :id RETURNING {_PROJECT_COLUMNS}"""),
                {**allowed, "id": project_id}).mappings().one()
    except IntegrityError as exc:
        raise ExternalKeyTaken("another project already uses this external key") from exc
    return before, Project.from_mapping(row)


# ------------------------------------------------------------------------------------------------ members

_MEMBER_SELECT = """
    SELECT m.project_id, m.user_id, u.email, u.display_name, m.role, m.created_at, m.updated_at
    FROM project_members m JOIN users u ON u.id = m.user_id"""


def list_members(conn: Connection, *, project_id: str) -> list[Member]:
    rows = conn.execute(text(_MEMBER_SELECT + " WHERE m.project_id = :p ORDER BY m.created_at, m.user_id"),
                        {"p": project_id}).mappings().all()
    return [Member.from_mapping(r) for r in rows]


def get_member(conn: Connection, *, project_id: str, user_id: str, lock: bool = False) -> Member:
    row = conn.execute(text(_MEMBER_SELECT + " WHERE m.project_id = :p AND m.user_id = :u"
                            + (" FOR UPDATE OF m" if lock else "")),
                       {"p": project_id, "u": user_id}).mappings().first()
    if row is None:
        raise NotFound("no such member in this project")
    return Member.from_mapping(row)


def _check_assignable(role: str, *, actor_role: str) -> None:
    if role not in ASSIGNABLE_ROLES:
        raise InvalidRole(f"role must be one of {', '.join(ASSIGNABLE_ROLES)} (ownership moves by transfer)")
    if ROLE_RANK[role] > ROLE_RANK[actor_role]:
        raise Forbidden(f"a {actor_role} cannot grant the role '{role}'")


def add_member(conn: Connection, *, project_id: str, user_id: str, role: str, actor_role: str) -> Member:
    _check_assignable(role, actor_role=actor_role)
    try:
        with conn.begin_nested():
            conn.execute(text("INSERT INTO project_members (project_id, user_id, role) VALUES (:p, :u, :r)"),
                         {"p": project_id, "u": user_id, "r": role})
    except IntegrityError as exc:
        raise AlreadyMember("this user is already a member of the project") from exc
    return get_member(conn, project_id=project_id, user_id=user_id)


def change_role(conn: Connection, *, project_id: str, user_id: str, role: str, actor_user_id: str | None,
                actor_role: str) -> tuple[Member, Member]:
    """Return (before, after)."""
    before = get_member(conn, project_id=project_id, user_id=user_id, lock=True)
    if before.role == "owner":
        raise OwnerProtected("the owner's role changes only by transferring ownership")
    _check_assignable(role, actor_role=actor_role)
    if user_id != actor_user_id:
        if ROLE_RANK[actor_role] < ROLE_RANK["admin"]:
            raise Forbidden("only admins and the owner change other members' roles")
        if ROLE_RANK[before.role] >= ROLE_RANK[actor_role]:
            raise Forbidden(f"a {actor_role} cannot change the role of a {before.role}")
    if user_id == actor_user_id and ROLE_RANK[role] > ROLE_RANK[before.role]:
        raise Forbidden("you cannot raise your own role")
    conn.execute(text("UPDATE project_members SET role = :r, updated_at = now() WHERE project_id = :p AND user_id = :u"),
                 {"r": role, "p": project_id, "u": user_id})
    return before, get_member(conn, project_id=project_id, user_id=user_id)


def remove_member(conn: Connection, *, project_id: str, user_id: str, actor_user_id: str | None,
                  actor_role: str | None) -> Member:
    """Remove a member (or let one leave). Returns the removed member."""
    before = get_member(conn, project_id=project_id, user_id=user_id, lock=True)
    if before.role == "owner":
        raise OwnerProtected("the owner cannot be removed; transfer ownership first")
    leaving = user_id == actor_user_id
    if not leaving:
        if actor_role is None or ROLE_RANK[actor_role] < ROLE_RANK["admin"]:
            raise Forbidden("only admins and the owner remove other members")
        if ROLE_RANK[before.role] >= ROLE_RANK[actor_role]:
            raise Forbidden(f"a {actor_role} cannot remove a {before.role}")
    conn.execute(text("DELETE FROM project_members WHERE project_id = :p AND user_id = :u"),
                 {"p": project_id, "u": user_id})
    return before


def transfer_ownership(conn: Connection, *, project_id: str, from_user_id: str, to_user_id: str,
                       previous_owner_role: str = "admin") -> tuple[Member, Member]:
    """Make ``to_user_id`` (an existing member) the owner; the previous owner becomes ``previous_owner_role``.

    The project row is locked first so two concurrent transfers serialize and exactly one owner remains."""
    owner = conn.execute(text("SELECT owner_user_id FROM projects WHERE id = :p FOR UPDATE"),
                         {"p": project_id}).scalar()
    if owner is None:
        raise NotFound("project not found")
    if owner != from_user_id:
        raise Forbidden("only the current owner can transfer ownership")
    if to_user_id == from_user_id:
        raise Conflict("you already own this project")
    if previous_owner_role not in ASSIGNABLE_ROLES:
        raise InvalidRole(f"previous_owner_role must be one of {', '.join(ASSIGNABLE_ROLES)}")
    get_member(conn, project_id=project_id, user_id=to_user_id, lock=True)  # 404 unless already a member
    conn.execute(text("""
        UPDATE project_members SET role = CASE WHEN user_id = :to THEN 'owner' ELSE :prev END, updated_at = now()
        WHERE project_id = :p AND user_id IN (:to, :from)"""),
                 {"p": project_id, "to": to_user_id, "from": from_user_id, "prev": previous_owner_role})
    conn.execute(text("UPDATE projects SET owner_user_id = :to, updated_at = now() WHERE id = :p"),
                 {"p": project_id, "to": to_user_id})
    return (get_member(conn, project_id=project_id, user_id=from_user_id),
            get_member(conn, project_id=project_id, user_id=to_user_id))
