"""The ledger's write surface (the schema note's service functions). Every function takes a SQLAlchemy
Connection inside a transaction the CALLER commits, so a caller can combine a posting with its own writes.

Guarantees:
- Idempotency: every posting has a UNIQUE idempotency key. Replaying a request returns outcome
  ``duplicate`` with the original row and writes nothing; reusing a key for a different request (other
  wallet, amount, hold, original transaction) raises ``IdempotencyConflict``.
- No overspend: synchronous debits and reservations lock the wallet row, then check
  ``balance - held - amount >= floor`` and that the wallet has no debt, under the lock.
- Credits (grants, refunds, positive adjustments) repay debt first; what is left fills a bucket.
- Every posting writes its TransactionPosted outbox row in the same transaction.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, text

from ledger.books import load_books, lock_wallet
from ledger.checkpoints import apply_checkpoint
from ledger.contracts import TransactionKind
from ledger.errors import (
    HoldNotActive,
    IdempotencyConflict,
    InvalidRequest,
    NotRefundable,
    RefundExceedsCharge,
    UnknownHold,
    UnknownTransaction,
    WalletClosed,
    WalletConflict,
)
from ledger.expiry import expire_credits, expire_holds
from ledger.postings import DEFAULT_PRIORITY, NewBucket, Posting, WalletBook
from ledger.queries import get_transaction
from ledger.rows import HoldRow, PostingResult, WalletRow
from ledger.staged import (
    CommitStage,
    DebitStage,
    Posted,
    ReserveStage,
    conflict_from,
    pipelined,
    request_fingerprint,
)
from ledger.writer import Draft, write

__all__ = [
    "CREDIT_KINDS",
    "CommitStage",
    "DebitStage",
    "Posted",
    "ReserveStage",
    "adjust",
    "apply_checkpoint",
    "close_wallet",
    "commit_hold",
    "conflict_from",
    "debit",
    "ensure_wallet",
    "expire_credits",
    "expire_holds",
    "forfeit_balance",
    "grant_credits",
    "pipelined",
    "refund",
    "reopen_wallet",
    "reserve",
    "set_floor",
    "set_owner_ref",
    "void_hold",
]

#: Kinds grant_credits accepts, and the bucket source each fills by default.
CREDIT_KINDS: dict[TransactionKind, str] = {
    TransactionKind.TOP_UP: "top_up",
    TransactionKind.BONUS: "bonus",
    TransactionKind.PROMO: "promo",
    TransactionKind.SUBSCRIPTION_GRANT: "subscription",
    TransactionKind.ADJUSTMENT: "adjustment",
}
REFUNDABLE_KINDS = frozenset({"usage", "debit", "reservation_commit"})


# --- wallets ----------------------------------------------------------------------------------------------

def ensure_wallet(conn: Connection, *, project_id: str, owner_kind: str, owner_ref: str, wallet_id: str | None = None,
                  credit_scale: int = 0, credit_code: str = "credits") -> WalletRow:
    """The wallet of (project, owner), created if missing. Idempotent; concurrent callers get the same row."""
    if owner_kind not in ("user", "project", "subject"):
        raise InvalidRequest(f"owner_kind must be user, project or subject, not {owner_kind!r}")
    new_id = wallet_id or f"w_{uuid.uuid4().hex}"
    conn.execute(text("""
        INSERT INTO wallets (id, project_id, owner_kind, owner_ref, credit_scale, credit_code)
        VALUES (:id, :project_id, :owner_kind, :owner_ref, :credit_scale, :credit_code)
        ON CONFLICT DO NOTHING
    """), {"id": new_id, "project_id": project_id, "owner_kind": owner_kind, "owner_ref": owner_ref,
           "credit_scale": credit_scale, "credit_code": credit_code})
    if wallet_id is not None and owner_kind == "subject":
        # The ledger auto-provisions an unknown subject's wallet from a checkpoint, knowing only its id
        # (owner_ref = id). Naming that subject later adopts the row: same id, so usage already charged stays put.
        conn.execute(text("""
            UPDATE wallets SET owner_ref = :owner_ref, updated_at = now()
            WHERE id = :id AND project_id = :project_id AND owner_kind = 'subject' AND owner_ref = id
        """), {"id": wallet_id, "project_id": project_id, "owner_ref": owner_ref})
    row = conn.execute(text("""
        SELECT * FROM wallets WHERE project_id = :project_id AND owner_kind = :owner_kind AND owner_ref = :owner_ref
    """), {"project_id": project_id, "owner_kind": owner_kind, "owner_ref": owner_ref}).mappings().one_or_none()
    if row is None or (wallet_id is not None and row["id"] != wallet_id):
        raise WalletConflict(f"wallet id {new_id!r} already belongs to another owner", wallet_id=new_id)
    return WalletRow.from_mapping(row)


def set_floor(conn: Connection, *, wallet_id: str, floor_minor: int) -> WalletRow:
    """Change the floor synchronous debits respect (negative = an overdraft allowance)."""
    lock_wallet(conn, wallet_id)
    row = conn.execute(text("UPDATE wallets SET floor_minor = :f, updated_at = now() WHERE id = :id RETURNING *"),
                       {"f": floor_minor, "id": wallet_id}).mappings().one()
    return WalletRow.from_mapping(row)


# --- credits ----------------------------------------------------------------------------------------------

def grant_credits(conn: Connection, *, wallet_id: str, amount_minor: int, idempotency_key: str,
                  kind: TransactionKind | str = TransactionKind.TOP_UP, source: str | None = None,
                  priority: int | None = None, expires_at: datetime | None = None, source_ref: str | None = None,
                  reason: str | None = None, metadata: dict[str, Any] | None = None) -> PostingResult:
    """Add credits as a bucket (settling debt first). ``source`` defaults from ``kind``, ``priority`` from
    ``source`` (postings.DEFAULT_PRIORITY)."""
    kind = TransactionKind(kind)
    if kind not in CREDIT_KINDS:
        raise InvalidRequest(f"grant_credits posts {', '.join(CREDIT_KINDS)}, not {kind.value!r}")
    _require_positive(amount_minor)
    _require_aware(expires_at)
    bucket_source = source or CREDIT_KINDS[kind]
    if bucket_source not in DEFAULT_PRIORITY:
        raise InvalidRequest(f"unknown bucket source {bucket_source!r}")
    if kind is TransactionKind.ADJUSTMENT and not reason:
        raise InvalidRequest("an adjustment needs a reason")
    spec = NewBucket(bucket_source, DEFAULT_PRIORITY[bucket_source] if priority is None else priority,
                     expires_at, source_ref)
    fingerprint = _fingerprint("grant", wallet_id, kind.value, amount_minor, bucket_source, spec.priority,
                               expires_at.isoformat() if expires_at else None)
    def plan(book: WalletBook, wallet: WalletRow) -> Posting:
        _require_open(wallet)
        return book.credit(amount_minor, spec)

    return _post(conn, wallet_id=wallet_id, key=idempotency_key, fingerprint=fingerprint, plan=plan,
                 describe=dict(kind=kind, source_ref=source_ref, reason=reason, metadata=metadata))


def adjust(conn: Connection, *, wallet_id: str, amount_minor: int, reason: str, idempotency_key: str,
           metadata: dict[str, Any] | None = None, burn_first_of: int | None = None) -> PostingResult:
    """An operator's correction. Positive: an 'adjustment' bucket (debt first). Negative: burns buckets
    like usage and MAY create debt (e.g. claw back a charged-back top-up) — the operator's decision.

    ``burn_first_of`` (negative only): a credit transaction of this wallet, e.g. a refunded payment's grant.
    What is left of the bucket it filled burns first, then the other buckets in burn order, then debt; the
    allocations show which. It is part of the request (a replay naming another grant is a conflict)."""
    if not reason or not reason.strip():
        raise InvalidRequest("an adjustment needs a reason")
    if amount_minor == 0:
        raise InvalidRequest("an adjustment of 0 changes nothing")
    if burn_first_of is not None and amount_minor > 0:
        raise InvalidRequest("burn_first_of names buckets to burn: only for a negative adjustment")
    spec = NewBucket("adjustment", DEFAULT_PRIORITY["adjustment"])
    # a grant's allocations are immutable, so its buckets can be read before the wallet lock
    first = () if burn_first_of is None else _buckets_of_grant(conn, wallet_id, burn_first_of)

    def plan(book: WalletBook, wallet: WalletRow) -> Posting:
        return book.credit(amount_minor, spec) if amount_minor > 0 else book.debit(-amount_minor, first=first)

    named = () if burn_first_of is None else (("burn_first_of", burn_first_of),)  # keys used before stay valid
    return _post(conn, wallet_id=wallet_id, key=idempotency_key,
                 fingerprint=_fingerprint("adjust", wallet_id, amount_minor, *named), plan=plan,
                 describe=dict(kind=TransactionKind.ADJUSTMENT, reason=reason, metadata=metadata))


def _buckets_of_grant(conn: Connection, wallet_id: str, transaction_id: int) -> tuple[int, ...]:
    """The buckets credit transaction ``transaction_id`` of ``wallet_id`` filled (none when it only repaid
    debt)."""
    grant = get_transaction(conn, transaction_id)
    if grant is None or grant.wallet_id != wallet_id:
        raise UnknownTransaction(f"transaction {transaction_id} is not one of wallet {wallet_id}",
                                 transaction_id=transaction_id)
    return tuple(a.bucket_id for a in grant.allocations if a.bucket_id is not None and a.amount_minor > 0)


def charge_owed(conn: Connection, *, wallet_id: str, amount_minor: int, idempotency_key: str,
                source_ref: str | None = None, reason: str | None = None,
                metadata: dict[str, Any] | None = None) -> PostingResult:
    """Post an amount that is owed whatever the balance (a scheduled fee): burns buckets in burn order and
    whatever they cannot cover becomes debt, which blocks the wallet for new access until settled — the same
    rule as usage that already happened (DESIGN §2.4). Kind ``debit``. Idempotent per key."""
    _require_positive(amount_minor)

    def plan(book: WalletBook, wallet: WalletRow) -> Posting:
        _require_open(wallet)
        return book.debit(amount_minor)

    return _post(conn, wallet_id=wallet_id, key=idempotency_key,
                 fingerprint=_fingerprint("charge_owed", wallet_id, amount_minor), plan=plan,
                 describe=dict(kind=TransactionKind.DEBIT, source_ref=source_ref, reason=reason, metadata=metadata))


# --- closing a wallet (account erasure) --------------------------------------------------------------------

def close_wallet(conn: Connection, *, wallet_id: str) -> WalletRow:
    """Close the wallet: from now on debits, reservations, grants, refunds and owed fees are refused
    (``WalletClosed``); active holds are voided (released), so nothing reserved can be committed. Usage that already
    happened is still posted by checkpoints, and adjustments still post. Idempotent (keeps the first closed_at)."""
    lock_wallet(conn, wallet_id)
    for (hold_id,) in conn.execute(text("SELECT id FROM holds WHERE wallet_id = :w AND status = 'active' ORDER BY id"),
                                   {"w": wallet_id}).all():
        void_hold(conn, hold_id=hold_id)
    row = conn.execute(text("""
        UPDATE wallets SET closed_at = coalesce(closed_at, now()), updated_at = now() WHERE id = :id RETURNING *
    """), {"id": wallet_id}).mappings().one()
    return WalletRow.from_mapping(row)


def reopen_wallet(conn: Connection, *, wallet_id: str) -> WalletRow:
    """Undo ``close_wallet`` (voided holds stay voided)."""
    lock_wallet(conn, wallet_id)
    row = conn.execute(text("UPDATE wallets SET closed_at = NULL, updated_at = now() WHERE id = :id RETURNING *"),
                       {"id": wallet_id}).mappings().one()
    return WalletRow.from_mapping(row)


def set_owner_ref(conn: Connection, *, wallet_id: str, owner_ref: str) -> WalletRow:
    """Replace the wallet's owner reference (account erasure puts an irreversible tombstone there). Only a
    closed subject wallet: an open wallet's owner is how usage and the API find it."""
    wallet = lock_wallet(conn, wallet_id)
    if wallet.closed_at is None or wallet.owner_kind != "subject":
        raise InvalidRequest(f"wallet {wallet_id}: only a closed subject wallet's owner can be replaced")
    row = conn.execute(text("UPDATE wallets SET owner_ref = :r, updated_at = now() WHERE id = :id RETURNING *"),
                       {"r": owner_ref, "id": wallet_id}).mappings().one()
    return WalletRow.from_mapping(row)


