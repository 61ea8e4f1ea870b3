"""Billing rules run by the scheduler against a real PostgreSQL: each due time charged once (also when run
twice or by two runners), missed due times caught up oldest first, fees beyond the balance as debt or skipped
per rule, pauses skip, and the scheduler's lease-held round runs the job."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text

from ledger import billing, queries, service
from ledger.errors import InvalidRequest, UnknownWallet
from ledger.scheduler import Scheduler
from ledger.settings import LedgerSettings

pytestmark = pytest.mark.integration

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def _wallet(engine: Engine, wallet_id: str, credits: int) -> None:
    with engine.begin() as conn:
        service.ensure_wallet(conn, project_id="p1", owner_kind="subject", owner_ref=wallet_id, wallet_id=wallet_id)
        if credits:
            service.grant_credits(conn, wallet_id=wallet_id, amount_minor=credits, idempotency_key=f"g-{wallet_id}")


def _run_all(engine: Engine, now: datetime) -> int:
    total = 0
    while True:
        with engine.begin() as conn:
            done = billing.run_due(conn, now=now, limit=3)
        total += done
        if done == 0:
            return total


def _balance(engine: Engine, wallet_id: str) -> int:
    with engine.connect() as conn:
        return queries.get_balance(conn, wallet_id).balance_minor  # type: ignore[union-attr]


def test_each_due_time_is_charged_once_and_a_backlog_is_caught_up(engine: Engine,
                                                                   invariants: Callable[..., None]) -> None:
    _wallet(engine, "W", 1_000)
    with engine.begin() as conn:
        rule = billing.create_rule(conn, project_id="p1", wallet_id="W", name="daily seat", amount_minor=100,
                                   schedule={"kind": "daily", "hour": 12}, now=T0)
    assert rule.next_run_at == T0.replace(hour=12)
    assert _run_all(engine, T0) == 0  # nothing due yet
    # the scheduler was down for three days: 3 due times (Dec 1, 2, 3 at 12:00) are owed, and charged once
    assert _run_all(engine, T0 + timedelta(days=2, hours=3)) == 3
    assert _run_all(engine, T0 + timedelta(days=2, hours=3)) == 0  # running again charges nothing
    assert _balance(engine, "W") == 700
    with engine.connect() as conn:
        runs = billing.list_runs(conn, project_id="p1", rule_id=rule.id)
        keys = conn.execute(text("SELECT idempotency_key FROM transactions WHERE kind = 'debit' ORDER BY id")
                            ).scalars().all()
        after = billing.get_rule(conn, project_id="p1", rule_id=rule.id)
    assert [r.due_at.day for r in runs] == [3, 2, 1] and {r.status for r in runs} == {"charged"}
    assert len(set(keys)) == 3 and all(k.startswith(f"billing:{rule.id}:") for k in keys)
    assert after.next_run_at == datetime(2026, 12, 4, 12, tzinfo=UTC)
    invariants()


def test_fees_beyond_the_balance_become_debt_or_are_skipped(engine: Engine, invariants: Callable[..., None]) -> None:
    _wallet(engine, "OWES", 150)
    _wallet(engine, "SKIPS", 150)
    with engine.begin() as conn:
        owed = billing.create_rule(conn, project_id="p1", wallet_id="OWES", name="plan", amount_minor=100,
                                   schedule={"kind": "daily"}, now=T0)
        skipped = billing.create_rule(conn, project_id="p1", wallet_id="SKIPS", name="plan", amount_minor=100,
                                      schedule={"kind": "daily"}, when_insufficient="skip", now=T0)
    assert _run_all(engine, T0 + timedelta(days=2)) == 4  # Dec 2 and Dec 3 at 00:00, for both rules
    assert _balance(engine, "OWES") == -50  # owed: posted, the rest is debt (the wallet is now blocked)
    assert _balance(engine, "SKIPS") == 50  # the second fee could not be paid: skipped, nothing posted
    with engine.connect() as conn:
        owed_runs = [r.status for r in billing.list_runs(conn, project_id="p1", rule_id=owed.id)]
        skipped_runs = billing.list_runs(conn, project_id="p1", rule_id=skipped.id)
    assert owed_runs == ["debt", "charged"]
    assert [r.status for r in skipped_runs] == ["skipped", "charged"]
    assert skipped_runs[0].transaction_id is None and "insufficient" in (skipped_runs[0].detail or "")
    invariants()


def test_pause_skips_archive_is_final_and_bad_input_is_refused(engine: Engine) -> None:
    _wallet(engine, "W", 1_000)
    with engine.begin() as conn:
        rule = billing.create_rule(conn, project_id="p1", wallet_id="W", name="fee", amount_minor=10,
                                   schedule={"kind": "cron", "expression": "0 * * * *"}, now=T0)
        billing.update_rule(conn, project_id="p1", rule_id=rule.id, status="paused")
    assert _run_all(engine, T0 + timedelta(hours=5)) == 0
    with engine.begin() as conn:
        _, resumed = billing.update_rule(conn, project_id="p1", rule_id=rule.id, status="active",
                                         now=T0 + timedelta(hours=5, minutes=10))
    assert resumed.next_run_at == T0 + timedelta(hours=6)  # the paused hours are not charged
    assert _run_all(engine, T0 + timedelta(hours=6)) == 1 and _balance(engine, "W") == 990
    with engine.begin() as conn:
        billing.update_rule(conn, project_id="p1", rule_id=rule.id, status="archived")
        with pytest.raises(InvalidRequest):
            billing.update_rule(conn, project_id="p1", rule_id=rule.id, status="active")
    with engine.begin() as conn, pytest.raises(UnknownWallet):
        billing.create_rule(conn, project_id="other", wallet_id="W", name="x", amount_minor=1,
                            schedule={"kind": "daily"})
    with engine.begin() as conn, pytest.raises(InvalidRequest):
        billing.create_rule(conn, project_id="p1", wallet_id="W", name="x", amount_minor=0,
                            schedule={"kind": "daily"})


def test_two_runners_charge_each_due_time_once(engine: Engine, invariants: Callable[..., None]) -> None:
    for i in range(20):
        _wallet(engine, f"R{i}", 10_000)
    with engine.begin() as conn:
        for i in range(20):
            billing.create_rule(conn, project_id="p1", wallet_id=f"R{i}", name="fee", amount_minor=7,
                                schedule={"kind": "cron", "expression": "*/10 * * * *"}, now=T0)
    later = T0 + timedelta(hours=1)  # 6 due times per rule
    errors: list[BaseException] = []

    def runner() -> None:
        try:
            _run_all(engine, later)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=runner) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM billing_runs")).scalar() == 120
        assert conn.execute(text("SELECT count(*) FROM transactions WHERE kind = 'debit'")).scalar() == 120
    assert all(_balance(engine, f"R{i}") == 10_000 - 42 for i in range(20))
    invariants()


def test_the_scheduler_round_runs_billing_rules(engine: Engine, database_url: str) -> None:
    _wallet(engine, "S", 100)
    with engine.begin() as conn:
        rule = billing.create_rule(conn, project_id="p1", wallet_id="S", name="fee", amount_minor=5,
                                   schedule={"kind": "daily"}, now=T0)
    settings = LedgerSettings.model_validate({"DATABASE_URL": database_url, "scheduler_lease_s": 5.0})
    results = Scheduler(engine=engine, settings=settings, holder="billing-test").run_round(
        now=T0 + timedelta(days=1), force=True)
    assert results is not None and results["billing_rules"] == 1
    with engine.connect() as conn:
        assert [r.status for r in billing.list_runs(conn, project_id="p1", rule_id=rule.id)] == ["charged"]
    assert _balance(engine, "S") == 95
