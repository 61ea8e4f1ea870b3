"""The scheduler runs maintenance only while it holds the PostgreSQL lease."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Connection, Engine, text

from ledger import queries, service
from ledger.scheduler import Job, Scheduler
from ledger.settings import LedgerSettings

pytestmark = pytest.mark.integration


def _settings(database_url: str, **extra: object) -> LedgerSettings:
    return LedgerSettings.model_validate({"DATABASE_URL": database_url, "scheduler_lease_s": 1.0,
                                          "scheduler_interval_s": 0.1, **extra})


def test_only_the_lease_holder_runs_and_a_dead_holder_is_replaced(engine: Engine, database_url: str) -> None:
    first = Scheduler(engine=engine, settings=_settings(database_url), holder="first")
    second = Scheduler(engine=engine, settings=_settings(database_url), holder="second")
    assert first.run_round(force=True) is not None
    assert second.run_round(force=True) is None  # lease held by a live holder
    assert first.run_round(force=True) is not None  # renewal
    time.sleep(1.2)  # "first" stops renewing (crashed): the lease runs out
    assert second.run_round(force=True) is not None
    assert first.run_round(force=True) is None
    second.release()
    assert first.run_round(force=True) is not None


def test_a_round_expires_holds_and_credits_and_purges(engine: Engine, database_url: str,
                                                      invariants: Callable[..., None]) -> None:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        service.ensure_wallet(conn, project_id="p", owner_kind="user", owner_ref="u", wallet_id="W")
        service.grant_credits(conn, wallet_id="W", amount_minor=30, idempotency_key="g", kind="promo",
                              expires_at=now + timedelta(milliseconds=300))
        service.grant_credits(conn, wallet_id="W", amount_minor=70, idempotency_key="g2")
        hold = service.reserve(conn, wallet_id="W", amount_minor=50, timeout_s=0.3, idempotency_key="h")
        conn.execute(text("INSERT INTO dedupe_key_sets (source_topic, partition, as_of_offset, seen_at, key_hashes)"
                          " VALUES ('t', 0, 5, now() - interval '8 days', '{1,3}'), ('t', 0, 9, now(), '{2}')"))
        conn.execute(text("UPDATE outbox SET published_at = now() - interval '2 days' WHERE id = 1"))
    time.sleep(0.4)
    stop = threading.Event()
    scheduler = Scheduler(engine=engine, settings=_settings(database_url))
    thread = threading.Thread(target=scheduler.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                done = queries.get_hold(conn, hold.id).status == "expired" and queries.list_transactions(  # type: ignore[union-attr]
                    conn, wallet_id="W", kinds=["expiry"]).items
            if done:
                break
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(timeout=10)
    with engine.connect() as conn:
        expiry = queries.list_transactions(conn, wallet_id="W", kinds=["expiry"]).items
        view = queries.get_balance(conn, "W")
        dedupe = conn.execute(text("SELECT unnest(key_hashes) FROM dedupe_key_sets")).scalars().all()
        outbox_ids = conn.execute(text("SELECT id FROM outbox ORDER BY id")).scalars().all()
        lease = conn.execute(text("SELECT count(*) FROM scheduler_leases")).scalar()
    assert [t.amount_minor for t in expiry] == [-30]
    assert view is not None and (view.balance_minor, view.held_minor) == (70, 0)
    assert dedupe == [2]
    assert 1 not in outbox_ids  # the old published row is gone; unpublished rows stay
    assert lease == 0  # released on stop
    invariants(outbox_purged=True)


def test_a_failing_job_is_logged_and_retried_and_the_others_still_run(engine: Engine, database_url: str) -> None:
    ran: list[str] = []
    broken = {"yes": True}

    def flaky(conn: Connection, now: datetime, settings: LedgerSettings) -> int:
        ran.append("flaky")
        if broken["yes"]:
            raise RuntimeError("disk on fire")
        return 0

    def steady(conn: Connection, now: datetime, settings: LedgerSettings) -> int:
        ran.append("steady")
        return 0

    scheduler = Scheduler(engine=engine, settings=_settings(database_url),
                          jobs=[Job("flaky", 3600.0, flaky), Job("steady", 3600.0, steady)])
    assert scheduler.run_round() == {"steady": 0}
    assert scheduler.failures == {"flaky": "RuntimeError: disk on fire"}
    broken["yes"] = False
    # the failed job is due again at once; the one that succeeded waits for its period
    assert scheduler.run_round() == {"flaky": 0}
    assert scheduler.failures == {}
    assert ran == ["flaky", "steady", "flaky"]


def test_a_job_with_a_backlog_yields_after_its_budget_and_continues_next_round(engine: Engine,
                                                                               database_url: str) -> None:
    backlog = {"rows": 1_000}
    order: list[str] = []

    def purge(conn: Connection, now: datetime, settings: LedgerSettings) -> int:
        time.sleep(0.02)
        done = min(10, backlog["rows"])
        backlog["rows"] -= done
        return done

    def expire(conn: Connection, now: datetime, settings: LedgerSettings) -> int:
        order.append(f"expire after {1_000 - backlog['rows']} purged")
        return 0

    scheduler = Scheduler(engine=engine, settings=_settings(database_url, scheduler_job_budget_s=0.2),
                          jobs=[Job("purge", 3600.0, purge), Job("expire", 0.0, expire)])
    started = time.monotonic()
    first = scheduler.run_round()
    assert first is not None and 0 < first["purge"] < 1_000 and time.monotonic() - started < 5
    assert order == [f"expire after {first['purge']} purged"]  # the other job did not wait for the backlog
    rounds = 1
    while backlog["rows"] and rounds < 200:  # still due although its period is an hour: the backlog continues
        result = scheduler.run_round()
        assert result is not None and "purge" in result
        rounds += 1
    assert backlog["rows"] == 0 and rounds > 1
    # the last batch may have emptied the backlog just as the budget ran out; the job then stays due for one
    # more round, which finds nothing to do and settles it
    settling = scheduler.run_round() or {}
    assert settling.get("purge", 0) == 0
    assert "purge" not in (scheduler.run_round() or {})  # worked off: due again only after its period
