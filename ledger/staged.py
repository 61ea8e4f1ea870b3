"""Synchronous debits, reservations and commits in two network round trips (the API's hot path).

Each operation has two stages on the caller's connection (``psycopg`` underneath SQLAlchemy):

1. ``send`` queues: lock the wallet row (``FOR NO KEY UPDATE``, ledger/books.py), then — as SEPARATE statements, so their snapshot is
   taken after the lock is granted and sees everything the previous lock holder committed — the wallet's
   live buckets, the idempotency key's earlier use, a pre-allocated transaction id and the transaction time.
   Inside a psycopg pipeline (``pipelined``) these statements, and any the caller queues after them (the
   API's idempotency-record lookup), travel in ONE round trip; ``fetch`` reads their results.
2. ``post`` decides in Python (replay, conflict, floor, burn plan — ``WalletBook``) and queues ONE write
   statement (transaction, allocations, burned buckets, outbox row, hold, wallet). Inside a pipeline it
   travels with the caller's own writes and COMMIT; outside one it runs at once.

Everything the response needs (transaction id, created_at, balances) is known before the write, so nothing
is read back. Invariants are the ledger's usual ones (ledger/README.md): the wallet lock is taken before any
bucket or hold of the wallet is read; an idempotency key is checked under the lock (a twin that committed
while we waited is seen) and is UNIQUE in the table (a racing use on ANOTHER wallet fails the write, which
``conflict_from`` turns into IdempotencyConflict); ``balance - held - amount >= floor`` and no debt, checked
under the lock; one outbox row per transaction, in the same transaction.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import orjson
import psycopg
from psycopg import errors as pg_errors
from sqlalchemy import Connection

from ledger.contracts import TOPIC_LEDGER_TRANSACTIONS, TransactionKind
from ledger.errors import (
    HoldNotActive,
    IdempotencyConflict,
    InsufficientCredits,
    UnknownHold,
    UnknownWallet,
    WalletBlocked,
    WalletClosed,
)
from ledger.postings import Bucket, Posting, WalletBalance, WalletBook
from ledger.queries import get_transaction
from ledger.rows import WALLET_COLUMNS, HoldRow, PostingResult, TransactionRow, WalletRow
from ledger.writer import Draft, transaction_event_json, transaction_row

__all__ = ["BatchedDebit", "CommitStage", "DebitBatch", "DebitStage", "Posted", "ReserveStage", "conflict_from", "pipelined", "raw_connection",
           "request_fingerprint"]

_HOLD_COLUMNS = ("id, wallet_id, project_id, amount_minor, status, expires_at, idempotency_key, "
                 "committed_transaction_id, created_at, updated_at")

_LOCK_WALLET = f"SELECT {WALLET_COLUMNS} FROM wallets WHERE id = %s FOR NO KEY UPDATE"
_LOCK_PROJECT_WALLET = f"SELECT {WALLET_COLUMNS} FROM wallets WHERE id = %s AND project_id = %s FOR NO KEY UPDATE"
_BUCKETS = ("SELECT id, priority, expires_at, created_at, remaining_minor, source FROM credit_buckets "
            "WHERE wallet_id = %s AND live")
# transaction time (now() is fixed for the transaction), a transaction id allocated under the wallet lock (so a
# wallet's rows still chain in id order), and the key's earlier use if any
_POSTING_CONTEXT = ("SELECT now(), nextval('transactions_id_seq'), t.id, t.request_fingerprint "
                    "FROM (SELECT 1) AS one LEFT JOIN transactions t ON t.idempotency_key = %s")
_HOLD_FOR_UPDATE = f"SELECT {_HOLD_COLUMNS}, expires_at <= now() FROM holds WHERE id = %s FOR NO KEY UPDATE"
_RESERVE_CONTEXT = (f"SELECT now(), {', '.join('h.' + c.strip() for c in _HOLD_COLUMNS.split(','))} "
                    "FROM (SELECT 1) AS one LEFT JOIN holds h ON h.idempotency_key = %s")

# One statement per posting. Sub-statements touch different tables; foreign keys (allocations and the hold
# -> the transaction) are checked at the end of the statement, when the transaction row exists.
_WRITE_POSTING = """
WITH tx AS (
    INSERT INTO transactions (id, project_id, wallet_id, kind, amount_minor, balance_before_minor,
        balance_after_minor, idempotency_key, request_fingerprint, source_ref, hold_id, metadata, created_at)
    VALUES (%(id)s, %(project)s, %(wallet)s, %(kind)s, %(amount)s, %(before)s, %(after)s, %(key)s,
            %(fingerprint)s, %(ref)s, %(hold)s, %(metadata)s::jsonb, %(now)s)
), allocations AS (
    INSERT INTO transaction_allocations (transaction_id, bucket_id, amount_minor)
    SELECT %(id)s, a.bucket, a.amount FROM json_to_recordset(%(allocations)s::json) AS a(bucket bigint, amount bigint)
), burned AS (
    -- by primary key: joining a set-returning function (estimated at 100+ rows) planned a hash join over a
    -- sequential scan of ALL buckets, O(buckets in the database) per debit
    UPDATE credit_buckets c
    SET remaining_minor = (%(burned_remaining)s::bigint[])[array_position(%(burned_ids)s::bigint[], c.id)]
    WHERE c.id = ANY(%(burned_ids)s::bigint[]) AND c.wallet_id = %(wallet)s
), outbox AS (
    INSERT INTO outbox (topic, key, payload, created_at)
    VALUES (%(topic)s, %(wallet)s, convert_to(%(payload)s, 'UTF8'), %(now)s)
), hold AS (
    UPDATE holds SET status = 'committed', committed_transaction_id = %(id)s, updated_at = %(now)s
    WHERE id = %(hold)s
)
UPDATE wallets SET balance_minor = %(after)s, held_minor = held_minor - %(released)s, updated_at = %(now)s
WHERE id = %(wallet)s
"""

_WRITE_HOLD = """
WITH hold AS (
    INSERT INTO holds (id, wallet_id, project_id, amount_minor, expires_at, idempotency_key, created_at, updated_at)
    VALUES (%(id)s, %(wallet)s, %(project)s, %(amount)s, %(expires)s, %(key)s, %(now)s, %(now)s)
)
UPDATE wallets SET held_minor = held_minor + %(amount)s, updated_at = %(now)s WHERE id = %(wallet)s
"""

_UNIQUE_KEYS = {"transactions_idempotency_key_key", "holds_idempotency_key_key"}


# ------------------------------------------------------------------------------------------ connections


def raw_connection(conn: Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under ``conn``, inside ``conn``'s transaction (begun here if needed, so the
    caller's ``commit()`` commits what is written through it)."""
    if not conn.in_transaction():
        conn.begin()
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    return driver


