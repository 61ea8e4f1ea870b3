"""Idempotency-Key handling for money operations (Stripe's semantics, stored in PostgreSQL).

Protocol, all inside the ONE database transaction that also performs the operation:
1. take a transaction-scoped advisory lock on (project, key) — a concurrent twin of the same request waits
   here instead of racing, and sees the record once the first one commits;
2. look the key up: same request fingerprint → replay the stored status and body (header
   ``Idempotent-Replayed: true``), nothing runs again; different fingerprint → 409 ``api.idempotency_conflict``;
3. otherwise run the operation and store (fingerprint, status, body) before the transaction commits.

Because the record and the operation commit together there is no window where one exists without the
other.

The hot money routes (debit, reserve, commit; api/wallets/routes_wallet_ops.py) run the same protocol in two round
trips without the advisory lock: the WALLET row lock (taken first, ledger/staged.py) serializes twins of one
request — both name the same wallet — and the lookup runs as the next statement, after that lock is granted,
so it sees a twin's committed record (``QueuedLookup``). A key reused concurrently for another wallet cannot
be serialized that way; the unique (project, key) of the record then fails the second commit, which is
answered 409 ``api.idempotency_conflict`` like any reuse (``store_with_audit`` / ``conflict_from``). Only successful (2xx) results are stored: a refused request (402 insufficient credits, 409 hold not
active...) rolls back and leaves the key unused, so the client may retry it with the same key once the
situation has changed. Keys are scoped per project; the ledger key of the resulting posting is derived from
the project and the client key, so even a lost record could not post twice.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

import orjson
import psycopg
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from psycopg import errors as pg_errors
from sqlalchemy import Connection, text

from api.errors import ApiError, Conflict
from ledger.service import conflict_from, pipelined

T = TypeVar("T")

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


# ------------------------------------------------------------------------------ the two-round-trip variant

_LOOKUP = ("SELECT request_fingerprint, status_code, response_body FROM idempotency_records "
           "WHERE project_id = %s AND idempotency_key = %s")

# The audit row (api/tenancy/audit.py's columns) and the idempotency record in ONE statement, queued with the
# ledger's write and the COMMIT: both are durable in the same transaction as the money operation.
_STORE_WITH_AUDIT = """
WITH audit AS (
    INSERT INTO audit_log (project_id, actor_kind, actor_user_id, actor_key_id, action, target_kind, target_id,
                           before, after, request_id)
    VALUES (%(project)s, %(actor_kind)s, %(user_id)s, %(key_id)s, %(action)s, %(target_kind)s, %(target_id)s,
            %(before)s::jsonb, %(after)s::jsonb, %(request_id)s)
)
INSERT INTO idempotency_records (project_id, idempotency_key, request_fingerprint, status_code, response_body)
VALUES (%(project)s, %(key)s, %(fingerprint)s, %(status)s, %(body)s::jsonb)
"""


class QueuedLookup:
    """The record lookup, queued on a psycopg connection (in a pipeline: sent with the statements before it)."""

    def __init__(self, raw: psycopg.Connection[Any], *, project_id: str, key: str) -> None:
        self.key = key
        self._cursor = raw.cursor()
        self._cursor.execute(_LOOKUP, (project_id, key))

    def replay(self, request_fingerprint: str) -> JSONResponse | None:
        """The stored response to replay; 409 for a different request; None when the key is unused."""
        row = self._cursor.fetchone()
        if row is None:
            return None
        stored_fingerprint, status_code, response_body = row
        if stored_fingerprint != request_fingerprint:
            raise IdempotencyKeyReused(f"the {IDEMPOTENCY_HEADER} {self.key!r} was already used for a different "
                                       "request", extra={"idempotency_key": self.key})
        return JSONResponse(response_body, status_code=status_code, headers={REPLAYED_HEADER: "true"})


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value, default=str).decode()


def store_with_audit(raw: psycopg.Connection[Any], *, project_id: str, key: str, request_fingerprint: str,
                     status_code: int, body: bytes, audit_row: dict[str, Any]) -> None:
    """Queue the audit row and the idempotency record (``body`` = the exact response bytes)."""
    raw.cursor().execute(_STORE_WITH_AUDIT, {
        "project": project_id, "key": key, "fingerprint": request_fingerprint, "status": status_code,
        "body": body.decode(), "actor_kind": audit_row["actor_kind"], "user_id": audit_row.get("user_id"),
        "key_id": audit_row.get("key_id"), "action": audit_row["action"], "target_kind": audit_row["target_kind"],
        "target_id": audit_row["target_id"], "before": _json(audit_row.get("before")),
        "after": _json(audit_row.get("after")), "request_id": audit_row.get("request_id")})


def reused_key(exc: BaseException, key: str) -> IdempotencyKeyReused | None:
    """The 409 a failed commit means when a concurrent request stored the same key first."""
    if isinstance(exc, pg_errors.UniqueViolation) and exc.diag.constraint_name == "idempotency_records_pkey":
        return IdempotencyKeyReused(f"the {IDEMPOTENCY_HEADER} {key!r} was used concurrently by another request",
                                    extra={"idempotency_key": key})
    return None


class HotTransaction:
    """One money operation in two round trips on ``conn`` (which must not have run anything yet):

    1. ``stage(make)``: ``make()`` queues the ledger's wallet lock and reads; the record lookup is queued after
       them; one round trip. Returns the stored response for a replay (409 for another request), else the
       stage.
    2. ``write()``: a pipeline in which the caller queues the ledger's write and calls ``store``; leaving it
       queues COMMIT and waits for it, so a response exists only for committed work. A unique violation of a
       key (a concurrent request on another wallet took it) becomes 409.
    """

    def __init__(self, conn: Connection, *, project_id: str, key: str, request_fingerprint: str) -> None:
        self.conn = conn
        self.project_id = project_id
        self.key = key
        self.request_fingerprint = request_fingerprint
        self.response: Response | None = None

    def stage(self, make: Callable[[], T]) -> T | JSONResponse:
        with pipelined(self.conn) as raw:
            staged = make()
            lookup = QueuedLookup(raw, project_id=self.project_id, key=self.key)
        replay = lookup.replay(self.request_fingerprint)
        return replay if replay is not None else staged

    @contextmanager
    def write(self) -> Iterator[None]:
        try:
            with pipelined(self.conn) as raw:
                yield
                raw.cursor().execute("COMMIT")
        except psycopg.Error as exc:
            conflict = conflict_from(exc) or reused_key(exc, self.key)
            if conflict is not None:
                raise conflict from exc
            if isinstance(exc, psycopg.OperationalError):
                self.conn.invalidate()  # no pre-ping on this pool: never hand a broken connection out again
            raise
        self.conn.commit()  # committed above; this keeps SQLAlchemy's view in step (no round trip)

    def store(self, status_code: int, body: Any, audit_row: dict[str, Any]) -> None:
        """Queue the record and the audit row; the response is sent only after the commit."""
        content = orjson.dumps(body)
        store_with_audit(pipelined_connection(self.conn), project_id=self.project_id, key=self.key,
                         request_fingerprint=self.request_fingerprint, status_code=status_code, body=content,
                         audit_row=audit_row)
        self.response = Response(content, status_code=status_code, media_type="application/json",
                                 headers={REPLAYED_HEADER: "false"})


def pipelined_connection(conn: Connection) -> psycopg.Connection[Any]:
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    return driver


#: records deleted per purge statement: one short transaction each (the scheduler repeats it while rows remain,
#: at most 100 times a round; ledger/scheduler.py ``Scheduler._run_job``)
PURGE_BATCH_ROWS = 50_000


def purge_older_than(conn: Connection, *, cutoff: datetime, limit: int = PURGE_BATCH_ROWS) -> int:
    """Maintenance: delete up to ``limit`` records created before ``cutoff``, oldest first; returns how many.

    The scheduler's ``purge_idempotency_records`` job (meterline/scheduler.py) calls it with ``cutoff`` = the
    database's now() minus ``API_IDEMPOTENCY_RETENTION_S``. A record younger than that is never touched, so within
    the retention every key replays its stored response exactly as before. A retry after it still cannot move money
    twice — the ledger posting carries its own key (``ledger_key``): a debit answers ``outcome: duplicate``, and
    the group commit hands such a debit to the one-debit path (api/wallets/debit_batch.py) — but the answer is no longer
    the original one; hence a retention longer than any client's retry window."""
    return int(conn.execute(text("""
        DELETE FROM idempotency_records WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM idempotency_records WHERE created_at < :cutoff ORDER BY created_at LIMIT :limit))
    """), {"cutoff": cutoff, "limit": limit}).rowcount or 0)
