"""Billing rules: a fixed fee a wallet pays on a schedule (a daily or monthly flat fee, selected weekdays or days
of the month, or any cron expression), run by the scheduler (ledger/scheduler.py, job ``billing_rules``).

Invariants:
- every due time of an active rule is charged at most once: the run row is UNIQUE per (rule, due time) and the
  ledger transaction's idempotency key is ``billing:{rule}:{due time}``, so a runner that dies after posting,
  a second runner, or a replayed round cannot charge twice;
- due times are never silently dropped while a rule is active: a scheduler that was down charges every missed
  due time when it comes back, oldest first, each in its own short transaction;
- a pause skips the due times it covers (resuming starts at the next due time after now);
- a fee is owed: with ``when_insufficient = 'debt'`` (the default) it is posted whatever the balance and what the
  buckets cannot cover becomes debt (the wallet is blocked for new access until settled, as with usage); with
  ``'skip'`` a due time the wallet cannot pay is recorded as ``skipped`` and nothing is posted.

Schedules are UTC. The pure part (``cron_expression``, ``next_due``) turns what the user asked for into a
5-field cron expression and finds due times with croniter.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from croniter import croniter
from sqlalchemy import Connection, text

from ledger import service
from ledger.errors import (
    InsufficientCredits,
    InvalidRequest,
    UnknownBillingRule,
    UnknownWallet,
    WalletBlocked,
)

__all__ = [
    "BillingRuleRow",
    "BillingRunRow",
    "UnknownBillingRule",
    "create_rule",
    "cron_expression",
    "get_rule",
    "list_rules",
    "list_runs",
    "next_due",
    "run_due",
    "update_rule",
]

WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # cron numbers them 0..6 from Sunday
STATUSES = ("active", "paused", "archived")


# -- schedules (pure) --------------------------------------------------------------------------------------

def _clock(schedule: Mapping[str, Any]) -> tuple[int, int]:
    hour, minute = schedule.get("hour", 0), schedule.get("minute", 0)
    if not isinstance(hour, int) or not isinstance(minute, int) or not (0 <= hour < 24 and 0 <= minute < 60):
        raise InvalidRequest("hour must be 0..23 and minute 0..59 (UTC)")
    return hour, minute


def cron_expression(schedule: Mapping[str, Any]) -> str:
    """The 5-field UTC cron expression of a schedule:

    - ``{"kind": "daily", "hour": 0, "minute": 0}``
    - ``{"kind": "weekly", "days": ["mon", "thu"], "hour": 9}`` (selected days of the week)
    - ``{"kind": "monthly", "days": [1, 15, "last"]}`` (selected days of the month; ``"last"`` = its last day)
    - ``{"kind": "cron", "expression": "*/15 * * * *"}``"""
    kind = schedule.get("kind")
    if kind == "cron":
        expression = str(schedule.get("expression", "")).strip()
        if len(expression.split()) != 5 or not croniter.is_valid(expression):
            raise InvalidRequest(f"not a 5-field cron expression: {expression!r}")
        return expression
    hour, minute = _clock(schedule)
    if kind == "daily":
        return f"{minute} {hour} * * *"
    days = schedule.get("days")
    if not isinstance(days, list) or not days:
        raise InvalidRequest(f"a {kind!r} schedule needs a non-empty list of days")
    if kind == "weekly":
        try:
            numbers = sorted({WEEKDAYS.index(str(d).lower()[:3]) for d in days})
        except ValueError:
            raise InvalidRequest(f"weekdays are {', '.join(WEEKDAYS)}") from None
        return f"{minute} {hour} * * {','.join(map(str, numbers))}"
    if kind == "monthly":
        fields: list[str] = []
        for day in days:
            if day == "last":
                fields.append("L")
            elif isinstance(day, int) and 1 <= day <= 28:
                fields.append(str(day))
            else:  # 29..31 would silently skip short months
                raise InvalidRequest("days of the month are 1..28 or \"last\"")
        unique = sorted(set(fields), key=lambda f: (f == "L", int(f) if f != "L" else 0))
        if "L" in unique and len(unique) > 1:  # croniter cannot mix L with other days in one field
            raise InvalidRequest("\"last\" cannot be combined with other days; use two rules")
        return f"{minute} {hour} {','.join(unique)} * *"
    raise InvalidRequest("schedule kind must be daily, weekly, monthly or cron")


def next_due(cron: str, after: datetime) -> datetime:
    """The first due time strictly after ``after`` (UTC)."""
    if after.tzinfo is None:
        raise InvalidRequest("times must carry a UTC offset")
    due: datetime = croniter(cron, after.astimezone(UTC)).get_next(datetime)
    return due.astimezone(UTC)


# -- rows ------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BillingRuleRow:
    """A fixed fee on a UTC schedule (``cron``, derived from ``schedule``); ``next_run_at`` = the next due time."""

    id: str
    project_id: str
    wallet_id: str
    name: str
    schedule: dict[str, Any]
    cron: str
    amount_minor: int
    when_insufficient: str
    status: str
    next_run_at: datetime
    last_run_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: Any) -> BillingRuleRow:
        return cls(**{name: row[name] for name in cls.__slots__})

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class BillingRunRow:
    """One due time of a rule, run: ``charged``; ``debt`` (posted, the wallet went into debt); ``skipped``
    (the wallet could not pay and the rule says skip: nothing posted, ``amount_minor`` 0)."""

    id: int
    rule_id: str
    project_id: str
    wallet_id: str
    due_at: datetime
    status: str
    amount_minor: int
    transaction_id: int | None
    detail: str | None
    ran_at: datetime

    @classmethod
    def of(cls, row: Any) -> BillingRunRow:
        return cls(**{name: row[name] for name in cls.__slots__})


# -- rules -----------------------------------------------------------------------------------------------

def create_rule(conn: Connection, *, project_id: str, wallet_id: str, name: str, schedule: Mapping[str, Any],
                amount_minor: int, when_insufficient: str = "debt", starts_at: datetime | None = None,
                now: datetime | None = None) -> BillingRuleRow:
    """A new active rule; its first due time is the first one after ``starts_at`` (default now)."""
    if amount_minor <= 0:
        raise InvalidRequest("amount_minor must be > 0")
    if when_insufficient not in ("debt", "skip"):
        raise InvalidRequest("when_insufficient must be debt or skip")
    owner = conn.execute(text("SELECT project_id FROM wallets WHERE id = :w"), {"w": wallet_id}).scalar()
    if owner != project_id:
        raise UnknownWallet(f"no wallet {wallet_id!r} in project {project_id}")
    cron = cron_expression(schedule)
    start = starts_at or now or datetime.now(UTC)
    row = conn.execute(text("""
        INSERT INTO billing_rules (id, project_id, wallet_id, name, schedule, cron, amount_minor, when_insufficient,
                                   next_run_at)
        VALUES (:id, :p, :w, :name, CAST(:schedule AS jsonb), :cron, :amount, :when, :next)
        RETURNING *
    """), {"id": f"br_{uuid.uuid4().hex[:16]}", "p": project_id, "w": wallet_id, "name": name,
           "schedule": orjson.dumps(dict(schedule)).decode(), "cron": cron, "amount": amount_minor,
           "when": when_insufficient, "next": next_due(cron, start)}).mappings().one()
    return BillingRuleRow.of(row)


def get_rule(conn: Connection, *, project_id: str, rule_id: str, lock: bool = False) -> BillingRuleRow:
    row = conn.execute(text("SELECT * FROM billing_rules WHERE id = :id AND project_id = :p"
                            + (" FOR UPDATE" if lock else "")), {"id": rule_id, "p": project_id}).mappings().first()
    if row is None:
        raise UnknownBillingRule(f"no billing rule {rule_id!r} in project {project_id}")
    return BillingRuleRow.of(row)


def update_rule(conn: Connection, *, project_id: str, rule_id: str, name: str | None = None,
                amount_minor: int | None = None, status: str | None = None,
                now: datetime | None = None) -> tuple[BillingRuleRow, BillingRuleRow]:
    """Rename, re-price, pause, resume or archive (final). Returns (before, after)."""
    before = get_rule(conn, project_id=project_id, rule_id=rule_id, lock=True)
    if before.status == "archived":
        raise InvalidRequest("an archived billing rule cannot change")
    if amount_minor is not None and amount_minor <= 0:
        raise InvalidRequest("amount_minor must be > 0")
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}")
    next_run_at = before.next_run_at
    if status == "active" and before.status == "paused":  # a pause skips the due times it covered
        next_run_at = next_due(before.cron, now or datetime.now(UTC))
    row = conn.execute(text("""
        UPDATE billing_rules SET name = :name, amount_minor = :amount, status = :status, next_run_at = :next,
                                 updated_at = now()
        WHERE id = :id RETURNING *
    """), {"id": rule_id, "name": name or before.name, "amount": amount_minor or before.amount_minor,
           "status": status or before.status, "next": next_run_at}).mappings().one()
    return before, BillingRuleRow.of(row)


def list_rules(conn: Connection, *, project_id: str, wallet_id: str | None = None,
               status: str | None = None) -> list[BillingRuleRow]:
    rows = conn.execute(text("""
        SELECT * FROM billing_rules WHERE project_id = :p
          AND (CAST(:w AS text) IS NULL OR wallet_id = :w) AND (CAST(:s AS text) IS NULL OR status = :s)
        ORDER BY created_at, id
    """), {"p": project_id, "w": wallet_id, "s": status}).mappings()
    return [BillingRuleRow.of(r) for r in rows]


def list_runs(conn: Connection, *, project_id: str, rule_id: str | None = None, wallet_id: str | None = None,
              status: str | None = None, before_id: int | None = None, limit: int = 50) -> list[BillingRunRow]:
    """Newest first; pass the last id as ``before_id`` for the next page."""
    rows = conn.execute(text("""
        SELECT * FROM billing_runs WHERE project_id = :p
          AND (CAST(:r AS text) IS NULL OR rule_id = :r) AND (CAST(:w AS text) IS NULL OR wallet_id = :w)
          AND (CAST(:s AS text) IS NULL OR status = :s) AND (CAST(:b AS bigint) IS NULL OR id < :b)
        ORDER BY id DESC LIMIT :limit
    """), {"p": project_id, "r": rule_id, "w": wallet_id, "s": status, "b": before_id, "limit": limit}).mappings()
    return [BillingRunRow.of(r) for r in rows]


# -- the scheduler's job ---------------------------------------------------------------------------------

_DUE = text("""
    SELECT * FROM billing_rules WHERE status = 'active' AND next_run_at <= :now
    ORDER BY next_run_at, id LIMIT :limit FOR UPDATE SKIP LOCKED