@contextmanager
def pipelined(conn: Connection) -> Iterator[psycopg.Connection[Any]]:
    """Queue statements and send them together (psycopg pipeline mode); leaving the block syncs, so every
    queued statement has run (or raised) when it returns."""
    raw = raw_connection(conn)
    with raw.pipeline():
        yield raw


def conflict_from(exc: BaseException) -> IdempotencyConflict | None:
    """The IdempotencyConflict a failed write means, when a racing request took the key on another wallet."""
    if isinstance(exc, pg_errors.UniqueViolation) and exc.diag.constraint_name in _UNIQUE_KEYS:
        return IdempotencyConflict("idempotency key already used by a concurrent request",
                                   constraint=exc.diag.constraint_name)
    return None


def request_fingerprint(*parts: object) -> str:
    """What an idempotency key was first used for (stored with the transaction)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def _run(cursor: psycopg.Cursor[Any], sql: str, params: Any) -> None:
    try:
        cursor.execute(sql, params)
    except pg_errors.UniqueViolation as exc:  # outside a pipeline the write raises right here
        conflict = conflict_from(exc)
        if conflict is not None:
            raise conflict from exc
        raise


def _require_access(wallet: WalletRow, amount_minor: int) -> None:
    """Synchronous access rules, checked under the wallet lock."""
    if wallet.closed_at is not None:
        raise WalletClosed(f"wallet {wallet.id} is closed (account erasure requested); cancel the erasure to "
                           "reopen it", wallet_id=wallet.id, closed_at=wallet.closed_at.isoformat())
    state = wallet.state
    if state.blocked:
        raise WalletBlocked(f"wallet {wallet.id} owes {state.debt_minor}; settle the debt first",
                            wallet_id=wallet.id, debt_minor=state.debt_minor)
    if not state.can_debit(amount_minor):
        raise InsufficientCredits(f"wallet {wallet.id} has {state.available_minor} available, {amount_minor} needed",
                                  wallet_id=wallet.id, available_minor=state.available_minor,
                                  requested_minor=amount_minor)


def _wallet(row: Any) -> WalletRow | None:
    return WalletRow(*row) if row is not None else None


def _hold(values: Any) -> HoldRow:
    return HoldRow(*values)


# ------------------------------------------------------------------------------------------ stages


@dataclass
class Posted:
    """A created posting and the wallet's figures right after it (for the response; nothing is read back)."""

    result: PostingResult
    balance: WalletBalance
    wallet: WalletRow