def retire_wallet(conn: Connection, *, wallet_id: str) -> WalletRow:
    """Mark a closed subject wallet as erased (``wallets.erased_at``, once): its id is never auto-provisioned
    again, so a subject that comes back gets the next generation's wallet (streams.catalog_model)."""
    wallet = lock_wallet(conn, wallet_id)
    if wallet.closed_at is None or wallet.owner_kind != "subject":
        raise InvalidRequest(f"wallet {wallet_id}: only a closed subject wallet can be retired")
    row = conn.execute(text("""
        UPDATE wallets SET erased_at = coalesce(erased_at, now()), updated_at = now() WHERE id = :id RETURNING *
    """), {"id": wallet_id}).mappings().one()
    return WalletRow.from_mapping(row)


def pseudonymise_metadata(conn: Connection, *, wallet_id: str, replacements: dict[str, str]) -> int:
    """Replace personal JSON string values in a closed wallet's transaction metadata by their pseudonyms, through
    the one narrow path the append-only guard allows (``ledger_erasure_pseudonymise_metadata``, ledger_0013):
    chain-v2 rows only, nothing but ``metadata`` changes, the salt is dropped so the chained commitment reveals
    nothing. Returns how many rows changed; ``ledger verify`` still holds."""
    wallet = lock_wallet(conn, wallet_id)
    if wallet.closed_at is None:
        raise InvalidRequest(f"wallet {wallet_id} is open; only a closed wallet's metadata can be pseudonymised")
    values = sorted(replacements)
    return int(conn.execute(text("SELECT ledger_erasure_pseudonymise_metadata(:w, :f, :t)"), {
        "w": wallet_id, "f": values, "t": [replacements[v] for v in values]}).scalar_one())


