"""The scheduled invariant check (scheduler job ``check_invariants``): the database says what it cannot enforce.

Constraints and triggers already refuse most bad rows (CHECK balance_after = balance_before + amount, append-only
triggers, composite tenant keys). What no constraint can state is a property ACROSS rows; this job recomputes
them from the tables and records the result (``invariant_checks``; ``ledger.queries.latest_invariant_check``,
shown by the API's ``/healthz`` and the dashboard), logging every violation as an error:

- ``balance_vs_postings``: a wallet's ``balance_minor`` equals Σ amount of its transactions (invariant 3:
  balances change only through transactions);
- ``broken_chain``: a wallet's transactions chain in id order — each ``balance_before`` is the previous row's
  ``balance_after`` (0 for the first);
- ``buckets_vs_balance``: Σ remaining of a wallet's buckets equals max(balance, 0) (ledger README invariant 2);
- ``allocations_vs_amount``: a transaction's allocations sum to its amount;
- ``unsettled_vs_charges``: a wallet's ``unsettled_minor`` equals Σ (charged − posted) over its usage keys (usage
  priced but left for the settle pass, ledger/settle.py).

A violation means something bypassed the ledger (a superuser's UPDATE, a restored backup, a bug): the check
reports, it never repairs. Full scans, ONE statement per property — so each property is read from one snapshot
while postings go on (a posting commits a wallet's transaction rows, balance and buckets together) — every 300 s
(the scheduler job's period).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
import structlog
from sqlalchemy import Connection, text

from ledger import metrics

__all__ = ["CHECKS", "InvariantCheck", "check_invariants", "latest_invariant_check"]

log = structlog.get_logger("ledger.invariant_check")

#: reported per check at most (the count is exact; the list is a sample for the operator)
SAMPLE_MAX = 20

CHECKS: dict[str, str] = {
    "balance_vs_postings": """
        SELECT w.id AS wallet_id, w.balance_minor AS stored, coalesce(sum(t.amount_minor), 0) AS computed
        FROM wallets w LEFT JOIN transactions t ON t.project_id = w.project_id AND t.wallet_id = w.id
        GROUP BY w.id, w.balance_minor HAVING coalesce(sum(t.amount_minor), 0) <> w.balance_minor
        ORDER BY w.id""",
    "broken_chain": """
        SELECT wallet_id, id AS transaction_id, balance_before_minor AS stored, previous AS computed
        FROM (SELECT wallet_id, id, balance_before_minor,
                     lag(balance_after_minor, 1, 0::bigint) OVER (PARTITION BY wallet_id ORDER BY id) AS previous
              FROM transactions) t
        WHERE balance_before_minor <> previous ORDER BY wallet_id, id""",
    "buckets_vs_balance": """
        SELECT w.id AS wallet_id, greatest(w.balance_minor, 0) AS stored,
               coalesce(sum(b.remaining_minor), 0) AS computed
        FROM wallets w LEFT JOIN credit_buckets b ON b.project_id = w.project_id AND b.wallet_id = w.id
        GROUP BY w.id, w.balance_minor HAVING coalesce(sum(b.remaining_minor), 0) <> greatest(w.balance_minor, 0)
        ORDER BY w.id""",
    "allocations_vs_amount": """
        SELECT t.wallet_id, t.id AS transaction_id, t.amount_minor AS stored,
               coalesce(sum(a.amount_minor), 0) AS computed
        FROM transactions t LEFT JOIN transaction_allocations a ON a.transaction_id = t.id
        GROUP BY t.id HAVING coalesce(sum(a.amount_minor), 0) <> t.amount_minor
        ORDER BY t.id""",
    "unsettled_vs_charges": """
        SELECT w.id AS wallet_id, w.unsettled_minor AS stored,
               coalesce(sum(c.charged_minor - c.posted_minor), 0) AS computed
        FROM wallets w LEFT JOIN usage_charges c ON c.wallet_id = w.id AND c.unsettled
        GROUP BY w.id, w.unsettled_minor HAVING coalesce(sum(c.charged_minor - c.posted_minor), 0) <> w.unsettled_minor
        ORDER BY w.id""",
}


@dataclass(frozen=True, slots=True)
class InvariantCheck:
    """One run of the check: violations per property (count, and a sample of at most SAMPLE_MAX rows)."""

    checked_at: datetime
    duration_ms: int
    wallets: int
    transactions: int
    violation_count: int
    violations: dict[str, dict[str, Any]]

    @property
    def ok(self) -> bool:
        return self.violation_count == 0


def check_invariants(conn: Connection) -> InvariantCheck:
    """Run every check (one statement, hence one snapshot, each) in the caller's transaction and record the
    result. Returns it."""
    wallets, transactions = conn.execute(text(
        "SELECT (SELECT count(*) FROM wallets), (SELECT coalesce(max(id), 0) FROM transactions)")).one()
    violations: dict[str, dict[str, Any]] = {}
    total = 0
    for name, sql in CHECKS.items():
        rows = [{k: int(v) if isinstance(v, Decimal) else v for k, v in r.items()}  # sums are numeric
                for r in conn.execute(text(sql)).mappings()]
        if rows:
            violations[name] = {"count": len(rows), "sample": rows[:SAMPLE_MAX]}
            total += len(rows)
            for sample in rows[:SAMPLE_MAX]:
                log.error("ledger_invariant_violated", check=name, **{k: str(v) for k, v in sample.items()})
    recorded = conn.execute(text("""
        INSERT INTO invariant_checks (duration_ms, wallets, transactions, violation_count, violations)
        VALUES (CAST(extract(epoch FROM clock_timestamp() - now()) * 1000 AS integer), :w, :t, :n,
                CAST(:v AS jsonb))
        RETURNING checked_at, duration_ms
    """), {"w": wallets, "t": transactions, "n": total, "v": orjson.dumps(violations, default=str).decode()}).one()
    # keep a week of history at the default interval; older runs say nothing the log does not
    conn.execute(text("DELETE FROM invariant_checks WHERE checked_at < now() - interval '7 days'"))
    result = InvariantCheck(recorded.checked_at, int(recorded.duration_ms), int(wallets), int(transactions), total, violations)
    # the scheduler's /metrics serves it (meterline_invariant_check_violations{check}; `meterline status` reads it)
    metrics.record_invariant_check({name: int(violations.get(name, {}).get("count", 0)) for name in CHECKS})
    if total:
        log.error("ledger_invariants_violated", violations=total, checks=sorted(violations))
    else:
        log.info("ledger_invariants_hold", wallets=wallets, transactions=transactions, duration_ms=result.duration_ms)
    return result


def latest_invariant_check(conn: Connection) -> InvariantCheck | None:
    """The most recent run (None before the first)."""
    row = conn.execute(text("""
        SELECT checked_at, duration_ms, wallets, transactions, violation_count, violations
        FROM invariant_checks ORDER BY checked_at DESC, id DESC LIMIT 1
    """)).one_or_none()
    if row is None:
        return None
    return InvariantCheck(row.checked_at, row.duration_ms, row.wallets, row.transactions, row.violation_count,
                          row.violations)