class _PostingStage:
    """Lock the wallet, read its buckets and the key's earlier use; later post one transaction."""

    def __init__(self, conn: Connection, *, wallet_id: str, idempotency_key: str, project_id: str | None) -> None:
        self.conn = conn
        self.wallet_id = wallet_id
        self.key = idempotency_key
        raw = raw_connection(conn)
        self._lock = raw.cursor()
        if project_id is None:
            self._lock.execute(_LOCK_WALLET, (wallet_id,))
        else:
            self._lock.execute(_LOCK_PROJECT_WALLET, (wallet_id, project_id))
        self._extra_reads(raw)
        self._buckets = raw.cursor()
        self._buckets.execute(_BUCKETS, (wallet_id,))
        self._context = raw.cursor()
        self._context.execute(_POSTING_CONTEXT, (idempotency_key,))
        self.wallet: WalletRow | None = None
        self._duplicate: PostingResult | None = None

    def _extra_reads(self, raw: psycopg.Connection[Any]) -> None:
        """Subclasses queue reads that must follow the wallet lock (e.g. the hold)."""

    def fetch(self) -> WalletRow | None:
        """Results of the queued reads; the wallet is None when it does not exist (in that project)."""
        self.wallet = _wallet(self._lock.fetchone())
        self._fetch_extra()
        self.buckets = [Bucket(*row) for row in self._buckets.fetchall()]
        context = self._context.fetchone()
        assert context is not None
        self.now: datetime = context[0]
        self.tx_id: int = context[1]
        self.replay: tuple[int, str | None] | None = (context[2], context[3]) if context[2] is not None else None
        return self.wallet

    def _fetch_extra(self) -> None:
        pass

    def _replayed(self, fingerprint: str) -> PostingResult | None:
        """The original posting for a replay (read once, through SQLAlchemy: call it OUTSIDE a pipeline)."""
        if self.replay is None:
            return None
        if self._duplicate is not None:
            return self._duplicate
        tx_id, stored = self.replay
        if stored != fingerprint:
            raise IdempotencyConflict(f"idempotency key {self.key!r} was used for a different request",
                                      idempotency_key=self.key, transaction_id=tx_id)
        original = get_transaction(self.conn, tx_id)
        assert original is not None
        self._duplicate = PostingResult("duplicate", original)
        return self._duplicate

    def _locked_wallet(self) -> WalletRow:
        if self.wallet is None:
            raise UnknownWallet(f"wallet {self.wallet_id!r} does not exist", wallet_id=self.wallet_id)
        return self.wallet

    def _write(self, wallet: WalletRow, book: WalletBook, posting: Posting, *, kind: TransactionKind,
               fingerprint: str, source_ref: str | None, metadata: dict[str, Any] | None,
               hold: HoldRow | None) -> Posted:
        draft = Draft(wallet_id=wallet.id, project_id=wallet.project_id, kind=kind, posting=posting,
                      idempotency_key=self.key, request_fingerprint=fingerprint, source_ref=source_ref,
                      hold_id=hold.id if hold else None, metadata=metadata)
        sources = {b.id: b.source for b in self.buckets}
        row = transaction_row(draft, self.tx_id, self.now, {}, {(wallet.id, i): s for i, s in sources.items()})
        released = hold.amount_minor if hold else 0
        params = {
            "id": self.tx_id, "project": wallet.project_id, "wallet": wallet.id, "kind": kind.value,
            "amount": posting.amount_minor, "before": posting.balance_before_minor,
            "after": posting.balance_after_minor, "key": self.key, "fingerprint": fingerprint, "ref": source_ref,
            "hold": hold.id if hold else None,
            "metadata": orjson.dumps(metadata).decode() if metadata is not None else None, "now": self.now,
            "allocations": orjson.dumps([{"bucket": a.bucket_id, "amount": a.amount_minor}
                                         for a in posting.allocations]).decode(),
            "burned_ids": list(book.changed), "burned_remaining": list(book.changed.values()),
            "topic": TOPIC_LEDGER_TRANSACTIONS, "payload": transaction_event_json(row, draft),
            "released": released,
        }
        _run(raw_connection(self.conn).cursor(), _WRITE_POSTING, params)
        balance = WalletBalance(posting.balance_after_minor, wallet.held_minor - released, wallet.floor_minor,
                                wallet.unsettled_minor)
        return Posted(PostingResult("created", row), balance, wallet)