def forfeit_balance(conn: Connection, *, wallet_id: str, idempotency_key: str, reason: str,
                    metadata: dict[str, Any] | None = None) -> PostingResult | None:
    """Post what is left on a CLOSED wallet as a negative ``adjustment`` with ``reason`` (burning every bucket in
    burn order), exactly once per key: a second call answers ``duplicate`` with the original posting. The amount
    is the positive balance read under the wallet lock (held is 0: closing voided the holds); None when there is
    nothing to forfeit (zero or debt — debt is never forgiven here)."""
    if not reason or not reason.strip():
        raise InvalidRequest("a forfeiture needs a reason")
    fingerprint = _fingerprint("forfeit", wallet_id)
    replay = _replay(conn, idempotency_key, fingerprint)
    if replay is not None:
        return replay
    wallet = lock_wallet(conn, wallet_id)
    if wallet.closed_at is None:
        raise InvalidRequest(f"wallet {wallet_id} is open; close it before forfeiting its balance")
    amount = wallet.state.settled_balance_minor - wallet.held_minor  # unsettled usage is already spent
    if amount <= 0:
        return _replay(conn, idempotency_key, fingerprint)
    return _post(conn, wallet_id=wallet_id, key=idempotency_key, fingerprint=fingerprint,
                 plan=lambda book, locked: book.debit(amount),
                 describe=dict(kind=TransactionKind.ADJUSTMENT, reason=reason, metadata=metadata))


