"""Settle usage that was priced and left unposted: one ``usage`` transaction per key per pass.

With ``LEDGER_USAGE_SETTLE_INTERVAL_S`` > 0 the checkpoint path (ledger/checkpoints.py, ``settle_later``) stores what
each key is charged (``usage_charges.charged_minor``) and adds the change to the wallet's ``unsettled_minor``, but
posts no transaction: with many wallets and few events each, a posting per key per checkpoint is most of the
ledger's cost. This pass posts ``charged_minor − posted_minor`` per key — however many checkpoints moved it since
the last pass — with the same burn plan, allocations, chain link and outbox row as an immediate posting.

Invariants (``ledger.invariant_check`` checks the first two):
- a wallet's ``unsettled_minor`` = Σ (charged − posted) over its keys, at every commit (the checkpoint path adds
  exactly what it leaves unposted; a pass subtracts exactly what it posts);
- Σ amount of a key's usage transactions = −posted_minor (a credit back is a positive amount), so once settled
  the key has posted exactly its price — the same total an immediate posting would;
- ``balance − unsettled`` is what the balance will be once settled, and every figure users and the access rules
  see (available, debt, blocked, can_debit) is computed from it: a synchronous debit can never spend credit that
  metered usage already took (invariant 5 holds as if the usage were posted).

Locks: a pass locks the keys' usage_charges rows in key order, then their wallets in id order — the order the
checkpoint path takes them (it locks its groups first, which a pass never touches), so the two cannot deadlock.
The expiry job settles the wallets it is about to expire credit of first (``wallet_ids``, ledger/expiry.py): usage
metered before the job ran burns the expiring credit, as it would have had it been posted at once.
A posting is named ``usage:settle:{n}:{key}`` with n = the key's settlements so far + 1: unique per key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import NamedTuple

import structlog
from sqlalchemy import Connection, Engine, text

from ledger import metrics
from ledger.books import lock_wallets
from ledger.checkpoints import Key, post_deltas
from ledger.sqlrows import rows_json

log = structlog.get_logger("ledger.settle")

__all__ = ["SettleOutcome", "run_settler", "settle_all", "settle_usage"]

#: keys per settle transaction: a transaction holds its keys' charge rows, which an applier of the same keys waits
#: for, so it is kept short (~0.1–0.2 s at ~200 µs per posting); the fixed cost per transaction is ~2% at this size
SETTLE_KEYS_MAX = 1_000

_UNSETTLED_SQL = """
    SELECT wallet_id, meter_id, period_start, price_version_id, units, charged_minor, posted_minor, settlements
    FROM usage_charges
    WHERE unsettled
      AND (CAST(:wallets AS text[]) IS NULL OR wallet_id = ANY(CAST(:wallets AS text[])))
    ORDER BY wallet_id, meter_id, period_start, price_version_id
    LIMIT :limit
    FOR UPDATE"""
_UNSETTLED = text(_UNSETTLED_SQL)
# the background pass never waits for an applier: a key an applier holds is settled by a later pass
_UNSETTLED_UNLOCKED = text(_UNSETTLED_SQL + " SKIP LOCKED")

_MARK_POSTED = text("""
    UPDATE usage_charges c SET posted_minor = v.charged, settlements = c.settlements + 1, updated_at = now()
    FROM json_to_recordset(CAST(:rows AS json)) AS v(wallet_id text, meter_id text, period_start timestamptz,
                                                     price_version_id text, charged bigint)
    WHERE c.wallet_id = v.wallet_id AND c.meter_id = v.meter_id AND c.period_start = v.period_start
      AND c.price_version_id = v.price_version_id
