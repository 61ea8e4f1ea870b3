"""The audit log: who changed what, when, from what to what, in which request.

Append-only (a trigger refuses UPDATE/DELETE/TRUNCATE). ``record_audit`` writes in the caller's
transaction, so an audited change and its audit row commit or roll back together — there is never a change
without its record nor a record of a change that did not happen. Every mutating route calls it; money
operations record the ledger transaction id as the target."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, text

from api.pagination import LIMIT_DEFAULT, cursor_int, encode_cursor
from api.tenancy.auth import ProjectAccess
from api.tenancy.principal import Principal


def _json(value: Any) -> str | None:
    if value is None:
        return None
    return orjson.dumps(value, default=str).decode()


def record_audit(conn: Connection, *, project_id: str | None, principal: Principal | None, action: str,
                 target_kind: str, target_id: str | None, before: Any = None, after: Any = None,
                 request_id: str | None = None) -> int:
    """Append one audit row (``principal`` None = the system, e.g. the scheduler). Returns its id."""
    kind = "system" if principal is None else principal.kind
    return int(conn.execute(text("""
        INSERT INTO audit_log (project_id, actor_kind, actor_user_id, actor_key_id, action, target_kind,
                               target_id, before, after, request_id)
        VALUES (:project_id, :kind, :user_id, :key_id, :action, :target_kind, :target_id,
                CAST(:before AS jsonb), CAST(:after AS jsonb), :request_id)
        RETURNING id"""), {
        "project_id": project_id, "kind": kind,
        "user_id": principal.user_id if principal else None, "key_id": principal.key_id if principal else None,
        "action": action, "target_kind": target_kind, "target_id": target_id,
        "before": _json(before), "after": _json(after), "request_id": request_id}).scalar_one())


def audit(conn: Connection, access: ProjectAccess, *, action: str, target_kind: str, target_id: str | None,
          before: Any = None, after: Any = None) -> int:
    """``record_audit`` for a route that holds a ``ProjectAccess``."""
    return record_audit(conn, project_id=access.project_id, principal=access.principal, action=action,
                        target_kind=target_kind, target_id=target_id, before=before, after=after,
                        request_id=access.request_id)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    project_id: str | None
    actor_kind: str
    actor_user_id: str | None
    actor_key_id: str | None
    action: str
    target_kind: str
    target_id: str | None
    before: Any
    after: Any
    request_id: str | None
    created_at: datetime


def list_audit(conn: Connection, *, project_id: str, cursor: str | None = None, limit: int = LIMIT_DEFAULT,
               action: str | None = None, target_kind: str | None = None, target_id: str | None = None,
               actor_user_id: str | None = None, actor_key_id: str | None = None,
               since: datetime | None = None, until: datetime | None = None,
               ) -> tuple[list[AuditEntry], str | None]:
    """Newest first. ``action`` matches exactly or, ending in ``*``, by prefix (``member.*``)."""
    before_id = cursor_int(cursor, "id")
    clauses = ["project_id = :project_id"]
    params: dict[str, Any] = {"project_id": project_id, "limit": limit + 1}
    if before_id is not None:
        clauses.append("id < :before_id")
        params["before_id"] = before_id
    if action:
        if action.endswith("*"):
            clauses.append("action LIKE :action")
            params["action"] = action[:-1].replace("%", r"\%").replace("_", r"\_") + "%"
        else:
            clauses.append("action = :action")
            params["action"] = action
    for name, value in (("target_kind", target_kind), ("target_id", target_id),
                        ("actor_user_id", actor_user_id), ("actor_key_id", actor_key_id)):
        if value is not None:
            clauses.append(f"{name} = :{name}")
            params[name] = value
    if since is not None:
        clauses.append("created_at >= :since")
        params["since"] = since
    if until is not None:
        clauses.append("created_at < :until")
        params["until"] = until
    rows = conn.execute(text(f"""
        SELECT id, project_id, actor_kind, actor_user_id, actor_key_id, action, target_kind, target_id,
               before, after, request_id, created_at
        FROM audit_log WHERE {' AND '.join(clauses)} ORDER BY id DESC LIMIT :limit"""), params).mappings().all()
    entries = [AuditEntry(**dict(r)) for r in rows[:limit]]
    next_cursor = encode_cursor({"id": entries[-1].id}) if len(rows) > limit and entries else None
    return entries, next_cursor
