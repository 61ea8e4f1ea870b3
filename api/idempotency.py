"""Idempotency-Key handling for money operations (Stripe's semantics, stored in PostgreSQL).

Protocol, all inside the ONE database transaction that also performs the operation:
1. take a transaction-scoped advisory lock on (project, key) — a concurrent twin of the same request waits
   here instead of racing, and sees the record once the first one commits;
2. look the key up: same request fingerprint → replay the stored status and body (header
   ``Idempotent-Replayed: true``), nothing runs again; different fingerprint → 409 ``api.idempotency_conflict``;
3. otherwise run the operation and store (fingerprint, status, body) before the transaction commits.

Because the record and the operation commit together there is no window where one exists without the
other. Only successful (2xx) results are stored: a refused request (402 insufficient credits, 409 hold not
active...) rolls back and leaves the key unused, so the client may retry it with the same key once the
situation has changed. Keys are scoped per project; the ledger key of the resulting posting is derived from
the project and the client key, so even a lost record could not post twice.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse
from sqlalchemy import Connection, text

from api.errors import ApiError, Conflict

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
_VALID_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces


class IdempotencyKeyRequired(ApiError):
    status = 400
    code = "api.idempotency_key_required"


class IdempotencyKeyReused(Conflict):
    code = "api.idempotency_conflict"


def require_key(value: str | None) -> str:
    if value is None or not value.strip():
        raise IdempotencyKeyRequired(f"money operations need an {IDEMPOTENCY_HEADER} header (a unique string "
                                     "per operation; reuse it when retrying the same request)")
    if not _VALID_KEY.match(value):
        raise IdempotencyKeyRequired(f"{IDEMPOTENCY_HEADER} must be 1-255 printable ASCII characters")
    return value


def fingerprint(*, method: str, path: str, body: Any) -> str:
    """sha256 over the method, the concrete path and the canonical JSON of the parsed body."""
    canonical = orjson.dumps({"m": method, "p": path, "b": body}, option=orjson.OPT_SORT_KEYS, default=str)
    return hashlib.sha256(canonical).hexdigest()


def ledger_key(project_id: str, key: str, *, suffix: str = "") -> str:
    """The ledger's (globally unique) idempotency key for a client key in a project."""
    return f"api:{project_id}:{key}{suffix}"


def lookup(conn: Connection, *, project_id: str, key: str, request_fingerprint: str) -> JSONResponse | None:
    """Lock the key for this transaction and return the stored response to replay, if any."""
    # Two statements on purpose: under READ COMMITTED a statement's snapshot is taken when it starts, so a
    # lookup in the same statement as the lock wait would not see the twin's record committed meanwhile.
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:p || chr(31) || :k, 7))"),
                 {"p": project_id, "k": key})
    row = conn.execute(text("""
        SELECT request_fingerprint, status_code, response_body FROM idempotency_records
        WHERE project_id = :p AND idempotency_key = :k"""), {"p": project_id, "k": key}).first()
    if row is None:
        return None
    if row.request_fingerprint != request_fingerprint:
        raise IdempotencyKeyReused(f"the {IDEMPOTENCY_HEADER} {key!r} was already used for a different request",
                                   extra={"idempotency_key": key})
    return JSONResponse(row.response_body, status_code=row.status_code, headers={REPLAYED_HEADER: "true"})


def store(conn: Connection, *, project_id: str, key: str, request_fingerprint: str, status_code: int,
          body: Any) -> None:
    conn.execute(text("""
        INSERT INTO idempotency_records (project_id, idempotency_key, request_fingerprint, status_code, response_body)
        VALUES (:p, :k, :f, :s, CAST(:b AS jsonb))"""),
                 {"p": project_id, "k": key, "f": request_fingerprint, "s": status_code,
                  "b": orjson.dumps(body).decode()})


def run_idempotent(conn: Connection, request: Request, *, project_id: str, key: str | None, body: Any,
                   operation: Callable[[str], tuple[int, Any]]) -> JSONResponse:
    """Replay or run ``operation(key)`` (which returns (status, JSON-able body)) and store its result."""
    client_key = require_key(key)
    request_fingerprint = fingerprint(method=request.method, path=request.url.path, body=body)
    replay = lookup(conn, project_id=project_id, key=client_key, request_fingerprint=request_fingerprint)
    if replay is not None:
        return replay
    status_code, response_body = operation(client_key)
    store(conn, project_id=project_id, key=client_key, request_fingerprint=request_fingerprint,
          status_code=status_code, body=response_body)
    return JSONResponse(response_body, status_code=status_code, headers={REPLAYED_HEADER: "false"})


def purge_older_than(conn: Connection, *, days: int) -> int:
    """Maintenance: keys are kept ``days`` (Stripe keeps 24 h; keep longer than any client's retry window)."""
    return int(conn.execute(text("DELETE FROM idempotency_records WHERE created_at < now() - make_interval(days => :d)"),
                            {"d": days}).rowcount or 0)