class DebitStage(_PostingStage):
    """``debit`` in two stages: charge now or refuse; never below the floor, refused while in debt."""

    def duplicate(self, *, amount_minor: int) -> PostingResult | None:
        """The original posting when this key was used before for the same debit (else None); raises
        IdempotencyConflict for another request. Call it before ``post`` when ``post`` runs in a pipeline."""
        return self._replayed(request_fingerprint("debit", self.wallet_id, amount_minor))

    def post(self, *, amount_minor: int, source_ref: str | None = None,
             metadata: dict[str, Any] | None = None) -> Posted | PostingResult:
        """A ``PostingResult('duplicate', ...)`` for a replay, else the created posting (write queued)."""
        fingerprint = request_fingerprint("debit", self.wallet_id, amount_minor)
        replay = self._replayed(fingerprint)
        if replay is not None:
            return replay
        wallet = self._locked_wallet()
        _require_access(wallet, amount_minor)
        book = WalletBook(balance_minor=wallet.balance_minor, buckets=self.buckets, now=self.now,
                          project_id=wallet.project_id)
        posting = book.debit(amount_minor)
        return self._write(wallet, book, posting, kind=TransactionKind.DEBIT, fingerprint=fingerprint,
                           source_ref=source_ref, metadata=metadata, hold=None)


class CommitStage(_PostingStage):
    """``commit_hold`` in two stages; the hold is locked after its wallet (the ledger's lock order)."""

    def __init__(self, conn: Connection, *, wallet_id: str, hold_id: str, idempotency_key: str,
                 project_id: str | None) -> None:
        self.hold_id = hold_id
        super().__init__(conn, wallet_id=wallet_id, idempotency_key=idempotency_key, project_id=project_id)

    def _extra_reads(self, raw: psycopg.Connection[Any]) -> None:
        self._hold_cursor = raw.cursor()
        self._hold_cursor.execute(_HOLD_FOR_UPDATE, (self.hold_id,))

    def _fetch_extra(self) -> None:
        row = self._hold_cursor.fetchone()
        self.hold: HoldRow | None = _hold(row[:-1]) if row is not None else None
        self.hold_expired = bool(row[-1]) if row is not None else False

    def _known_hold(self) -> HoldRow:
        if self.hold is None or self.hold.wallet_id != self.wallet_id:
            raise UnknownHold(f"hold {self.hold_id!r} does not exist", hold_id=self.hold_id)
        return self.hold

    def duplicate(self, *, amount_minor: int) -> PostingResult | None:
        """As ``DebitStage.duplicate`` (an unknown hold raises UnknownHold first)."""
        self._known_hold()
        return self._replayed(request_fingerprint("commit", self.hold_id, amount_minor))

    def post(self, *, amount_minor: int, metadata: dict[str, Any] | None = None) -> Posted | PostingResult:
        """Up to the held amount always; above it only what is available with every other hold in place."""
        fingerprint = request_fingerprint("commit", self.hold_id, amount_minor)
        hold = self._known_hold()
        replay = self._replayed(fingerprint)
        if replay is not None:
            return replay
        wallet = self._locked_wallet()
        if hold.status != "active" or self.hold_expired:
            status = "expired" if hold.status == "active" else hold.status
            raise HoldNotActive(f"hold {self.hold_id} is {status}", hold_id=self.hold_id, status=status)
        covered = min(amount_minor, hold.amount_minor)
        # what stays available once the held part is posted and this hold (only) is released
        after = WalletBalance(wallet.balance_minor - covered, wallet.held_minor - hold.amount_minor, wallet.floor_minor,
                              wallet.unsettled_minor)
        extra = min(amount_minor - covered, after.available_minor)
        book = WalletBook(balance_minor=wallet.balance_minor, buckets=self.buckets, now=self.now,
                          project_id=wallet.project_id)
        posting = book.debit(covered + extra)
        return self._write(wallet, book, posting, kind=TransactionKind.RESERVATION_COMMIT, fingerprint=fingerprint,
                           source_ref=None, metadata={**(metadata or {}), "requested_minor": amount_minor}, hold=hold)