""")

class SettleOutcome(NamedTuple):
    keys: int  # keys posted
    wallets: int
    amount_minor: int  # net posted: positive = charged (the transactions' amounts are its negation)


def settle_usage(conn: Connection, *, keys_max: int | None = SETTLE_KEYS_MAX,
                 wallet_ids: Iterable[str] | None = None, skip_locked: bool = False) -> SettleOutcome:
    """Post the unsettled usage of up to ``keys_max`` keys (None: all) inside the caller's transaction (the caller
    commits). A key is posted whole: ``charged − posted`` as one transaction. ``skip_locked``: leave the keys another
    transaction holds (an applier's) for a later pass instead of waiting for them.

    ``wallet_ids``: only these wallets' keys — and every one of these wallets is locked (id order) before this
    returns, so a caller that posts more for them next (the expiry job) takes no lock out of order: it must not lock
    anything but these wallets and their buckets afterwards in the same transaction."""
    wallets = sorted(set(wallet_ids)) if wallet_ids is not None else None
    rows = conn.execute(_UNSETTLED_UNLOCKED if skip_locked else _UNSETTLED,
                        {"wallets": wallets, "limit": keys_max}).all()
    if wallets is not None:
        lock_wallets(conn, wallets)  # after the usage_charges rows: the ledger's lock order
    if not rows:
        return SettleOutcome(0, 0, 0)
    keys: list[Key] = []
    units: dict[Key, Decimal] = {}
    deltas: dict[Key, int] = {}
    charged: dict[Key, int] = {}
    names: dict[Key, str] = {}
    for wallet_id, meter_id, period_start, version, key_units, charged_minor, posted_minor, settlements in rows:
        key = Key(wallet_id, meter_id, period_start, version)
        keys.append(key)
        units[key], charged[key] = key_units, int(charged_minor)
        deltas[key] = int(charged_minor) - int(posted_minor)
        names[key] = f"settle:{settlements + 1}"
    posted = post_deltas(conn, names, keys, units, deltas, charged, settles=True)  # unsettled_minor -= posted
    conn.execute(_MARK_POSTED, {"rows": rows_json(
        {"wallet_id": k.wallet_id, "meter_id": k.meter_id, "period_start": k.period_start,
         "price_version_id": k.price_version_id, "charged": charged[k]} for k in keys)})
    per_wallet: dict[str, int] = {}
    for key, delta in posted.items():
        per_wallet[key.wallet_id] = per_wallet.get(key.wallet_id, 0) + delta
    return SettleOutcome(len(posted), len(per_wallet), sum(posted.values()))


def settle_all(engine: Engine, *, keys_max: int = SETTLE_KEYS_MAX, wallet_ids: Iterable[str] | None = None,
               stop: threading.Event | None = None, skip_locked: bool = False) -> SettleOutcome:
    """Settle passes, one transaction each, until nothing is left to settle (or ``stop`` is set; with
    ``skip_locked``, until a pass finds fewer than ``keys_max`` keys free)."""
    wallets = list(wallet_ids) if wallet_ids is not None else None
    keys = touched = amount = 0
    while stop is None or not stop.is_set():
        with engine.begin() as conn:
            outcome = settle_usage(conn, keys_max=keys_max, wallet_ids=wallets, skip_locked=skip_locked)
        keys, touched, amount = keys + outcome.keys, touched + outcome.wallets, amount + outcome.amount_minor
        if outcome.keys < keys_max:
            break
    return SettleOutcome(keys, touched, amount)


def run_settler(engine: Engine, stop: threading.Event, *, interval_s: float,
                keys_max: int = SETTLE_KEYS_MAX) -> None:
    """Settle everything every ``interval_s`` until ``stop`` is set (the ledger consumer runs this in a thread when
    usage settles later); a failed pass is logged and retried at the next interval — what it would have posted
    stays unsettled, counted against the balance, and nothing is lost."""
    while not stop.wait(interval_s):
        started = time.monotonic()
        try:
            outcome = settle_all(engine, keys_max=keys_max, stop=stop, skip_locked=True)
        except Exception:  # a database hiccup must not stop settling for good
            metrics.SETTLE_FAILURES.inc()
            log.exception("settle_failed")
            continue
        metrics.SETTLE_SECONDS.observe(time.monotonic() - started)
        metrics.SETTLED_KEYS.inc(outcome.keys)
        if outcome.keys:
            log.info("usage_settled", keys=outcome.keys, wallets=outcome.wallets, amount_minor=outcome.amount_minor,
                     seconds=round(time.monotonic() - started, 3), at=datetime.now(UTC).isoformat())