def _require_open(wallet: WalletRow) -> None:
    if wallet.closed_at is not None:
        raise WalletClosed(f"wallet {wallet.id} is closed (account erasure requested); cancel the erasure to "
                           "reopen it", wallet_id=wallet.id, closed_at=wallet.closed_at.isoformat())


# --- synchronous debits -----------------------------------------------------------------------------------

def debit(conn: Connection, *, wallet_id: str, amount_minor: int, idempotency_key: str,
          source_ref: str | None = None, metadata: dict[str, Any] | None = None) -> PostingResult:
    """Charge now or refuse: never takes balance - held below the floor, refused while in debt.

    Two round trips (ledger/staged.py): lock + reads in one pipeline, then one write statement."""
    _require_positive(amount_minor)
    with pipelined(conn):
        stage = DebitStage(conn, wallet_id=wallet_id, idempotency_key=idempotency_key, project_id=None)
    stage.fetch()
    posted = stage.post(amount_minor=amount_minor, source_ref=source_ref, metadata=metadata)
    return posted if isinstance(posted, PostingResult) else posted.result


def reserve(conn: Connection, *, wallet_id: str, amount_minor: int, timeout_s: float,
            idempotency_key: str) -> HoldRow:
    """Hold credits for up to ``timeout_s``. A replay returns the original hold (any status)."""
    _require_positive(amount_minor)
    _require_timeout(timeout_s)
    with pipelined(conn):
        stage = ReserveStage(conn, wallet_id=wallet_id, idempotency_key=idempotency_key, project_id=None)
    stage.fetch()
    hold, _ = stage.post(amount_minor=amount_minor, timeout_s=timeout_s)
    return hold


