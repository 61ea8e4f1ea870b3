"""The verifiable ledger: each wallet's transactions form a hash chain (ledger_0010), checked here.

``chain_hash(n) = sha256(chain_hash(n−1) || payload(n))`` per wallet in id order (empty bytes before the first),
written by the database in the posting's own statement (trigger ``transactions_chain``). ``payload`` is the JSON
array documented in the migration; ``payload_of`` rebuilds it in Python from the columns, so ``verify`` does not
trust the database's own function: a row altered after it was written (even by a superuser with triggers off)
no longer hashes to its stored link, and an altered link breaks the next row's.

``verify`` also recomputes the balance invariants of every wallet it reads: each row's
``balance_before`` = the previous row's ``balance_after`` (0 for the first), ``balance_after = before + amount``,
the last ``balance_after`` = the wallet's balance, and the credit left in buckets = max(balance, 0).

``chain_heads`` are what an auditor pins: per UTC day, each wallet's last link of the day, and a day digest
over them (sha256 of ``wallet_id:transaction_id:hex\\n`` lines sorted by wallet) — if a published digest
ever stops matching, history was rewritten."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, text

__all__ = ["Break", "ChainHead", "DayHeads", "VerifyReport", "chain_heads", "link", "payload_of", "verify"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(moment: datetime | None) -> int | None:
    return None if moment is None else (moment - _EPOCH) // timedelta(microseconds=1)


def _json(value: Any) -> str:
    # PostgreSQL's json output escapes exactly what json.dumps(ensure_ascii=False) escapes (", \\, control
    # characters as \b \f \n \r \t or \\u00xx) and leaves every other character as it is.
    return json.dumps(value, ensure_ascii=False)


def metadata_commitment(salt: bytes, metadata_text: str | None) -> bytes:
    """Chain v2 (ledger_0013): what the chain covers instead of the metadata, a salted hiding commitment."""
    return hashlib.sha256(salt + (metadata_text if metadata_text is not None else "null").encode()).digest()


def payload_of(row: Any) -> bytes:
    """The chained text of a transaction row (``metadata_text`` = ``metadata::text`` as PostgreSQL renders it).
    Chain v1 rows (posted before ledger_0013, ``metadata_commitment`` NULL) chain the metadata itself; chain v2
    rows chain ``commitment:<hex>`` in its place, so erasure can pseudonymise the metadata (and drop the salt)
    without breaking a link — ledger/README.md "Erasure and the chain"."""
    head = _json([row.id, row.project_id, row.wallet_id, row.kind, row.amount_minor, row.balance_before_minor,
                  row.balance_after_minor, row.idempotency_key, row.request_fingerprint, row.source_ref,
                  row.related_transaction_id, row.hold_id, row.meter_id, _micros(row.period_start),
                  row.price_version_id, row.reason])
    commitment = getattr(row, "metadata_commitment", None)
    if commitment is not None:
        metadata = _json(f"commitment:{bytes(commitment).hex()}")
    else:
        metadata = row.metadata_text if row.metadata_text is not None else "null"
    return f"{head[:-1]}, {metadata}, {_json(_micros(row.created_at))}]".encode()


def link(previous: bytes | None, payload: bytes) -> bytes:
    return hashlib.sha256((previous or b"") + payload).digest()


@dataclass(frozen=True)
class Break:
    wallet_id: str
    transaction_id: int | None  # None: a wallet-level invariant (balance, buckets)
    previous_id: int | None
    problem: str


@dataclass
class VerifyReport:
    wallets: int = 0
    transactions: int = 0
    #: chain-v2 rows whose metadata erasure pseudonymised (salt dropped): every other field still verified
    redacted: int = 0
    seconds: float = 0.0
    breaks: list[Break] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.breaks


_ROWS = """
    SELECT id, project_id, wallet_id, kind, amount_minor, balance_before_minor, balance_after_minor,
           idempotency_key, request_fingerprint, source_ref, related_transaction_id, hold_id, meter_id, period_start,
           price_version_id, reason, metadata::text AS metadata_text, created_at, chain_hash,
           metadata_salt, metadata_commitment
    FROM transactions {where} ORDER BY wallet_id, id
"""

_WALLETS = """
    SELECT w.id, w.balance_minor,
           (SELECT coalesce(sum(b.remaining_minor), 0) FROM credit_buckets b WHERE b.wallet_id = w.id) AS in_buckets
    FROM wallets w {where} ORDER BY w.id
