"""Erasing an end user's account (app-store account-deletion compliance): close now, erase after a grace period.

1. **Request** (admin, ``POST …/wallets/{id}/erasure``): in one transaction the subject wallet is closed
   (``ledger.service.close_wallet``: debits, reservations, grants, refunds and owed fees are refused with
   ``ledger.wallet_closed``; active holds are voided), its subject keys are taken out of ``subject_keys`` (kept in
   the request row, so a cancel can restore them) and the request is stored with ``erase_after`` = now +
   ``API_ERASURE_GRACE_S`` (30 days). From then on usage naming those subjects follows the project's
   unknown-subject policy (streams/catalog.py): ``dead_letter`` → dead-lettered with the reason; ``auto_provision``
   → the subject's deterministic wallet id (``auto_wallet_id``), which for a wallet created through the API IS this
   wallet, so that usage is still posted here (possibly as debt: usage that happened is never dropped). Usage
   accepted before the closure is charged exactly once whatever happens (checkpoints ignore the closure).
2. **Cancel** (admin, within the grace): keys restored, wallet reopened. After ``erase_after`` it is refused, even if
   the job has not run yet, so what an operator sees never depends on the job's timing.
3. **Erase** (the scheduler's ``erase_accounts`` job, bounded batches, rows locked SKIP LOCKED): the positive
   balance is forfeited through ``ledger.service.forfeit_balance`` (a negative ``adjustment`` with a reason, ledger
   key ``erasure:{project}:{wallet}`` — exactly once, a re-run answers ``duplicate``); the wallet's owner reference
   becomes an irreversible random tombstone (``erased_<random>``: not derived from the subject, so it cannot be
   reversed by guessing); every subject key still naming the wallet is deleted; the held keys in the request row
   are cleared; the sign-up bonus row's IP network is cleared; ``ingested_events`` (the debugging log) rows of
   those subjects are deleted. One audit entry per step (``wallet.erasure_request``, ``wallet.erasure_cancel``,
   ``wallet.erase`` by the system) — none of them carries the subject.

Kept, and why: the wallet row (id, project, kind, currency, balances — transactions reference it), every
transaction, allocation, bucket and hold (append-only financial records: DESIGN §2.3, bookkeeping retention), the
sign-up bonus decision's keyed device hash and country (fraud prevention: an erase-and-re-register loop would
otherwise collect the bonus again; the hash is per-project and keyed, the raw id was never stored). NOT covered,
owned elsewhere: the append-only ``audit_log`` and ``access_decisions`` rows that quote the subject, ClickHouse's
``usage_events`` (analytics retention), and ``metadata``/``source_ref`` the operator put on transactions
(documented: never put personal data there). A wallet id derived from the subject (``auto_wallet_id``) is a
one-way hash of project and subject and stays.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, text

from api.errors import ApiError, Conflict, NotFound
from api.tenancy.audit import audit, record_audit
from api.tenancy.auth import ProjectAccess
from api.wallets.erasure_map import ErasureContext, run_postgres_steps
from api.wallets.pseudonyms import pseudonyms
from ledger import service
from ledger.rows import WalletRow
from streams import catalog
from streams.errors import CatalogConflict

#: rows an ``erase_accounts`` round handles per transaction (the scheduler loops within its budget)
BATCH = 25
FORFEIT_REASON = "account erased: remaining balance forfeited"


@dataclass(frozen=True, slots=True)
class ErasureRow:
    id: int
    project_id: str
    wallet_id: str
    status: str
    reason: str | None
    requested_at: datetime
    erase_after: datetime
    cancelled_at: datetime | None
    erased_at: datetime | None
    forfeited_minor: int | None
    forfeit_transaction_id: int | None
    subjects_held: int

    @classmethod
    def of(cls, row: Any) -> ErasureRow:
        return cls(id=row["id"], project_id=row["project_id"], wallet_id=row["wallet_id"], status=row["status"],
                   reason=row["reason"], requested_at=row["requested_at"], erase_after=row["erase_after"],
                   cancelled_at=row["cancelled_at"], erased_at=row["erased_at"],
                   forfeited_minor=row["forfeited_minor"], forfeit_transaction_id=row["forfeit_transaction_id"],
                   subjects_held=len(row["subject_keys_held"] or []))

    def audit_view(self) -> dict[str, Any]:
        """What audit entries carry: never a subject."""
        return {"erasure_id": self.id, "wallet_id": self.wallet_id, "status": self.status,
                "erase_after": self.erase_after, "subject_keys_held": self.subjects_held,
                "forfeited_minor": self.forfeited_minor, "forfeit_transaction_id": self.forfeit_transaction_id}


def _live(conn: Connection, wallet_id: str, *, lock: bool = False) -> Any:
    return conn.execute(text(f"""
        SELECT * FROM wallet_erasures WHERE wallet_id = :w AND status IN ('pending', 'erased')
        {'FOR UPDATE' if lock else ''}"""), {"w": wallet_id}).mappings().one_or_none()


def latest(conn: Connection, *, project_id: str, wallet_id: str) -> ErasureRow | None:
    row = conn.execute(text("""
        SELECT * FROM wallet_erasures WHERE project_id = :p AND wallet_id = :w ORDER BY id DESC LIMIT 1
    """), {"p": project_id, "w": wallet_id}).mappings().one_or_none()
    return None if row is None else ErasureRow.of(row)


def _subject_keys(conn: Connection, project_id: str, wallet_id: str) -> list[str]:
    subjects: list[str] = []
    after: str | None = None
    while True:
        page = catalog.list_subject_keys(conn, project_id=project_id, wallet_id=wallet_id, after=after, limit=1000)
        subjects += [k.subject for k in page]
        if len(page) < 1000:
            return subjects
        after = page[-1].subject


def _lock_request(conn: Connection, wallet_id: str) -> None:
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": f"erasure:{wallet_id}"})


def request_erasure(conn: Connection, access: ProjectAccess, wallet: WalletRow, *, reason: str | None,
                    grace_s: int) -> tuple[ErasureRow, bool]:
    """Close the wallet and schedule its erasure; (row, created). A live request is answered as it is."""
    if wallet.owner_kind != "subject":
        raise ApiError("only an end user's (subject) wallet can be erased; member and project wallets belong to "
                       "your team", status=422, extra={"wallet_id": wallet.id, "owner_kind": wallet.owner_kind})
    _lock_request(conn, wallet.id)
    existing = _live(conn, wallet.id)
    if existing is not None:
        return ErasureRow.of(existing), False
    service.close_wallet(conn, wallet_id=wallet.id)
    subjects = _subject_keys(conn, access.project_id, wallet.id)
    for subject in subjects:
        catalog.delete_subject_key(conn, project_id=access.project_id, subject=subject)
    row = conn.execute(text("""
        INSERT INTO wallet_erasures (project_id, wallet_id, status, reason, subject_keys_held, erase_after)
        VALUES (:p, :w, 'pending', :reason, CAST(:held AS jsonb), now() + make_interval(secs => :grace))
        RETURNING *"""), {"p": access.project_id, "w": wallet.id, "reason": reason,
                          "held": orjson.dumps(subjects).decode(), "grace": grace_s}).mappings().one()
    erasure = ErasureRow.of(row)
    audit(conn, access, action="wallet.erasure_request", target_kind="wallet", target_id=wallet.id,
          after={**erasure.audit_view(), "reason": reason})
    return erasure, True


def cancel_erasure(conn: Connection, access: ProjectAccess, wallet: WalletRow) -> ErasureRow:
    """Within the grace: restore the subject keys and reopen the wallet."""
    _lock_request(conn, wallet.id)
    row = _live(conn, wallet.id, lock=True)
    if row is None:
        raise NotFound("no erasure is pending for this wallet", extra={"wallet_id": wallet.id})
    if row["status"] == "erased":
        raise Conflict("the account was erased already; an erasure cannot be undone",
                       extra={"wallet_id": wallet.id, "erased_at": row["erased_at"].isoformat()})
    now = conn.execute(text("SELECT now()")).scalar_one()
    if row["erase_after"] <= now:
        raise Conflict("the grace period is over; the erasure can no longer be cancelled",
                       extra={"wallet_id": wallet.id, "erase_after": row["erase_after"].isoformat()})
    for subject in row["subject_keys_held"] or []:
        try:
            catalog.set_subject_key(conn, project_id=access.project_id, subject=subject, wallet_id=wallet.id)
        except CatalogConflict as exc:
            raise Conflict("a subject of this wallet was mapped to another wallet meanwhile; delete that subject "
                           "key (PUT/DELETE …/subject-keys) and cancel again", extra={"wallet_id": wallet.id}) from exc
    service.reopen_wallet(conn, wallet_id=wallet.id)
    updated = conn.execute(text("""
        UPDATE wallet_erasures SET status = 'cancelled', cancelled_at = now() WHERE id = :id RETURNING *
    """), {"id": row["id"]}).mappings().one()
    erasure = ErasureRow.of(updated)
    audit(conn, access, action="wallet.erasure_cancel", target_kind="wallet", target_id=wallet.id,
          before={"status": "pending"}, after=erasure.audit_view())
    return erasure


def erase_due(conn: Connection, *, now: datetime, key: bytes, limit: int = BATCH) -> int:
    """The ``erase_accounts`` job: erase up to ``limit`` requests whose grace is over; returns how many.
    ``key`` is the deployment's pseudonym key (``API_ERASURE_PSEUDONYM_KEY``)."""
    rows = conn.execute(text("""
        SELECT * FROM wallet_erasures WHERE status = 'pending' AND erase_after <= :now
        ORDER BY erase_after, id LIMIT :limit FOR UPDATE SKIP LOCKED
    """), {"now": now, "limit": limit}).mappings().all()
    for row in rows:
        _erase(conn, row, key)
    return len(rows)