def commit_hold(conn: Connection, *, hold_id: str, amount_minor: int, idempotency_key: str,
                metadata: dict[str, Any] | None = None) -> PostingResult:
    """Post the actual cost of a reserved operation and release the hold.

    Up to the held amount the charge is always posted (the hold promised it, even if usage posted since
    then has drained the wallet — that shortfall becomes debt). Above the held amount only what is
    available is charged: posted = held-part + min(rest, available after posting the held part with this
    hold released and every other hold still in place). The requested amount is kept in metadata."""
    _require_commit_amount(amount_minor)
    wallet_id = _hold_wallet(conn, hold_id)
    with pipelined(conn):
        stage = CommitStage(conn, wallet_id=wallet_id, hold_id=hold_id, idempotency_key=idempotency_key,
                            project_id=None)
    stage.fetch()
    posted = stage.post(amount_minor=amount_minor, metadata=metadata)
    return posted if isinstance(posted, PostingResult) else posted.result


def void_hold(conn: Connection, *, hold_id: str) -> HoldRow:
    """Release an active hold. Voiding a voided or expired hold returns it unchanged; a committed one
    raises HoldNotActive."""
    lock_wallet(conn, _hold_wallet(conn, hold_id))
    hold = _lock_hold(conn, hold_id)
    if hold.status == "committed":
        raise HoldNotActive(f"hold {hold_id} is committed", hold_id=hold_id, status=hold.status)
    if hold.status != "active":
        return hold
    row = conn.execute(text("UPDATE holds SET status = 'voided', updated_at = now() WHERE id = :id RETURNING *"),
                       {"id": hold_id}).mappings().one()
    _release(conn, hold.wallet_id, hold.amount_minor)
    return HoldRow.from_mapping(row)


# --- refunds ----------------------------------------------------------------------------------------------

def refund(conn: Connection, *, transaction_id: int, idempotency_key: str, amount_minor: int | None = None,
           reason: str | None = None, metadata: dict[str, Any] | None = None) -> PostingResult:
    """Give back (part of) a charge as a 'refund' bucket, linked to the charge. ``amount_minor=None``
    refunds whatever is left. All refunds of a charge together never exceed it (checked under the lock)."""
    if amount_minor is not None:
        _require_positive(amount_minor)
    original = get_transaction(conn, transaction_id)
    if original is None:
        raise UnknownTransaction(f"transaction {transaction_id} does not exist", transaction_id=transaction_id)
    if original.kind not in REFUNDABLE_KINDS or original.amount_minor >= 0:
        raise NotRefundable(f"transaction {transaction_id} is a {original.kind} of {original.amount_minor}; only "
                            "charges can be refunded", transaction_id=transaction_id)
    spec = NewBucket("refund", DEFAULT_PRIORITY["refund"], source_ref=f"refund:{transaction_id}")

    def plan(book: WalletBook, wallet: WalletRow) -> Posting:
        _require_open(wallet)
        refunded = conn.execute(text("""
            SELECT coalesce(sum(amount_minor), 0) FROM transactions
            WHERE related_transaction_id = :id AND kind = 'refund'
        """), {"id": transaction_id}).scalar_one()
        left = -original.amount_minor - int(refunded)
        amount = left if amount_minor is None else amount_minor
        if amount > left or amount <= 0:
            raise RefundExceedsCharge(
                f"refund of {amount} exceeds what is left of the charge ({left} of {-original.amount_minor})",
                transaction_id=transaction_id, refundable_minor=left)
        return book.credit(amount, spec)

    return _post(conn, wallet_id=original.wallet_id, key=idempotency_key,
                 fingerprint=_fingerprint("refund", transaction_id, amount_minor), plan=plan,
                 describe=dict(kind=TransactionKind.REFUND, related_transaction_id=transaction_id,
                               source_ref=original.source_ref, reason=reason, metadata=metadata))