class ReserveStage:
    """``reserve`` in two stages: lock the wallet, look the key up; then hold (no transaction is posted)."""

    def __init__(self, conn: Connection, *, wallet_id: str, idempotency_key: str, project_id: str | None) -> None:
        self.conn = conn
        self.wallet_id = wallet_id
        self.key = idempotency_key
        raw = raw_connection(conn)
        self._lock = raw.cursor()
        if project_id is None:
            self._lock.execute(_LOCK_WALLET, (wallet_id,))
        else:
            self._lock.execute(_LOCK_PROJECT_WALLET, (wallet_id, project_id))
        self._context = raw.cursor()
        self._context.execute(_RESERVE_CONTEXT, (idempotency_key,))
        self.wallet: WalletRow | None = None

    def fetch(self) -> WalletRow | None:
        self.wallet = _wallet(self._lock.fetchone())
        context = self._context.fetchone()
        assert context is not None
        self.now: datetime = context[0]
        self.replay = _hold(context[1:]) if context[1] is not None else None
        return self.wallet

    def post(self, *, amount_minor: int, timeout_s: float) -> tuple[HoldRow, WalletBalance | None]:
        """(the hold, the wallet's figures after it); figures are None for a replay (nothing changed now)."""
        if self.replay is not None:
            if self.replay.wallet_id != self.wallet_id or self.replay.amount_minor != amount_minor:
                raise IdempotencyConflict(f"idempotency key {self.key!r} was used for a different reservation",
                                          idempotency_key=self.key, hold_id=self.replay.id)
            return self.replay, None
        if self.wallet is None:
            raise UnknownWallet(f"wallet {self.wallet_id!r} does not exist", wallet_id=self.wallet_id)
        wallet = self.wallet
        _require_access(wallet, amount_minor)
        hold = HoldRow(id=f"hold_{uuid.uuid4().hex}", wallet_id=wallet.id, project_id=wallet.project_id,
                       amount_minor=amount_minor, status="active", expires_at=self.now + timedelta(seconds=timeout_s),
                       idempotency_key=self.key, committed_transaction_id=None, created_at=self.now,
                       updated_at=self.now)
        _run(raw_connection(self.conn).cursor(), _WRITE_HOLD,
             {"id": hold.id, "wallet": wallet.id, "project": wallet.project_id, "amount": amount_minor,
              "expires": hold.expires_at, "key": self.key, "now": self.now})
        return hold, WalletBalance(wallet.balance_minor, wallet.held_minor + amount_minor, wallet.floor_minor,
                                   wallet.unsettled_minor)


# ------------------------------------------------------------------------------------------ group commit

_LOCK_WALLETS = f"SELECT {WALLET_COLUMNS} FROM wallets WHERE id = ANY(%s::text[]) ORDER BY id FOR NO KEY UPDATE"
# The same, but only the rows whose (project, id) a debit names: a wallet of ANOTHER project is never locked (the
# filter runs before the row lock is taken), so a tenant naming a foreign wallet id cannot stall its owner.
# ``id = ANY`` keeps the primary-key lookup; the pair filter (unit separator, which no id contains) narrows it.
_LOCK_PROJECT_WALLETS = (f"SELECT {WALLET_COLUMNS} FROM wallets WHERE id = ANY(%s::text[]) "
                         "AND project_id || chr(31) || id = ANY(%s::text[]) ORDER BY id FOR NO KEY UPDATE")
# After the lock, ONE statement: the transaction time, one transaction id per debit (allocated under the locks,
# in order), the keys used before, and the wallets' live buckets column by column.
_BATCH_CONTEXT = """
SELECT now(),
       ARRAY(SELECT nextval('transactions_id_seq') FROM generate_series(1, %(n)s)),
       ARRAY(SELECT idempotency_key FROM transactions WHERE idempotency_key = ANY(%(keys)s::text[])),
       b.wallets, b.ids, b.priorities, b.expires, b.created, b.remaining, b.sources
FROM (SELECT array_agg(wallet_id) AS wallets, array_agg(id) AS ids, array_agg(priority) AS priorities,
             array_agg(expires_at) AS expires, array_agg(created_at) AS created,
             array_agg(remaining_minor) AS remaining, array_agg(source) AS sources
      FROM credit_buckets WHERE wallet_id = ANY(%(wallets)s::text[]) AND live) AS b
"""