"""


def verify(conn: Connection, *, project_id: str | None = None, batch: int = 5_000,
           progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Recompute every chain (one project's, or all) and the balance invariants; the report names, per wallet,
    the first broken link. Streams rows (server-side cursor): memory stays flat for any ledger size. Run it in a
    REPEATABLE READ transaction to check one instant of a live ledger."""
    import time

    started = time.monotonic()
    report = VerifyReport()
    params = {"project": project_id} if project_id else {}
    wallets = {r.id: (int(r.balance_minor), int(r.in_buckets)) for r in conn.execute(
        text(_WALLETS.format(where="WHERE w.project_id = :project" if project_id else "")), params)}
    seen: set[str] = set()
    result = conn.execution_options(stream_results=True, yield_per=batch).execute(
        text(_ROWS.format(where="WHERE project_id = :project" if project_id else "")), params)
    for wallet_id, rows in _by_wallet(result):
        seen.add(wallet_id)
        report.wallets += 1
        previous_hash: bytes | None = None
        previous_id: int | None = None
        balance = 0
        chain_broken = balance_broken = False
        for row in rows:
            report.transactions += 1
            stored = bytes(row.chain_hash)
            if not chain_broken and link(previous_hash, payload_of(row)) != stored:
                chain_broken = True
                report.breaks.append(Break(wallet_id, row.id, previous_id,
                                           "chain hash does not match the row (the row or its predecessor's link "
                                           "was changed after it was written)"))
            if row.metadata_commitment is not None:
                if row.metadata_salt is None:
                    report.redacted += 1
                elif not chain_broken and metadata_commitment(bytes(row.metadata_salt), row.metadata_text) != \
                        bytes(row.metadata_commitment):
                    chain_broken = True
                    report.breaks.append(Break(wallet_id, row.id, previous_id,
                                               "chain hash does not cover the row: its metadata does not match "
                                               "the chained commitment (changed after it was written)"))
            if not balance_broken and (row.balance_before_minor != balance
                                       or row.balance_after_minor != row.balance_before_minor + row.amount_minor):
                balance_broken = True
                report.breaks.append(Break(wallet_id, row.id, previous_id,
                                           f"balance does not chain: before {row.balance_before_minor}, previous "
                                           f"after {balance}, amount {row.amount_minor}, after "
                                           f"{row.balance_after_minor}"))
            previous_hash, previous_id, balance = stored, row.id, row.balance_after_minor
            if progress is not None and report.transactions % 1_000 == 0:
                progress(1_000)
        _wallet_checks(report, wallet_id, wallets.get(wallet_id), balance, previous_id)
    for wallet_id in sorted(set(wallets) - seen):
        _wallet_checks(report, wallet_id, wallets[wallet_id], 0, None)
    if progress is not None:
        progress(report.transactions % 1_000)
    report.seconds = time.monotonic() - started
    return report


def _by_wallet(result: Any) -> Iterator[tuple[str, Iterator[Any]]]:
    import itertools

    return ((wallet_id, rows) for wallet_id, rows in itertools.groupby(result, key=lambda r: r.wallet_id))


def _wallet_checks(report: VerifyReport, wallet_id: str, stored: tuple[int, int] | None, chained: int,
                   last_id: int | None) -> None:
    if stored is None:
        report.breaks.append(Break(wallet_id, None, last_id, "transactions of a wallet that does not exist"))
        return
    balance, in_buckets = stored
    if balance != chained:
        report.breaks.append(Break(wallet_id, None, last_id,
                                   f"wallet balance {balance} is not its last transaction's balance_after {chained}"))
    if in_buckets != max(balance, 0):
        report.breaks.append(Break(wallet_id, None, last_id,
                                   f"credit in buckets {in_buckets} is not max(balance, 0) = {max(balance, 0)}"))


@dataclass(frozen=True)
class ChainHead:
    wallet_id: str
    transaction_id: int
    chain_hash: str  # hex


@dataclass(frozen=True)
class DayHeads:
    day: date
    digest: str  # hex sha256 over the day's heads
    heads: tuple[ChainHead, ...]


def chain_heads(conn: Connection, *, project_id: str, since: date, until: date) -> list[DayHeads]:
    """Per UTC day in [since, until): each wallet's last link of that day (wallets that posted that day)."""
    rows = conn.execute(text("""
        SELECT DISTINCT ON (wallet_id, day) (created_at AT TIME ZONE 'UTC')::date AS day, wallet_id, id, chain_hash
        FROM transactions
        WHERE project_id = :p AND created_at >= CAST(:since AS date) AT TIME ZONE 'UTC'
          AND created_at < CAST(:until AS date) AT TIME ZONE 'UTC'
        ORDER BY wallet_id, day, id DESC
    """), {"p": project_id, "since": since, "until": until}).all()
    by_day: dict[date, list[ChainHead]] = {}
    for r in rows:
        by_day.setdefault(r.day, []).append(ChainHead(r.wallet_id, int(r.id), bytes(r.chain_hash).hex()))
    out = []
    for day in sorted(by_day):
        heads = tuple(sorted(by_day[day], key=lambda h: h.wallet_id))
        digest = hashlib.sha256("".join(f"{h.wallet_id}:{h.transaction_id}:{h.chain_hash}\n"
                                        for h in heads).encode()).hexdigest()
        out.append(DayHeads(day, digest, heads))
    return out
