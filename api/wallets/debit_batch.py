"""Group commit for ``POST …/debit``: debits waiting at the same time share ONE database transaction.

Per API process, a ``DebitBatcher`` queues debits (amount-priced; a feature-priced debit takes the one-debit
path) and at most ``runners`` batches run at once, each taking up to ``batch_max`` queued debits, so a lone
debit waits for nothing and a loaded process commits many per transaction. A batch runs in three round trips
on its own connection, in two round trips: [BEGIN, lock every wallet of the batch in id order, buckets,
transaction ids, keys' earlier use, idempotency records] + [ONE ledger write, ONE audit + record insert, COMMIT].
That is fewer statements and one WAL flush for the whole batch.

The batch's connections are psycopg ``AsyncConnection``s driven on the app's event loop (at most ``runners``, kept
between batches): no thread hop and no GIL hand-off between the loop and a worker thread per round trip — with
the loop busy, a worker thread waited for the GIL after each round trip (measured: round trips of 3.4–5.4 ms where
PostgreSQL spent ~0.3 ms). Only a user's role is read on a pooled (sync) connection in a thread, before the batch;
API keys are complete without the database.

The money invariants are the one-debit path's (ledger/staged.py ``DebitBatch``, api/wallets/idempotency.py):
- floor and debt are checked under the wallet lock against the wallet as the batch's EARLIER debits left it;
- every idempotency record is looked up after the wallet locks (a twin that committed meanwhile is replayed)
  and stored with the posting and the audit row in the same transaction; only 2xx results are stored;
- a key used twice in one batch, or already used by a posting whose record is gone, is not batched: that debit
  runs alone, through the one-debit path, once the batch has committed (its twin is then visible);
- if anything fails the batch (a racing use of a key on another wallet fails the UNIQUE record or ledger key at
  commit), it rolls back as a whole and every debit of it runs alone through the one-debit path, which answers
  the racing key with 409 exactly as before. A refusal (402/404/409) of one debit is decided in Python and
  writes nothing, so it never fails its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from fastapi.responses import JSONResponse, Response
from psycopg.pq import TransactionStatus
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from api.errors import ApiError, NotFound
from api.tenancy.auth import DeferredAccess, ProjectAccess
from api.wallets.idempotency import REPLAYED_HEADER, IdempotencyKeyReused, ledger_key
from api.wallets.wallet_models import BalanceOut, TransactionOut
from ledger.db import libpq_url
from ledger.errors import LedgerError
from ledger.postings import WalletBalance
from ledger.staged import BatchedDebit, DebitBatch

log = logging.getLogger("meterline.api.debit_batch")

#: the outcome of a debit that must run alone (through the one-debit path)
ALONE = object()
#: the batch connections' name in pg_stat_activity (the pooled ones are "meterline-api")
BATCH_APPLICATION_NAME = "meterline-api-debits"

_RECORDS = ("SELECT project_id, idempotency_key, request_fingerprint, status_code, response_body "
            "FROM idempotency_records WHERE project_id = ANY(%s::text[]) AND idempotency_key = ANY(%s::text[])")

# api/wallets/idempotency.py _STORE_WITH_AUDIT for many rows: the audit rows and the records, with the postings
_STORE_MANY = """
WITH audit AS (
    INSERT INTO audit_log (project_id, actor_kind, actor_user_id, actor_key_id, action, target_kind, target_id,
                           before, after, request_id)
    SELECT a.project, a.actor_kind, a.user_id, a.key_id, a.action, a.target_kind, a.target_id, NULL, a.after,
           a.request_id
    FROM json_to_recordset(%(audit)s::json) AS a(project text, actor_kind text, user_id text, key_id text,
                                                  action text, target_kind text, target_id text, after jsonb,
                                                  request_id text)
)
INSERT INTO idempotency_records (project_id, idempotency_key, request_fingerprint, status_code, response_body)
SELECT r.project, r.key, r.fingerprint, 201, r.body
FROM json_to_recordset(%(records)s::json) AS r(project text, key text, fingerprint text, body jsonb)
"""


@dataclass
class PendingDebit:
    """A validated, authenticated debit waiting for its batch."""

    deferred: DeferredAccess
    wallet_id: str
    client_key: str
    request_fingerprint: str
    amount_minor: int
    source_ref: str | None
    metadata: dict[str, Any] | None
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def _actor(access: ProjectAccess) -> dict[str, Any]:
    p = access.principal
    return {"actor": p.user_id if p.kind == "user" else p.key_id, "actor_kind": p.kind, "request_id": access.request_id}


def _balance(state: WalletBalance) -> dict[str, Any]:
    return BalanceOut.of(state).model_dump(mode="json")


class DebitBatcher:
    """Per-app queue of debits; see the module doc. Runs on the app's event loop."""

    def __init__(self, engine: Engine, *, runners: int = 2, batch_max: int = 32) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.runners = runners
        self.batch_max = batch_max
        self._queue: deque[PendingDebit] = deque()
        self._running: set[asyncio.Task[None]] = set()
        self.idle: list[psycopg.AsyncConnection[Any]] = []  # at most ``runners``: one per running batch
        self.conninfo = libpq_url(engine.url.render_as_string(hide_password=False))
        #: batch size -> batches run (observability and tests)
        self.sizes: dict[int, int] = {}

    async def debit(self, item: PendingDebit) -> Any:
        """The debit's Response, or ``ALONE``; raises the debit's refusal (ApiError / LedgerError)."""
        self._queue.append(item)
        if len(self._running) < self.runners:
            task = asyncio.get_running_loop().create_task(self._drain())
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return await item.future

    async def aclose(self) -> None:
        """Close the kept connections (app shutdown)."""
        idle, self.idle = self.idle, []
        for conn in idle:
            await conn.close()

    def discard(self) -> None:
        """Drop the kept connections without the event loop they ran on (that loop may be gone)."""
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.pgconn.finish()

    async def _drain(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self.batch_max, len(self._queue)))]
            self.sizes[len(batch)] = self.sizes.get(len(batch), 0) + 1
            outcomes: list[Any] = [ALONE] * len(batch)
            try:
                outcomes = await self._run(batch)
            except Exception:  # the drain goes on: a dead drain would leave the queued debits unanswered
                log.exception("debit batch of %d failed unexpectedly; each debit runs alone", len(batch))
            finally:  # every waiter is answered; on an unexpected error each debit runs alone (its record decides)
                for item, outcome in zip(batch, outcomes, strict=True):
                    if not item.future.done():
                        item.future.set_result(outcome)

    async def _run(self, items: list[PendingDebit]) -> list[Any]:
        """One batch on one connection. Outcomes: Response, an exception to raise, or ALONE."""
        outcomes: list[Any] = [None] * len(items)
        accesses: dict[int, ProjectAccess] = {i: item.deferred.access for i, item in enumerate(items)
                                              if item.deferred.access is not None}
        if len(accesses) < len(items):  # users: their role, read before anything is locked
            await run_in_threadpool(self._resolve_roles, items, accesses, outcomes)
        try:
            conn = self.idle.pop() if self.idle else await psycopg.AsyncConnection.connect(
                self.conninfo, autocommit=True, application_name=BATCH_APPLICATION_NAME)
        except psycopg.Error as exc:  # unreachable or refusing connections: the one-debit path answers each debit
            log.warning("debit batch of %d could not connect (%s); each debit runs alone", len(items), exc)
            return [ALONE] * len(items)
        try:
            outcomes = await self._transaction(conn, items, accesses, outcomes)
        except psycopg.Error as exc:
            log.warning("debit batch of %d failed (%s); each debit runs alone", len(items), exc)
            await _release(conn, self.idle, broken=isinstance(exc, psycopg.OperationalError))
            return [ALONE] * len(items)
        except BaseException:  # cancelled or unexpected: the connection's state is unknown
            await _release(conn, self.idle, broken=True)
            raise
        await _release(conn, self.idle, broken=False)
        return outcomes

    def _resolve_roles(self, items: list[PendingDebit], accesses: dict[int, ProjectAccess],
                       outcomes: list[Any]) -> None:
        with self.engine.connect() as conn:
            for i, item in enumerate(items):
                if i not in accesses:
                    try:
                        accesses[i] = item.deferred.resolve(conn)
                    except ApiError as exc:  # the request's own answer (403/404)
                        outcomes[i] = exc

    async def _transaction(self, conn: psycopg.AsyncConnection[Any], items: list[PendingDebit],
                           accesses: dict[int, ProjectAccess], outcomes: list[Any]) -> list[Any]:
        seen: set[tuple[str, str]] = set()
        batched: list[int] = []
        for i, item in enumerate(items):
            if outcomes[i] is not None:
                continue
            scoped = (accesses[i].project_id, item.client_key)
            if scoped in seen:
                outcomes[i] = ALONE  # its twin goes first; it then sees the twin's record
            else:
                seen.add(scoped)
                batched.append(i)
        if not batched:
            return outcomes
        debits = {i: BatchedDebit(wallet_id=items[i].wallet_id,
                                  idempotency_key=ledger_key(accesses[i].project_id, items[i].client_key),
                                  amount_minor=items[i].amount_minor, source_ref=items[i].source_ref,
                                  metadata={**(items[i].metadata or {}), **_actor(accesses[i])},
                                  project_id=accesses[i].project_id)
                  for i in batched}
        batch = DebitBatch([debits[i] for i in batched])
        (lock_sql, lock_params), (context_sql, context_params) = batch.reads
        async with conn.pipeline():  # round trip 1
            await conn.execute("BEGIN")
            lock = await conn.execute(lock_sql, lock_params)
            context = await conn.execute(context_sql, context_params)
            records = await conn.execute(_RECORDS, (sorted({accesses[i].project_id for i in batched}),
                                                    [items[i].client_key for i in batched]))
        batch.load(await lock.fetchall(), await context.fetchone())
        stored = {(p, k): (fp, status, body) for p, k, fp, status, body in await records.fetchall()}
        audit: list[dict[str, Any]] = []
        store: list[dict[str, Any]] = []
        for i in batched:
            item, access, debit = items[i], accesses[i], debits[i]
            outcomes[i] = self._decide(item, access, debit, batch, stored, audit, store)
        write = batch.write()
        if write is None or not store:
            await conn.execute("ROLLBACK")
            return outcomes
        async with conn.pipeline():  # round trip 2
            await conn.execute(*write)
            await conn.execute(_STORE_MANY, {"audit": orjson.dumps(audit, default=str).decode(),
                                             "records": orjson.dumps(store).decode()})
            await conn.execute("COMMIT")
        return outcomes

    @staticmethod
    def _decide(item: PendingDebit, access: ProjectAccess, debit: BatchedDebit, batch: DebitBatch,
                stored: dict[tuple[str, str], tuple[str, int, Any]], audit: list[dict[str, Any]],
                store: list[dict[str, Any]]) -> Any:
        """What the one-debit path would answer, in its order: replay/409, 404, (record-less earlier use), post."""
        record = stored.get((access.project_id, item.client_key))
        if record is not None:
            fingerprint, status, body = record
            if fingerprint != item.request_fingerprint:
                return IdempotencyKeyReused(f"the Idempotency-Key {item.client_key!r} was already used for a "
                                            "different request", extra={"idempotency_key": item.client_key})
            return JSONResponse(body, status_code=status, headers={REPLAYED_HEADER: "true"})
        wallet = batch.wallet(item.wallet_id)
        if wallet is None or wallet.project_id != access.project_id:
            return NotFound("wallet not found", extra={"wallet_id": item.wallet_id})
        if batch.earlier_use(debit.idempotency_key):
            return ALONE  # a posting whose record was purged: the one-debit path replays it
        try:
            posted = batch.post(debit)
        except LedgerError as exc:  # a refusal (402) is this debit's answer and writes nothing
            return exc
        tx = posted.result.transaction
        body = {"outcome": "created", "transaction": TransactionOut.of(tx).model_dump(mode="json"),
                "balance": _balance(posted.balance)}
        content = orjson.dumps(body)
        p = access.principal
        audit.append({"project": access.project_id, "actor_kind": p.kind, "user_id": p.user_id, "key_id": p.key_id,
                      "action": "wallet.debit", "target_kind": "transaction", "target_id": str(tx.id),
                      "after": {"kind": tx.kind, "amount_minor": tx.amount_minor,
                                "balance_before_minor": tx.balance_before_minor,
                                "balance_after_minor": tx.balance_after_minor, "idempotency_key": tx.idempotency_key,
                                "wallet_id": item.wallet_id},
                      "request_id": access.request_id})
        store.append({"project": access.project_id, "key": item.client_key, "fingerprint": item.request_fingerprint,
                      "body": orjson.Fragment(content)})
        return Response(content, status_code=201, media_type="application/json", headers={REPLAYED_HEADER: "false"})