# --- the posting skeleton ---------------------------------------------------------------------------------

def _post(conn: Connection, *, wallet_id: str, key: str, fingerprint: str, plan: Any,
          describe: dict[str, Any]) -> PostingResult:
    """Replay check → lock wallet → replay check again (a twin may have committed while we waited) →
    plan → write. The second check is what makes concurrent retries of one request safe."""
    replay = _replay(conn, key, fingerprint)
    if replay is not None:
        return replay
    wallet = lock_wallet(conn, wallet_id)
    replay = _replay(conn, key, fingerprint)
    if replay is not None:
        return replay
    book = load_books(conn, [wallet], now=datetime.now(UTC))[wallet_id]
    posting: Posting = plan(book, wallet)
    draft = Draft(wallet_id=wallet_id, project_id=wallet.project_id, posting=posting, idempotency_key=key,
                  request_fingerprint=fingerprint, **describe)
    (row,) = write(conn, {wallet_id: book}, [draft])
    return PostingResult("created", row)


def _replay(conn: Connection, key: str, fingerprint: str) -> PostingResult | None:
    found = conn.execute(text("SELECT id, request_fingerprint FROM transactions WHERE idempotency_key = :k"),
                         {"k": key}).one_or_none()
    if found is None:
        return None
    if found.request_fingerprint != fingerprint:
        raise IdempotencyConflict(f"idempotency key {key!r} was used for a different request",
                                  idempotency_key=key, transaction_id=found.id)
    original = get_transaction(conn, found.id)
    assert original is not None
    return PostingResult("duplicate", original)


_fingerprint = request_fingerprint


def _require_positive(amount_minor: int) -> None:
    if not isinstance(amount_minor, int) or isinstance(amount_minor, bool) or amount_minor <= 0:
        raise InvalidRequest(f"amount_minor must be a positive integer, got {amount_minor!r}")


def _require_timeout(timeout_s: float) -> None:
    if timeout_s <= 0:
        raise InvalidRequest("timeout_s must be > 0")


def _require_commit_amount(amount_minor: int) -> None:
    if amount_minor < 0:
        raise InvalidRequest("amount_minor must be >= 0")


def _require_aware(moment: datetime | None) -> None:
    if moment is not None and moment.utcoffset() is None:
        raise InvalidRequest("datetimes must be timezone-aware (UTC)")


# --- holds ------------------------------------------------------------------------------------------------

def _hold_wallet(conn: Connection, hold_id: str) -> str:
    wallet_id = conn.execute(text("SELECT wallet_id FROM holds WHERE id = :id"), {"id": hold_id}).scalar_one_or_none()
    if wallet_id is None:
        raise UnknownHold(f"hold {hold_id!r} does not exist", hold_id=hold_id)
    return str(wallet_id)


def _lock_hold(conn: Connection, hold_id: str) -> HoldRow:
    row = conn.execute(text("SELECT * FROM holds WHERE id = :id FOR UPDATE"), {"id": hold_id}).mappings().one()
    return HoldRow.from_mapping(row)


def _release(conn: Connection, wallet_id: str, amount_minor: int) -> None:
    conn.execute(text("UPDATE wallets SET held_minor = held_minor - :a, updated_at = now() WHERE id = :id"),
                 {"a": amount_minor, "id": wallet_id})