# Every posting of a batch in ONE statement. Arrays are addressed by primary key (= ANY), never joined to a
# set-returning function (that plans a sequential scan of the whole table).
_WRITE_BATCH = """
WITH tx AS (
    INSERT INTO transactions (id, project_id, wallet_id, kind, amount_minor, balance_before_minor,
        balance_after_minor, idempotency_key, request_fingerprint, source_ref, metadata, created_at)
    SELECT t.id, t.project, t.wallet, %(kind)s, t.amount, t.before, t.after, t.key, t.fingerprint, t.ref, t.metadata,
           %(now)s
    FROM json_to_recordset(%(tx)s::json) AS t(id bigint, project text, wallet text, amount bigint, before bigint,
                                               after bigint, key text, fingerprint text, ref text, metadata jsonb)
), allocations AS (
    INSERT INTO transaction_allocations (transaction_id, bucket_id, amount_minor)
    SELECT a.tx, a.bucket, a.amount FROM json_to_recordset(%(allocations)s::json) AS a(tx bigint, bucket bigint,
                                                                                       amount bigint)
), burned AS (
    UPDATE credit_buckets c
    SET remaining_minor = (%(burned_remaining)s::bigint[])[array_position(%(burned_ids)s::bigint[], c.id)]
    WHERE c.id = ANY(%(burned_ids)s::bigint[])
), outbox AS (
    INSERT INTO outbox (topic, key, payload, created_at)
    SELECT %(topic)s, o.wallet, convert_to(o.payload, 'UTF8'), %(now)s
    FROM json_to_recordset(%(outbox)s::json) AS o(wallet text, payload text)  -- a function scan keeps array order
)
UPDATE wallets w SET balance_minor = (%(balances)s::bigint[])[array_position(%(wallets)s::text[], w.id)],
                     updated_at = %(now)s
WHERE w.id = ANY(%(wallets)s::text[])
"""


@dataclass(frozen=True)
class BatchedDebit:
    """One debit of a ``DebitBatch`` (``idempotency_key`` is the ledger's key)."""

    wallet_id: str
    idempotency_key: str
    amount_minor: int
    source_ref: str | None = None
    metadata: dict[str, Any] | None = None
    project_id: str | None = None  # set: only this project's wallet of that id is locked (and found)