def batcher_of(app_state: Any, engine: Engine, factory: Callable[[Engine], DebitBatcher] = DebitBatcher
               ) -> DebitBatcher:
    """The app's batcher (created on first use, on the app's event loop; anew if the app now runs on another loop,
    as a test client does, so no waiter depends on a task of a loop that is gone)."""
    batcher: DebitBatcher | None = getattr(app_state, "debit_batcher", None)
    if batcher is None or batcher.engine is not engine or batcher.loop is not asyncio.get_running_loop():
        if batcher is not None:
            batcher.discard()
        batcher = app_state.debit_batcher = factory(engine)
    return batcher


async def close_batcher(app_state: Any) -> None:
    """App shutdown: close the batcher's connections."""
    batcher: DebitBatcher | None = getattr(app_state, "debit_batcher", None)
    if batcher is not None and batcher.loop is asyncio.get_running_loop():
        await batcher.aclose()
    elif batcher is not None:
        batcher.discard()


async def _release(conn: psycopg.AsyncConnection[Any], idle: list[psycopg.AsyncConnection[Any]], *,
                   broken: bool) -> None:
    """Keep ``conn`` for the next batch when it is healthy and outside a transaction; else close it."""
    if not broken and not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
        try:
            await conn.execute("ROLLBACK")  # a failed batch: nothing of it stays
        except psycopg.Error:
            broken = True
    if broken or conn.closed or conn.info.transaction_status != TransactionStatus.IDLE:
        with contextlib.suppress(psycopg.Error):
            await conn.close()
        return
    idle.append(conn)