def _erase(conn: Connection, row: Any, key: bytes) -> None:
    # the row lock (erase_due) is enough: a cancel locks the same row, and a new request needs no live row.
    # (No advisory lock here: a cancel takes the advisory lock, then the row — the reverse order could deadlock.)
    project_id, wallet_id = row["project_id"], row["wallet_id"]
    wallet = service.close_wallet(conn, wallet_id=wallet_id)  # closed already; also voids any hold left
    forfeited = service.forfeit_balance(conn, wallet_id=wallet_id, idempotency_key=f"erasure:{project_id}:{wallet_id}",
                                        reason=FORFEIT_REASON, metadata={"erasure_id": row["id"]})
    mapped = _subject_keys(conn, project_id, wallet_id)  # keys added since the request (e.g. a re-created wallet)
    # an auto-provisioned wallet's owner is its own id (not personal; erasure's audit entries name it)
    owner = {wallet.owner_ref} if wallet.owner_ref != wallet_id else set()
    subjects = sorted({*(row["subject_keys_held"] or []), *mapped, *owner})
    ctx = ErasureContext(conn=conn, project_id=project_id, wallet_id=wallet_id, subjects=subjects,
                         pseudonyms=pseudonyms(key, project_id, subjects),
                         tombstone=f"erased_{secrets.token_hex(16)}", key=key)
    counts = run_postgres_steps(ctx)  # every PostgreSQL entry of the data map (api/wallets/erasure_map.py)
    pending = [[s, p] for s, p in sorted(ctx.pseudonyms.items())] or None
    amount = -forfeited.transaction.amount_minor if forfeited is not None else 0
    updated = conn.execute(text("""
        UPDATE wallet_erasures SET status = 'erased', erased_at = now(), subject_keys_held = NULL,
               tombstone = :t, forfeited_minor = :amount, forfeit_transaction_id = :tx,
               analytics_pending = CAST(:pending AS jsonb), analytics_erased_at = NULL
        WHERE id = :id RETURNING *"""), {
        "t": ctx.tombstone, "amount": amount, "tx": forfeited.transaction.id if forfeited else None,
        "pending": orjson.dumps(pending).decode() if pending else None, "id": row["id"]}).mappings().one()
    record_audit(conn, project_id=project_id, principal=None, action="wallet.erase", target_kind="wallet",
                 target_id=wallet_id, before={"status": "pending"},
                 after={**ErasureRow.of(updated).audit_view(), "rows": counts})