class DebitBatch:
    """Several debits in ONE database transaction (group commit), in the same two stages as ``DebitStage``; the
    statements and their rows go in and out as values, so any connection can carry them (the API's is async).

    1. ``reads`` are the statements to send after BEGIN, in one round trip: lock every wallet of the batch
       (``FOR NO KEY UPDATE``, ascending id: the ledger's lock order), then — a separate statement, so it sees what
       earlier lock holders committed — their live buckets, one pre-allocated transaction id per debit, and the
       keys' earlier use. ``load`` takes their rows.
    2. ``post`` decides ONE debit in Python against the wallet's state after the batch's earlier debits (floor,
       debt, burn plan), or raises exactly what ``DebitStage.post`` raises (nothing is written for it);
       ``write`` is ONE statement for every posting, sent with the caller's own writes and COMMIT.

    The caller runs debits in arrival order and never puts the same key twice in a batch, nor a key that was
    used before (``earlier_use``): those go through ``DebitStage``. A racing use of a key on a wallet outside
    the batch fails the write (UNIQUE), which fails the whole batch: the caller then runs each debit alone.
    Transaction ids are allocated under the locks and handed out in posting order, so a wallet's rows still
    chain in id order."""

    def __init__(self, debits: list[BatchedDebit]) -> None:
        wallet_ids = sorted({d.wallet_id for d in debits})
        if all(d.project_id is not None for d in debits):
            pairs = sorted({f"{d.project_id}\x1f{d.wallet_id}" for d in debits})
            lock: tuple[str, Any] = (_LOCK_PROJECT_WALLETS, (wallet_ids, pairs))
        else:
            lock = (_LOCK_WALLETS, (wallet_ids,))
        self.reads: tuple[tuple[str, Any], tuple[str, Any]] = (
            lock, (_BATCH_CONTEXT, {"n": len(debits), "keys": [d.idempotency_key for d in debits],
                                    "wallets": wallet_ids}))
        self._posted: list[tuple[BatchedDebit, Posting, TransactionRow, Draft]] = []

    def load(self, wallet_rows: list[Any], context: Any) -> None:
        """The rows of ``reads``: every locked wallet, and the context's one row."""
        self.wallets: dict[str, WalletRow] = {}
        for row in wallet_rows:
            wallet = WalletRow(*row)
            self.wallets[wallet.id] = wallet
        assert context is not None
        self.now: datetime = context[0]
        self._ids: list[int] = sorted(context[1])
        self._earlier_use = set(context[2])
        buckets: dict[str, list[Bucket]] = {}
        wallet_of, *columns = context[3:]
        for wallet_id, *bucket in zip(wallet_of or [], *(c or [] for c in columns), strict=True):
            buckets.setdefault(wallet_id, []).append(Bucket(*bucket))
        self._sources = {b.id: b.source for bs in buckets.values() for b in bs}
        self._books = {w.id: WalletBook(balance_minor=w.balance_minor, buckets=buckets.get(w.id, []), now=self.now,
                                        project_id=w.project_id) for w in self.wallets.values()}

    def wallet(self, wallet_id: str) -> WalletRow | None:
        """The wallet as the batch's postings so far left it (None: it does not exist)."""
        return self.wallets.get(wallet_id)

    def earlier_use(self, idempotency_key: str) -> bool:
        return idempotency_key in self._earlier_use

    def post(self, debit: BatchedDebit) -> Posted:
        """Charge now or refuse (raises UnknownWallet, WalletBlocked, InsufficientCredits); the write is queued
        by ``write``."""
        assert debit.idempotency_key not in self._earlier_use
        wallet = self.wallets.get(debit.wallet_id)
        if wallet is None:
            raise UnknownWallet(f"wallet {debit.wallet_id!r} does not exist", wallet_id=debit.wallet_id)
        _require_access(wallet, debit.amount_minor)
        book = self._books[wallet.id]
        posting = book.debit(debit.amount_minor)
        fingerprint = request_fingerprint("debit", debit.wallet_id, debit.amount_minor)
        draft = Draft(wallet_id=wallet.id, project_id=wallet.project_id, kind=TransactionKind.DEBIT, posting=posting,
                      idempotency_key=debit.idempotency_key, request_fingerprint=fingerprint,
                      source_ref=debit.source_ref, hold_id=None, metadata=debit.metadata)
        row = transaction_row(draft, self._ids[len(self._posted)], self.now, {},
                              {(wallet.id, i): s for i, s in self._sources.items()})
        self._posted.append((debit, posting, row, draft))
        self.wallets[wallet.id] = replace(wallet, balance_minor=posting.balance_after_minor, updated_at=self.now)
        return Posted(PostingResult("created", row), self.wallets[wallet.id].state, self.wallets[wallet.id])

    def write(self) -> tuple[str, dict[str, Any]] | None:
        """ONE statement for every posting, with its parameters (None when nothing was posted)."""
        if not self._posted:
            return None
        changed: dict[int, int] = {}
        for book in self._books.values():
            changed.update(book.changed)
        touched = sorted({row.wallet_id for _, _, row, _ in self._posted})
        params = {
            "kind": TransactionKind.DEBIT.value, "now": self.now, "topic": TOPIC_LEDGER_TRANSACTIONS,
            "tx": orjson.dumps([{"id": row.id, "project": row.project_id, "wallet": row.wallet_id,
                                 "amount": row.amount_minor, "before": row.balance_before_minor,
                                 "after": row.balance_after_minor, "key": row.idempotency_key,
                                 "fingerprint": draft.request_fingerprint, "ref": row.source_ref,
                                 "metadata": row.metadata} for _, _, row, draft in self._posted]).decode(),
            "allocations": orjson.dumps([{"tx": row.id, "bucket": a.bucket_id, "amount": a.amount_minor}
                                         for _, posting, row, _ in self._posted
                                         for a in posting.allocations]).decode(),
            "burned_ids": list(changed), "burned_remaining": list(changed.values()),
            "outbox": orjson.dumps([{"wallet": row.wallet_id, "payload": transaction_event_json(row, draft)}
                                    for _, _, row, draft in self._posted]).decode(),
            "wallets": touched, "balances": [self.wallets[w].balance_minor for w in touched],
        }
        return _WRITE_BATCH, params
