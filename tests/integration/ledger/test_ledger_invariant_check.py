"""The scheduled invariant check (issue 13 item 9) finds what bypassed the ledger: a row altered as superuser (the
triggers disabled, the way only the owner can) is reported per property, logged, and shown by the API's health.
On cbf7ba4 nothing checked the ledger at run time. (The API side: tests/integration/api/test_health_ledger.py.)"""

from __future__ import annotations

from sqlalchemy import Engine, text

from ledger import queries, service
from ledger.scheduler import JOBS, Scheduler
from ledger.settings import LedgerSettings


def test_the_scheduled_check_finds_a_row_altered_as_superuser(engine: Engine, database_url: str) -> None:
    with engine.begin() as conn:
        for owner in ("a", "b"):
            wallet = service.ensure_wallet(conn, project_id="p1", owner_kind="user", owner_ref=owner).id
            service.grant_credits(conn, wallet_id=wallet, amount_minor=100, idempotency_key=f"g-{owner}")
            service.debit(conn, wallet_id=wallet, amount_minor=30, idempotency_key=f"d-{owner}")
        victim = service.ensure_wallet(conn, project_id="p1", owner_kind="user", owner_ref="a").id
    settings = LedgerSettings.model_validate({"DATABASE_URL": database_url})
    scheduler = Scheduler(engine=engine, settings=settings,
                          jobs=[job for job in JOBS if job.name == "check_invariants"])
    assert scheduler.run_round(force=True) == {"check_invariants": 0}
    with engine.connect() as conn:
        clean = queries.latest_invariant_check(conn)
        assert clean is not None and clean.ok and clean.wallets == 2

    with engine.begin() as conn:  # what no ledger code path can do: rewrite a posted debit
        conn.execute(text("ALTER TABLE transactions DISABLE TRIGGER transactions_append_only"))
        conn.execute(text("""UPDATE transactions SET amount_minor = -10, balance_after_minor = 90
                             WHERE idempotency_key = 'd-a'"""))
        conn.execute(text("ALTER TABLE transactions ENABLE TRIGGER transactions_append_only"))
    assert scheduler.run_round(force=True) == {"check_invariants": 0}
    with engine.connect() as conn:
        found = queries.latest_invariant_check(conn)
    assert found is not None and not found.ok
    assert set(found.violations) == {"balance_vs_postings", "allocations_vs_amount"}
    assert [row["wallet_id"] for row in found.violations["balance_vs_postings"]["sample"]] == [victim]
    assert found.violations["balance_vs_postings"]["sample"][0]["computed"] == 90  # stored balance is 70