""")


def run_due(conn: Connection, *, now: datetime, limit: int = 20) -> int:
    """Charge the oldest due time of up to ``limit`` due rules (one due time per rule per call: the caller
    repeats while this returns > 0, so a backlog is worked off oldest first in short transactions)."""
    rules = [BillingRuleRow.of(r) for r in conn.execute(_DUE, {"now": now, "limit": limit}).mappings()]
    for rule in rules:
        _run_once(conn, rule, now)
    return len(rules)


def _run_once(conn: Connection, rule: BillingRuleRow, now: datetime) -> None:
    due = rule.next_run_at
    key = f"billing:{rule.id}:{due.astimezone(UTC).isoformat()}"
    reason = f"billing rule {rule.name}"
    status, transaction_id, detail = "charged", None, None
    with conn.begin_nested():  # a refused debit must not abort the job's transaction
        try:
            if rule.when_insufficient == "skip":
                posted = service.debit(conn, wallet_id=rule.wallet_id, amount_minor=rule.amount_minor,
                                       idempotency_key=key, source_ref=f"billing_rule:{rule.id}",
                                       metadata={"billing_rule": rule.id, "due_at": due.isoformat()})
            else:
                posted = service.charge_owed(conn, wallet_id=rule.wallet_id, amount_minor=rule.amount_minor,
                                             idempotency_key=key, source_ref=f"billing_rule:{rule.id}",
                                             reason=reason,
                                             metadata={"billing_rule": rule.id, "due_at": due.isoformat()})
            transaction_id = posted.transaction.id
            if posted.transaction.balance_after_minor < 0:
                status, detail = "debt", f"balance {posted.transaction.balance_after_minor} after the fee"
        except (InsufficientCredits, WalletBlocked) as exc:
            status, detail = "skipped", f"{exc.code}: {exc}"
    conn.execute(text("""
        INSERT INTO billing_runs (rule_id, project_id, wallet_id, due_at, status, amount_minor, transaction_id,
                                  detail)
        VALUES (:r, :p, :w, :due, :status, :amount, :tx, :detail)
        ON CONFLICT (rule_id, due_at) DO NOTHING
    """), {"r": rule.id, "p": rule.project_id, "w": rule.wallet_id, "due": due, "status": status,
           "amount": rule.amount_minor if status != "skipped" else 0, "tx": transaction_id, "detail": detail})
    conn.execute(text("UPDATE billing_rules SET next_run_at = :next, last_run_at = :now, updated_at = now() "
                      "WHERE id = :id"), {"next": next_due(rule.cron, due), "now": now, "id": rule.id})
